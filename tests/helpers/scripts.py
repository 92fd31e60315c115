"""Scripts that live outside the package (benchmarks/*.py, examples/*.py), imported by file path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
EXAMPLES = ROOT / "examples"


def load_script(path: Path) -> ModuleType:
    """Import the script at `path` as the module named after its file (`benchmarks/train.py` -> `train`),
    the name its siblings import it by when it runs as `python benchmarks/...`: load a script's
    sibling modules first (`examples/common.py` before `examples/grpo_verifiable.py`). Loading the
    same file again returns the module already loaded."""
    path = Path(path).resolve()
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve() == path:
            return loaded
        raise RuntimeError(f"cannot load {path} as module {name!r}: {loaded!r} already has that name")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered before it runs, as `import` does (dataclasses look it up)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
