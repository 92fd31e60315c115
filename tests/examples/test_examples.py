"""Every example in examples/ runs end to end in its --quick form, as a user would run it, and writes
a summary.json with finite before/after numbers; the arithmetic verifier scores by hand-worked cases."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.scripts import EXAMPLES, ROOT, load_script


def run_example(name: str, out: Path, *extra: str) -> tuple[str, dict]:
    """`python examples/NAME.py --quick --out OUT`; returns its stdout and OUT/summary.json."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--quick", "--out", str(out), *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    summary = json.loads((out / "summary.json").read_text())
    return proc.stdout, summary


def finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def load_example_module(name: str):
    load_script(EXAMPLES / "common.py")  # the examples' shared module, which they import as `common`
    return load_script(EXAMPLES / f"{name}.py")


def test_arithmetic_verifier_scores_by_hand():
    """"3+4=" -> "7": exact, 1.0.  "12+30=" (42) -> "41": "4" right, "1" wrong: 0.5 * 1/2 = 0.25.
    "12+30=" -> " 42 ": surrounding spaces are stripped, 1.0.  "5+5=" (10) -> "01": no digit in place, 0.0.
    "5+5=" -> "1": one of two digits in place, 0.5 * 1/2 = 0.25.  "0+0=" -> "x": 0.0."""
    grpo = load_example_module("grpo_verifiable")
    prompts = ["3+4=", "12+30=", "12+30=", "5+5=", "5+5=", "0+0="]
    answers = ["7", "41", " 42 ", "01", "1", "x"]
    assert grpo.check_answers(prompts, answers) == [1.0, 0.25, 1.0, 0.0, 0.25, 0.0]
    assert grpo.exact_answers(prompts, answers) == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]


@pytest.mark.slow
def test_python_api_example(tmp_path):
    stdout, s = run_example("python_api.py", tmp_path)
    assert "KL to the reference" in stdout
    assert finite(s["pretrain_val_loss"], s["reward_model_accuracy"], s["kl_to_reference"])
    for side in ("before", "after"):
        assert finite(s[side]["reward_model"], s[side]["vowel_share"])
        assert len(s[side]["samples"]) == 3
    assert s["ppo_steps"] == 3
    assert (tmp_path / "pretrain" / "final" / "config.json").is_file() and (tmp_path / "reward" / "final").is_dir()


@pytest.mark.slow
def test_grpo_verifiable_example(tmp_path):
    stdout, s = run_example("grpo_verifiable.py", tmp_path)
    assert "GRPO mean reward per" in stdout
    assert len(s["reward_curve"]) == 4 and finite(*s["reward_curve"])
    assert finite(s["before"]["mean"], s["after"]["mean"], s["exact_match"]["before"], s["exact_match"]["after"])
    assert all(0.0 <= x["score"] <= 1.0 for x in s["before"]["samples"] + s["after"]["samples"])


@pytest.mark.slow
def test_shakespeare_sentiment_example(tmp_path):
    """Runs on tinyshakespeare when ../shared/data has it, else on the built-in text (and says so)."""
    stdout, s = run_example("shakespeare_sentiment.py", tmp_path)
    assert "mean VADER sentiment" in stdout
    assert -1.0 <= s["sentiment_before"] <= 1.0 and -1.0 <= s["sentiment_after"] <= 1.0
    assert finite(s["pretrain_val_loss"], s["rl"]["reward_last_steps"], s["rl"]["kl_last_steps"])


@pytest.mark.slow
def test_shakespeare_falls_back_to_builtin_text_and_reuses_the_pretrained_model(tmp_path):
    missing = str(tmp_path / "missing.txt")
    stdout, s = run_example("shakespeare_sentiment.py", tmp_path, "--data", missing)
    assert "not found; pretraining on a small built-in text" in stdout
    assert s["data"] == "built-in text" and finite(s["pretrain_val_loss"])
    assert (tmp_path / "pretrain" / "final" / "config.json").is_file()
    # a re-run loads OUT/pretrain/final instead of pretraining again
    stdout, s = run_example("shakespeare_sentiment.py", tmp_path, "--data", missing)
    assert s["pretrain_val_loss"] is None and "not found" not in stdout


@pytest.mark.slow
def test_feedback_to_ppo_example(tmp_path):
    stdout, s = run_example("feedback_to_ppo.py", tmp_path)
    assert sum(s["judgements"].values()) == 40
    # ties are left out of the export; every A/B judgement of two different texts becomes one record
    lines = (tmp_path / "prefs.jsonl").read_text().splitlines()
    assert len(lines) == s["exported_records"] <= s["judgements"]["a"] + s["judgements"]["b"]
    assert finite(s["reward_model_accuracy"], s["rl"]["kl_last_steps"], *s["before"].values(), *s["after"].values())
