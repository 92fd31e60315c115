"""kl_budget / stop_at_kl_budget for PPO, GRPO and RLOO (REINFORCE++ shares RLOO's run, rl_base): the run control DPO has (runtime/budget.py), fed
each step's kl_ref (the rollouts' KL to the reference, which measures the policy that sampled them:
the one after step - 1 updates). Past the budget it warns once; with the stop the run ends at the
first step over it, the checkpoint holds where it stopped and final/ the last policy within it."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from palm_rlhf.errors import ConfigError
from palm_rlhf.trainers.grpo import GRPOConfig
from run_testing import make_trainer, write_inputs

# enough rows that the policy moves (and kl_ref grows) in a few tiny steps
MOVES = {"ppo": ["prompts_per_step=8", "batch_size=8", "max_new_tokens=8", "optim.lr=5e-2"],
         "grpo": ["prompts_per_step=4", "group_size=4", "batch_size=16", "max_new_tokens=8", "optim.lr=5e-2"],
         "rloo": ["prompts_per_step=4", "group_size=4", "batch_size=16", "max_new_tokens=8", "optim.lr=5e-2",
                  "kl_coef=0.05"]}


def _train(kind, tmp_path, out, *extra, max_steps=5):
    trainer = make_trainer(kind, tmp_path, out, *MOVES[kind], *extra, max_steps=max_steps)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()


def _adapter(directory):
    return load_file(directory / "adapter.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_checks():
    with pytest.raises(ConfigError, match="kl_budget=0.0 must be > 0"):
        GRPOConfig(kl_budget=0.0)
    with pytest.raises(ConfigError, match="stop_at_kl_budget=true needs kl_budget"):
        GRPOConfig(stop_at_kl_budget=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ppo", "grpo", "rloo"])
def test_stop_at_kl_budget_keeps_the_last_policy_within_it_and_resumes_with_it(tmp_path, kind, caplog):
    write_inputs(tmp_path)
    free = _train(kind, tmp_path, "free", "save_every=1", "keep_last=5")
    kl = [row["kl_ref"] for row in free]  # kl[i]: the policy after i updates
    assert abs(kl[0]) < 1e-5  # a fresh scope is its reference (up to the sampler's float error)
    budget = max(kl[:2]) + 1e-3  # the first two policies within; a later one over
    first_over = next((i for i, v in enumerate(kl) if v > budget), None)
    assert first_over is not None and 2 <= first_over <= 3, kl

    with caplog.at_level(logging.WARNING):
        stopped = _train(kind, tmp_path, "stop", f"kl_budget={budget}", "stop_at_kl_budget=true")
    # the step that measured the policy over the budget is the last: it still learned (the checkpoint)
    assert [row["step"] for row in stopped] == list(range(1, first_over + 2))
    assert [row["kl_ref"] for row in stopped] == kl[:first_over + 1]  # the budget only watches
    assert all(row["kl_budget"] == budget for row in stopped)
    warned = [r.getMessage() for r in caplog.records if "passed kl_budget" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"{kind} step {first_over + 1}: kl_ref")  # its metrics row
    assert "stopping here (stop_at_kl_budget=true)" in warned[0]

    run, ckpts = tmp_path / "stop", tmp_path / "free" / "checkpoints"
    kept = first_over - 1  # the last policy measured within the budget (after `kept` updates)
    assert _same(_adapter(run / "final"), _adapter(ckpts / f"step_{kept:08d}"))
    assert json.loads((run / "final" / "run.json").read_text())["policy_step"] == kept
    stop_ckpt = run / "checkpoints" / f"step_{first_over + 1:08d}"
    assert _same(_adapter(stop_ckpt), _adapter(ckpts / f"step_{first_over + 1:08d}"))  # where it stopped

    # the same command, one step further, resumes where it stopped: the kept policy travelled in the checkpoint
    again = make_trainer(kind, tmp_path, "stop", *MOVES[kind], f"kl_budget={budget}", "stop_at_kl_budget=true",
                         max_steps=first_over + 2)
    try:
        again.setup()
        assert again.budget.within["step"] == kept
        rows = again.train()
    finally:
        again.cleanup()
    assert [row["step"] for row in rows] == [first_over + 2]
    if kl[first_over + 1] > budget:  # still over: it stops again, final/ is the same kept policy
        assert _same(_adapter(run / "final"), _adapter(ckpts / f"step_{kept:08d}"))
    else:  # back within: a run that ends within its budget keeps its last policy
        assert _same(_adapter(run / "final"), _adapter(ckpts / f"step_{first_over + 2:08d}"))


@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_a_budget_without_the_stop_only_warns_and_an_untrained_final_is_said(tmp_path, kind, caplog):
    write_inputs(tmp_path)
    with caplog.at_level(logging.WARNING):
        history = _train(kind, tmp_path, "warn", "kl_budget=1e-4", max_steps=3)
    assert len(history) == 3  # no stop: it only warns, once
    warned = [r.getMessage() for r in caplog.records if "passed kl_budget" in r.getMessage()]
    assert len(warned) == 1 and "or set stop_at_kl_budget=true to stop at the budget" in warned[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        stopped = _train(kind, tmp_path, "stop", "kl_budget=1e-4", "stop_at_kl_budget=true", max_steps=3)
    assert len(stopped) == 2  # step 1's rollouts measure the start (KL 0, within), step 2's are over
    untrained = [r.getMessage() for r in caplog.records if "starting policy, untrained" in r.getMessage()]
    assert len(untrained) == 1 and "raise kl_budget" in untrained[0]
    assert json.loads((tmp_path / "stop" / "final" / "run.json").read_text())["policy_step"] == 0
    assert all(not v.any() for k, v in _adapter(tmp_path / "stop" / "final").items() if k.endswith("B"))
