"""Every ```python block in README.md and docs/*.md runs, top to bottom; every command they show
is in the one dialect (`palm-rlhf CMD --config PRESET key=value ...`).

Blocks of one file share a namespace (a later block may use names from an
earlier one) and run in a fresh temporary directory, so examples that save
files leave nothing behind. A block preceded by a line `<!-- skip-test -->`
is not run: use it only for commands that need GPUs or a cluster.
"""

from __future__ import annotations

import logging
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


# the spellings the one dialect replaced: flags of the training commands, and renamed keys
TRAINING = re.compile(r"palm(?:-rlhf|_rlhf)\s+(pretrain|finetune|reward\s+train|ppo|grpo|rloo|reinforce-pp|tpo|flowrl|dpo)\b(.*)")
OLD_SPELLINGS = re.compile(r"(?<![\w.-])(--base|--data|--out|--set|--no-resume|--resume|--val-data|steps=|"
                           r"preferences=|base=|lr=|weight_decay=|warmup_steps=|min_lr_ratio=|clip_grad_norm=|"
                           r"max_grad_norm=|optimizer=|lora_r=|lora_alpha=|use_lora=|actor_scope=|val_data=|"
                           r"val_fraction=|heldout=|heldout_fraction=|eval_every=|eval_batches=|grad_accum=|"
                           r"minibatch_size=)")


def old_spellings(text: str) -> list[str]:
    """Lines that run a training command with a flag or key the dialect renamed."""
    found = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = TRAINING.search(line)
        if not match:
            continue
        command = match.group(2)
        j = i
        while command.rstrip().endswith("\\") and j + 1 < len(lines):  # a command continued on the next line
            j += 1
            command += " " + lines[j]
        hit = OLD_SPELLINGS.search(command.split("#", 1)[0])
        if hit:
            found.append(f"line {i + 1}: {hit.group(1)} in {line.strip()}")
    return found


def test_old_spelling_detector():
    assert old_spellings("palm-rlhf reward train --base a --data b") == ["line 1: --base in palm-rlhf reward train --base a --data b"]
    assert old_spellings("`palm-rlhf ppo --config ppo steps=3`")
    assert old_spellings("palm-rlhf dpo --config dpo \\\n    preferences=p.jsonl")
    assert not old_spellings("palm-rlhf ppo --config ppo max_steps=3 model=runs/sft  # not steps=")
    assert old_spellings("palm-rlhf dpo --config dpo lr=1e-3") and old_spellings("palm-rlhf ppo minibatch_size=8")
    assert not old_spellings("palm-rlhf ppo --config ppo optim.lr=1e-3 critic_lr=1e-3 eval.every=5")
    assert not old_spellings("palm-rlhf reward score runs/rm --data p.jsonl --out s.jsonl")
    assert not old_spellings("palm-rlhf feedback export --db f.sqlite --out prefs.jsonl")


EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
PAGES = DOCS + EXAMPLES + sorted(ROOT.glob("palm_rlhf/configs/*/*.yaml"))


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_commands_use_the_one_dialect(page):
    assert old_spellings(page.read_text()) == []


@pytest.mark.slow  # a page of examples may train a tiny model for several seconds
@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_doc_examples_run(doc, tmp_path, monkeypatch, caplog):
    blocks = python_blocks(doc.read_text())
    runnable = [(line, code) for line, code, skipped in blocks if not skipped]
    if not runnable:
        pytest.skip(f"{doc.name} has no runnable python blocks")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__doc_example__"}
    with caplog.at_level(logging.WARNING, logger="palm_rlhf"):
        for line, code in runnable:
            where = f"{doc.relative_to(ROOT)}:{line}"
            exec(compile(code, where, "exec"), namespace)  # a failure's traceback names the file and line
    if doc.name == "README.md":  # the first page a user runs warns about nothing they did not ask for
        assert [r.getMessage() for r in caplog.records if r.name.startswith("palm_rlhf")] == []


LINK = re.compile(r"\]\(([^)\s#]*\.md)#([^)\s]+)\)")


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for line in text.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


def test_heading_anchors_follow_github():
    assert heading_anchors("## Alignment presets: how they were tuned\n### Input checks (`x.py`)\n") == {
        "alignment-presets-how-they-were-tuned", "input-checks-xpy"}


MARKDOWN = sorted({*DOCS, ROOT / "CHANGELOG.md", *(ROOT / "benchmarks").glob("*.md")})


@pytest.mark.parametrize("page", MARKDOWN, ids=[str(p.relative_to(ROOT)) for p in MARKDOWN])
def test_links_to_sections_resolve(page):
    """A link `[...](other.md#section)` points at a heading that exists (sections move; links must follow)."""
    broken = []
    for target, anchor in LINK.findall(page.read_text()):
        path = (page.parent / target).resolve()
        if not path.exists() or anchor not in heading_anchors(path.read_text()):
            broken.append(f"{target}#{anchor}")
    assert broken == []
