"""Every ```python block in README.md and docs/*.md runs, top to bottom.

Blocks of one file share a namespace (a later block may use names from an
earlier one) and run in a fresh temporary directory, so examples that save
files leave nothing behind. A block preceded by a line `<!-- skip-test -->`
is not run: use it only for commands that need GPUs or a cluster.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_MARK = "<!-- skip-test -->"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(first line number, code, skipped) for each ```python block."""
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 2  # 1-based line of the first code line
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        blocks.append((line, match.group(1), before == SKIP_MARK))
    return blocks


DOCS = sorted(p for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")] if p.exists())


def test_block_extraction():
    text = "intro\n```python\nx = 1\n```\n<!-- skip-test -->\n```python\nrun_on_gpus()\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n", False), (7, "run_on_gpus()\n", True)]


@pytest.mark.slow  # a page of examples may train a tiny model for several seconds
@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_doc_examples_run(doc, tmp_path, monkeypatch):
    blocks = python_blocks(doc.read_text())
    runnable = [(line, code) for line, code, skipped in blocks if not skipped]
    if not runnable:
        pytest.skip(f"{doc.name} has no runnable python blocks")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__doc_example__"}
    for line, code in runnable:
        where = f"{doc.relative_to(ROOT)}:{line}"
        exec(compile(code, where, "exec"), namespace)  # a failure's traceback names the file and line
