"""ARCHITECTURE.md's layer rule, enforced on every import statement (parsed with `ast`):

    errors, ops (L0) -> model, data, runtime (L1) -> generation (L2) -> rl (L3)
    -> trainers (L4) -> cli, feedback, serving (L5)

A module imports only from its own layer or a lower one; nothing outside `cli`
imports `palm_rlhf.cli`; `feedback` and `serving` never import `trainers`; `model` imports
only the standard library, torch, einops, safetensors, `ops` and `errors`
(plus two documented exceptions, both core dependencies: PyYAML in
`model.presets`, which reads the YAML size presets, and tqdm in `model.palm`,
imported only when the seed's `generate(use_tqdm=True)` asks for a progress
bar). Imports inside functions count too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import palm_rlhf

PACKAGE = Path(palm_rlhf.__file__).parent
LAYERS = {"errors": 0, "ops": 0, "model": 1, "data": 1, "runtime": 1, "generation": 2, "rl": 3, "trainers": 4,
          "cli": 5, "feedback": 5, "serving": 5}
EXEMPT = {"palm_rlhf", "palm_rlhf.__main__"}  # the package root re-exports names from every layer
MODEL_THIRD_PARTY = {"torch", "einops", "safetensors"}
MODEL_EXTRA = {"palm_rlhf.model.presets": {"yaml"}, "palm_rlhf.model.palm": {"tqdm"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, name: str) -> list[tuple[int, str]]:
    """Absolute dotted names of everything `path` imports, with line numbers."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            if node.module is None or target == "palm_rlhf":
                # `from . import x` / `from palm_rlhf import x`: x may itself be a module
                found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return found


def layer_of(dotted: str) -> tuple[str, int] | None:
    parts = dotted.split(".")
    if parts[0] != "palm_rlhf" or len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return parts[1], LAYERS[parts[1]]


def all_modules():
    return [(module_name(p), p) for p in sorted(PACKAGE.rglob("*.py"))]


def violations_of(name: str, path: Path) -> list[str]:
    if name in EXEMPT:
        return []
    own_package, own_layer = layer_of(name)
    problems = []
    for line, target in imported_names(path, name):
        where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
        top = target.split(".")[0]
        if top == "palm_rlhf":
            if target in ("palm_rlhf", "palm_rlhf.__init__") or target.startswith("palm_rlhf.__"):
                problems.append(f"{where}: import the defining module, not the package root")
                continue
            info = layer_of(target)
            if info is None:
                # `from palm_rlhf import PaLM`-style names re-exported by the root
                problems.append(f"{where}: not a module of a known layer")
                continue
            package, layer = info
            if layer > own_layer:
                problems.append(f"{where}: layer {own_layer} ({own_package}) may not import layer {layer} ({package})")
            if package == "cli" and own_package != "cli":
                problems.append(f"{where}: nothing imports the CLI")
            if own_package in ("feedback", "serving") and package == "trainers":
                problems.append(f"{where}: the web apps never import trainers")
            if own_package == "model" and package not in ("model", "ops", "errors"):
                problems.append(f"{where}: model imports only ops and errors from palm_rlhf")
        elif own_package == "model":
            allowed = MODEL_THIRD_PARTY | MODEL_EXTRA.get(name, set())
            if top not in allowed and top not in sys.stdlib_module_names and top != "__future__":
                problems.append(f"{where}: model may use only the standard library and {sorted(allowed)}")
    return problems


def test_every_module_has_a_layer():
    unknown = [name for name, _ in all_modules() if name not in EXEMPT and layer_of(name) is None]
    assert not unknown, f"modules outside the layer map (add them to ARCHITECTURE.md and LAYERS): {unknown}"


def test_layer_rule():
    problems = [p for name, path in all_modules() for p in violations_of(name, path)]
    assert not problems, "layering violations:\n  " + "\n  ".join(problems)


def test_checker_catches_violations(tmp_path, monkeypatch):
    """The checker itself: each rule fires on a planted bad import (and relative imports resolve)."""
    fake = tmp_path / "palm_rlhf"
    for rel, source in {
        "model/bad.py": "from ..trainers import x\nimport numpy\nfrom ..data import tok\n",
        "model/fine.py": "import torch, math\nfrom ..ops import masked_mean\nfrom . import lora\n",
        "rl/bad.py": "def f():\n    from palm_rlhf.cli import main\n",
        "feedback/bad.py": "from palm_rlhf.trainers.reward import t\n",
        "data/bad.py": "from .. import PaLM\n",
    }.items():
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    found = {name: violations_of(name, path) for name, path in all_modules()}
    assert found["palm_rlhf.model.fine"] == []
    bad_model = " ".join(found["palm_rlhf.model.bad"])
    assert "layer 1 (model) may not import layer 4 (trainers)" in bad_model
    assert "model/bad.py:2 imports numpy" in bad_model and "palm_rlhf.data" in bad_model
    assert any("nothing imports the CLI" in p for p in found["palm_rlhf.rl.bad"])
    assert any("never import trainers" in p for p in found["palm_rlhf.feedback.bad"])
    assert found["palm_rlhf.data.bad"]  # `from .. import PaLM` reaches into the package root
