"""Every module under palm_rlhf imports cleanly (no missing files, no import cycles,
no syntax that only fails at import time).

A module whose *optional* extra is not installed skips, naming the extra; a
missing core dependency or any other error fails.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import palm_rlhf

# top-level import name of an optional dependency -> the pyproject extra that installs it
OPTIONAL = {"fastapi": "web", "uvicorn": "web", "jinja2": "web", "multipart": "web", "starlette": "web",
            "tokenizers": "bpe", "tensorboard": "tensorboard", "torch.utils.tensorboard": "tensorboard"}
NOT_IMPORTABLE = {"palm_rlhf.__main__"}  # runs the CLI on import; covered by the CLI tests

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(palm_rlhf.__path__, prefix="palm_rlhf.")
    if info.name not in NOT_IMPORTABLE
)


def test_walk_found_the_package():
    assert {"palm_rlhf.errors", "palm_rlhf.ops", "palm_rlhf.model.palm", "palm_rlhf.cli.main"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_import(name):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        extra = OPTIONAL.get(missing) or OPTIONAL.get(missing.split(".")[0])
        if extra is None:
            raise
        pytest.skip(f"{name} needs the optional extra [{extra}] ({missing} is not installed): "
                    f"pip install -e .[{extra}]")


@pytest.mark.parametrize("name", sorted(palm_rlhf.__all__))
def test_top_level_names(name):
    """`from palm_rlhf import X` works for every name the package advertises (lazy ones included)."""
    assert getattr(palm_rlhf, name) is not None
