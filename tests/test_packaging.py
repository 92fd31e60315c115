"""The wheel ships the YAML presets: built from a copy of the source (so the checkout gets no
build/ or egg-info), installed into a temporary directory, and used from outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "palm_rlhf", src / "palm_rlhf", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp / "out"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (built,) = (tmp / "out").glob("palm_rlhf-*.whl")
    return built


def test_wheel_contains_every_preset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "palm_rlhf" / "configs").rglob("*.yaml"))
    assert presets and {"palm_rlhf/configs/pretrain/tiny-stdlib.yaml", "palm_rlhf/configs/model/palm-8b.yaml"} <= set(presets)
    assert [p for p in presets if p not in names] == []


def test_installed_wheel_finds_presets_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    code = (
        "import palm_rlhf, pathlib\n"
        f"assert pathlib.Path(palm_rlhf.__file__).is_relative_to({str(target)!r}), palm_rlhf.__file__\n"
        "from palm_rlhf.model.presets import load_preset\n"
        "from palm_rlhf.runtime.config import load_config\n"
        "from palm_rlhf.trainers.pretrain import PretrainConfig\n"
        "assert load_preset('palm-tiny')['dim'] > 0\n"
        "a = load_config(PretrainConfig, 'tiny-stdlib')\n"
        "b = load_config(PretrainConfig, 'configs/pretrain/tiny-stdlib.yaml')\n"
        "assert a == b, (a, b)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("PALM_RLHF_MODEL_CONFIGS", None)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
