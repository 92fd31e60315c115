"""The quickstart pipeline end to end at a tiny budget: every step runs, writes its marker,
plots and summary; a re-run resumes instead of redoing; bad options are clear errors."""

import json

import pytest

from palm_rlhf.cli.main import main
from palm_rlhf.errors import ConfigError
from palm_rlhf.trainers.quickstart import STEPS, QuickstartConfig


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="--algo"):
        QuickstartConfig(algo="a2c")
    with pytest.raises(ConfigError, match="--minutes"):
        QuickstartConfig(minutes=0)


@pytest.mark.slow
def test_quickstart_runs_every_step_and_resumes(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--minutes", "0.1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| mean reward-model score |" in printed and "summary.md" in printed
    for step in STEPS:
        assert (out / step / "done.json").is_file(), step
    eval_result = json.loads((out / "eval" / "done.json").read_text())
    before, after = eval_result["before"], eval_result["after"]
    # before any update the policy *is* the reference: KL exactly 0
    assert before["kl_to_reference"] == pytest.approx(0.0, abs=1e-4)
    assert after["kl_to_reference"] >= -1e-6
    summary = (out / "summary.md").read_text()
    for name in ("pretrain_loss.png", "reward_accuracy.png", "rl_reward.png", "rl_kl.png"):
        assert (out / "plots" / name).stat().st_size > 1000
        assert f"plots/{name}" in summary

    # a second run finds every step done and only reprints the report
    marker_times = {s: (out / s / "done.json").stat().st_mtime_ns for s in STEPS}
    assert main(["quickstart", "--out", str(out), "--minutes", "0.1", "--no-progress"]) == 0
    assert {s: (out / s / "done.json").stat().st_mtime_ns for s in STEPS} == marker_times


def test_preference_pairs_are_two_independent_samples_in_every_batch(tmp_path, monkeypatch):
    """Regression: with more prompts than one generation batch, the second sample of a prompt
    was drawn with the same seed as the first, so every pair was a tie and no data was left."""
    from palm_rlhf.data.preferences import read_preferences
    from palm_rlhf.data.tokenizer import ByteTokenizer
    from palm_rlhf.model.palm import PaLM
    from palm_rlhf.trainers.quickstart import Quickstart

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = PaLM(num_tokens=256, dim=32, depth=1, heads=2, dim_head=16)
    n = 128  # two batches of 64 prompts (the old code drew both samples of a prompt with one seed here)
    quickstart = Quickstart(QuickstartConfig(out=str(tmp_path), preference_prompts=n, minutes=10.0))
    monkeypatch.setattr(quickstart, "_load_policy", lambda: (model, ByteTokenizer()))
    monkeypatch.setattr(quickstart, "_prompts", lambda tokenizer, k, seed: [f"prompt {i}: " for i in range(k)])
    result = quickstart.step_preferences(tmp_path)
    # random weights sample arbitrary bytes: a pair ties only when neither response has a vowel
    # (about (251/256)^48 = 39% of pairs), never every pair
    assert result["pairs"] >= n / 3
    records = read_preferences(tmp_path / "train.jsonl") + read_preferences(tmp_path / "val.jsonl")
    assert len(records) == result["pairs"]
    assert all(r.chosen != r.rejected for r in records)
