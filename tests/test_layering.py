"""ARCHITECTURE.md's layer rule, enforced on every import statement (parsed with `ast`):

    errors, ops, files (L0) -> model, data, runtime, backends (L1) -> generation (L2) -> rl (L3)
    -> trainers (L4) -> cli, feedback, serving (L5)

A module imports only from its own layer or a lower one; nothing outside `cli`
imports `palm_rlhf.cli`; `feedback` and `serving` never import `trainers`; `model` imports
only the standard library, torch, einops, safetensors, `ops`, `files` and `errors`
(plus two documented exceptions, both core dependencies: PyYAML in
`model.presets`, which reads the YAML size presets, and tqdm in `model.palm`,
imported only when the seed's `generate(use_tqdm=True)` asks for a progress
bar). Imports inside functions count too.

Public seams: no package reads another package's private names (`obj._name` where `_name`
is defined only in another package, or `from ..pkg.mod import _name`), and private torch
APIs (`torch._x`, `torch.ops.mkldnn._x`, ...) appear only in the CPU backend.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import palm_rlhf

PACKAGE = Path(palm_rlhf.__file__).parent
LAYERS = {"errors": 0, "ops": 0, "files": 0, "model": 1, "data": 1, "runtime": 1, "backends": 1, "generation": 2,
          "rl": 3, "trainers": 4, "cli": 5, "feedback": 5, "serving": 5,
          "grpo": 5, "flowrl": 5, "tpo": 5}  # the seed's import paths (palm_rlhf_pytorch.grpo, ...): re-exports
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
            if own_package == "model" and package not in ("model", "ops", "files", "errors"):
                problems.append(f"{where}: model imports only ops, files and errors from palm_rlhf")
        elif own_package == "model":
            allowed = MODEL_THIRD_PARTY | MODEL_EXTRA.get(name, set())
            if top not in allowed and top not in sys.stdlib_module_names and top != "__future__":
                problems.append(f"{where}: model may use only the standard library and {sorted(allowed)}")
    return problems


PRIVATE_TORCH_HOME = "palm_rlhf.backends.cpu"
# torch's private tensor attributes that PRIVATE_TORCH_HOME may read (a name, not a `torch.` chain,
# so the private-name check below would take it for a package's own): a tensor's version counter
TORCH_TENSOR_PRIVATES = {"_version"}


def is_private(attr: str) -> bool:
    return attr.startswith("_") and not attr.endswith("__")


def private_definitions(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, assigned names and attributes
    (`self._x = ...`), arguments, and `as` aliases."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, ast.Store):
            names.add(node.id if isinstance(node, ast.Name) else node.attr)
        elif isinstance(node, ast.alias) and node.asname:
            names.add(node.asname)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if is_private(n)}


def dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def private_access_violations() -> list[str]:
    modules = [(name, path, ast.parse(path.read_text())) for name, path in all_modules() if name not in EXEMPT]
    defined: dict[str, set[str]] = {}
    for name, _, tree in modules:
        defined.setdefault(layer_of(name)[0], set()).update(private_definitions(tree))
    problems = []
    for name, path, tree in modules:
        own = layer_of(name)[0]
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(tree):
            attrs = []
            if isinstance(node, ast.Attribute) and is_private(node.attr):
                attrs = [node.attr]
                chain = dotted(node)
                if chain and chain.startswith("torch.") and not name.startswith(PRIVATE_TORCH_HOME):
                    problems.append(f"{where}:{node.lineno} uses {chain}: private torch APIs live in "
                                    f"{PRIVATE_TORCH_HOME} only")
            elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("palm_rlhf")):
                attrs = [a.name for a in node.names if is_private(a.name)]
            if name.startswith(PRIVATE_TORCH_HOME):
                attrs = [a for a in attrs if a not in TORCH_TENSOR_PRIVATES]
            for attr in attrs:
                owners = sorted(p for p, names in defined.items() if attr in names and p != own)
                if owners and attr not in defined.get(own, set()):
                    problems.append(f"{where}:{node.lineno} reads {attr}, private to {', '.join(owners)}: "
                                    f"give that package a public name for it")
    return problems


def test_no_package_reads_another_packages_private_names():
    problems = private_access_violations()
    assert not problems, "private cross-package access:\n  " + "\n  ".join(problems)


def test_every_module_has_a_layer():
    unknown = [name for name, _ in all_modules() if name not in EXEMPT and layer_of(name) is None]
    assert not unknown, f"modules outside the layer map (add them to ARCHITECTURE.md and LAYERS): {unknown}"


def test_layer_rule():
    problems = [p for name, path in all_modules() for p in violations_of(name, path)]
    assert not problems, "layering violations:\n  " + "\n  ".join(problems)


def plant(tmp_path, monkeypatch, files: dict[str, str]) -> None:
    """A fake package of these files, which the checkers then read instead of the real one."""
    fake = tmp_path / "palm_rlhf"
    for rel, source in files.items():
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)


def test_checker_catches_violations(tmp_path, monkeypatch):
    """The checker itself: each rule fires on a planted bad import (and relative imports resolve)."""
    plant(tmp_path, monkeypatch, {
        "model/bad.py": "from ..trainers import x\nimport numpy\nfrom ..data import tok\n",
        "model/fine.py": "import torch, math\nfrom ..ops import masked_mean\nfrom . import lora\n",
        "rl/bad.py": "def f():\n    from palm_rlhf.cli import main\n",
        "feedback/bad.py": "from palm_rlhf.trainers.reward import t\n",
        "data/bad.py": "from .. import PaLM\n",
    })
    found = {name: violations_of(name, path) for name, path in all_modules()}
    assert found["palm_rlhf.model.fine"] == []
    bad_model = " ".join(found["palm_rlhf.model.bad"])
    assert "layer 1 (model) may not import layer 4 (trainers)" in bad_model
    assert "model/bad.py:2 imports numpy" in bad_model and "palm_rlhf.data" in bad_model
    assert any("nothing imports the CLI" in p for p in found["palm_rlhf.rl.bad"])
    assert any("never import trainers" in p for p in found["palm_rlhf.feedback.bad"])
    assert found["palm_rlhf.data.bad"]  # `from .. import PaLM` reaches into the package root


def test_private_access_checker_catches_planted_reads(tmp_path, monkeypatch):
    """`model._hidden(...)` from rl and `model._require_scope` from generation (the seams this
    rule replaced), a private import across packages, and a private torch op outside the CPU
    backend are each reported; the same reads inside their own package are not."""
    plant(tmp_path, monkeypatch, {
        "model/palm.py": "class PaLM:\n    def _hidden(self, x):\n        return x\n"
                         "    def _require_scope(self, s):\n        self._hidden(s)\n",
        "model/helpers.py": "def _check(x):\n    return x\n",
        "rl/rollout.py": "def f(model, x):\n    return model._hidden(x)\n",
        "generation/generate.py": "from ..model.helpers import _check\n"
                                  "def g(model):\n    model._require_scope('a')\n",
        "ops.py": "import torch\ndef h(x, w):\n    return torch.ops.mkldnn._linear_pointwise(x, w)\n",
        "backends/cpu/onednn.py": "import torch\ndef h(x, w):\n    return torch.ops.mkldnn._linear_pointwise(x, w)\n",
    })
    found = "\n".join(private_access_violations())
    assert "rl/rollout.py:2 reads _hidden, private to model" in found
    assert "generation/generate.py:3 reads _require_scope, private to model" in found
    assert "generation/generate.py:1 reads _check, private to model" in found
    assert "ops.py:3 uses torch.ops.mkldnn._linear_pointwise" in found
    assert "model/palm.py" not in found and "backends/cpu" not in found


def test_model_layer_stays_small():
    """The size budget: `model/` plus `ops.py` at most 2,400 lines, no file over 400
    (ARCHITECTURE.md: a file past that is two ideas). PaLM alone took 1,600; the Llama family
    (its block, checkpoint mapping, export, grouped-query attention, rope scaling) about 600;
    the reward model's transformers head, padding on either side and its export about 60."""
    files = [*sorted((PACKAGE / "model").glob("*.py")), PACKAGE / "ops.py"]
    lines = {f.relative_to(PACKAGE).as_posix(): len(f.read_text().splitlines()) for f in files}
    assert sum(lines.values()) <= 2400, lines
    assert not {f: n for f, n in lines.items() if n > 400}
