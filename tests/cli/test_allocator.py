"""tune_malloc applies glibc settings only where it may: on glibc, unless opted out or the
user set glibc's own MALLOC_* variables. Each case runs in a fresh interpreter, since the
settings are process-wide."""

import os
import subprocess
import sys

import pytest

CODE = "from palm_rlhf.cli.allocator import tune_malloc; print(tune_malloc())"


def run(extra_env: dict) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("PALM_RLHF_TUNE_MALLOC", None)
    env.update(extra_env)
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_applies_on_glibc_and_respects_opt_outs():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not a glibc system")
    assert run({}) == "True"
    assert run({"PALM_RLHF_TUNE_MALLOC": "0"}) == "False"
    assert run({"MALLOC_ARENA_MAX": "2"}) == "False"
    assert run({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}) == "False"


def test_console_entry_point_is_the_tuning_one():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "palm-rlhf"]
    assert script.value == "palm_rlhf.cli.main:console_main"
