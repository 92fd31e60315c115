"""DPO reports its drift from the reference (kl_ref every eval.every, a budget that warns and can
stop the run) and follows the shared warmup + cosine schedule."""

import json
import logging
import math

import pytest
import torch

from palm_rlhf.data.synthetic import rule_preference_pairs
from palm_rlhf.data.tokenizer import ByteTokenizer
from palm_rlhf.errors import ConfigError
from palm_rlhf.model import PaLM
from palm_rlhf.model.checkpoint import load_adapter
from palm_rlhf.runtime.optim import warmup_cosine
from palm_rlhf.trainers.dpo import DPOConfig, DPOTrainer
from rl_fixtures import pretrained_tiny_state, tiny_model  # noqa: F401

TRAIN, HELDOUT = rule_preference_pairs(64, seed=0), rule_preference_pairs(8, seed=1)


def nested(flat: dict) -> dict:
    """{"optim.lr": 1} -> {"optim": {"lr": 1}}: dotted keys as the CLI takes them."""
    out: dict = {}
    for key, value in flat.items():
        *groups, leaf = key.split(".")
        node = out
        for g in groups:
            node = node.setdefault(g, {})
        node[leaf] = value
    return out


def make(tmp_path, model, **overrides):
    overrides = {k.replace("__", "."): v for k, v in overrides.items()}  # optim__lr=... -> optim.lr
    config = DPOConfig(**nested({"out_dir": str(tmp_path / "dpo"), "max_steps": 6, "batch_size": 8,
                                 "optim.lr": 3e-2, "eval.every": 3, "max_len": 40, "kl_samples": 4,
                                 "kl_max_new_tokens": 8, "optim.warmup": 2, "progress": False, **overrides}))
    return DPOTrainer(config, model=model, tokenizer=ByteTokenizer(), train_records=TRAIN,
                      heldout_records=HELDOUT).setup()


def test_config_checks():
    with pytest.raises(ConfigError, match="kl_budget"):
        DPOConfig(kl_budget=0.0)
    with pytest.raises(ConfigError, match="stop_at_kl_budget=true needs kl_budget"):
        DPOConfig(stop_at_kl_budget=True)
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        DPOConfig(optim={"min_lr_ratio": 2.0})
    with pytest.raises(ConfigError, match=r"actor_adapter needs a LoRA actor scope \(lora.r > 0"):
        DPOConfig(lora={"r": 0}, actor_adapter="runs/sft/final/adapter.safetensors")


def test_lora_r_0_trains_every_weight_against_a_frozen_copy(tmp_path, tiny_model):
    start = {k: v.detach().clone() for k, v in tiny_model.named_parameters()}  # weights, not buffers
    trainer = make(tmp_path, tiny_model, lora__r=0)
    assert trainer.reference.kind == "frozen_copy" and not tiny_model.finetune_modules  # no LoRA scope
    assert trainer.measure_kl(seed=0).mean == 0.0
    history = trainer.train()
    trainer.cleanup()
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as its reference
    assert history[-1]["kl_ref"] > 0.0
    final = PaLM.from_pretrained(tmp_path / "dpo" / "final").state_dict()
    moved = [k for k in start if not torch.equal(final[k], start[k])]
    assert len(moved) == len(start), set(start) - set(moved)  # every weight trained
    reference = trainer.reference.model.state_dict()
    assert all(torch.equal(reference[k], start[k]) for k in start)  # the reference did not move
    assert json.loads((tmp_path / "dpo" / "final" / "run.json").read_text())["scope"] is None


def test_kl_ref_is_zero_at_the_start_and_logged_every_eval(tmp_path, tiny_model):
    trainer = make(tmp_path, tiny_model)
    start = trainer.measure_kl(seed=0)
    assert start.mean == 0.0 and start.sequences == 4  # a fresh scope: the policy is its reference
    history = trainer.train()
    trainer.cleanup()
    evals = [row for row in history if "kl_ref" in row]
    assert [row["step"] for row in evals] == [3, 6] and "kl_budget" not in evals[0]
    assert evals[-1]["kl_ref"] > 0.0  # three steps at lr 3e-2 moved the policy
    # the logged figure is the measurement itself (same samples: the seed is c.seed + step)
    assert trainer.measure_kl(seed=6).mean == pytest.approx(evals[-1]["kl_ref"], rel=1e-6)
    logged = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kl_ref"] for r in logged if "kl_ref" in r] == [row["kl_ref"] for row in evals]


def test_learning_rate_warms_up_then_decays(tmp_path, tiny_model):
    trainer = make(tmp_path, tiny_model, kl_samples=0)
    history = trainer.train()
    trainer.cleanup()
    expected = [3e-2 * warmup_cosine(s, 2, 6, 0.1) for s in range(6)]  # 0.5, 1, 1, 0.775, 0.325, 0.1 x lr
    assert [row["lr"] for row in history] == pytest.approx(expected)
    assert not any("kl_ref" in row for row in history)  # kl_samples=0: no kl_ref


def test_evaluation_does_not_change_what_trains(tmp_path, pretrained_tiny_state):
    """How often and on how many prompts kl_ref is measured (it samples) leaves the training steps as they
    were: runs that differ only there end bit for bit the same, so a budget changes only where they stop."""
    config, state = pretrained_tiny_state

    def weights(name, **evaluation):
        trainer = make(tmp_path / name, _pretrained(config, state), lora__r=0, optim__lr=3e-3, **evaluation)
        history = trainer.train()
        trainer.cleanup()
        return [row["loss"] for row in history], PaLM.from_pretrained(tmp_path / name / "dpo" / "final").state_dict()

    losses, final = weights("every3", eval__every=3, kl_samples=4)
    for name, evaluation in {"every2": {"eval__every": 2, "kl_samples": 8}, "none": {"kl_samples": 0}}.items():
        other_losses, other = weights(name, **evaluation)
        assert other_losses == losses, name
        assert all(torch.equal(other[k], final[k]) for k in final), name


def _pretrained(config, state) -> PaLM:
    model = PaLM(**config)
    model.load_state_dict(state)
    return model


def test_budget_warns_and_stop_at_kl_budget_ends_the_run(tmp_path, tiny_model, pretrained_tiny_state, caplog):
    warm = make(tmp_path / "warn", tiny_model, kl_budget=1e-6)
    with caplog.at_level(logging.WARNING, logger="palm_rlhf.trainers.dpo"):
        history = warm.train()
    warm.cleanup()
    assert len(history) == 6 and history[2]["kl_budget"] == 1e-6
    warnings = [r.getMessage() for r in caplog.records if "passed kl_budget" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("dpo step 3: kl_ref")  # once, at the first eval over

    config, state = pretrained_tiny_state
    stop = make(tmp_path / "stop", _pretrained(config, state), kl_budget=1e-6, stop_at_kl_budget=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="palm_rlhf.trainers.dpo"):
        history = stop.train()
    stop.cleanup()
    assert [row["step"] for row in history] == [1, 2, 3]  # stopped at the first eval over budget
    untrained = [r.getMessage() for r in caplog.records if "starting policy, untrained" in r.getMessage()]
    assert len(untrained) == 1 and "evaluate sooner (eval.every=3 now)" in untrained[0]
    run = json.loads((tmp_path / "stop" / "dpo" / "final" / "run.json").read_text())
    assert run["steps"] == 3
    assert run["policy_step"] == 0  # the first evaluation was already over: final/ is the start policy
    assert stop.measure_kl(seed=0).mean == 0.0  # the trainer's model too: a fresh scope is its reference
    assert _scope(tmp_path / "stop" / "dpo" / "final", config, state) == pytest.approx(
        _scope(None, config, state, fresh=stop))


def _scope(adapter, config, state, fresh=None) -> list:
    """The actor scope's weights, flattened: of an adapter directory loaded into the base, or of a
    scope as a fresh run starts it (`fresh`: a trainer whose config gives the scope's rank)."""
    model = _pretrained(config, state)
    if adapter is not None:
        load_adapter(model, adapter / "adapter.safetensors", scope="actor")
    else:
        torch.manual_seed(fresh.config.seed)
        model.add_finetune_params("actor", lora_r=fresh.config.lora.r, lora_alpha=fresh.config.lora.alpha)
    return torch.cat([v.flatten() for _, v in sorted(model.finetune_modules["actor"].state_dict().items())]).tolist()


def _budget_after_step_3(tmp_path, config, state, **overrides) -> float:
    """The same 9-step run without a budget (run dir tmp_path/free) gives the kl_ref of each evaluation;
    the budget goes between them: step 3 within, steps 6 and 9 over."""
    free = make(tmp_path / "free", _pretrained(config, state), max_steps=9, save_every=3, keep_last=3, **overrides)
    kl = {row["step"]: row["kl_ref"] for row in free.train() if "kl_ref" in row}
    free.cleanup()
    assert kl[3] < min(kl[6], kl[9]), kl
    return (kl[3] + min(kl[6], kl[9])) / 2


def test_stop_at_kl_budget_keeps_the_last_policy_within_it_and_resumes_with_it(tmp_path, pretrained_tiny_state):
    config, state = pretrained_tiny_state
    budget = _budget_after_step_3(tmp_path, config, state)
    stop = make(tmp_path / "stop", _pretrained(config, state), max_steps=9, save_every=3, kl_budget=budget,
                stop_at_kl_budget=True)
    assert [row["step"] for row in stop.train()][-1] == 6  # stopped at the first evaluation over the budget
    stop.cleanup()
    run_dir = tmp_path / "stop" / "dpo"
    step3 = _scope(tmp_path / "free" / "dpo" / "checkpoints" / "step_00000003", config, state)
    assert _scope(run_dir / "final", config, state) == step3  # final/: the policy measured within it
    assert _scope(run_dir / "checkpoints" / "step_00000006", config, state) != step3  # the checkpoint: where it stopped
    assert json.loads((run_dir / "final" / "run.json").read_text())["policy_step"] == 3

    # rerunning the command resumes from step 6, trains on and stops at 9 (still over): final/ is step 3's again
    again = make(tmp_path / "stop", _pretrained(config, state), max_steps=9, save_every=3, kl_budget=budget,
                stop_at_kl_budget=True)
    assert [row["step"] for row in again.train()] == [7, 8, 9]
    again.cleanup()
    assert _scope(run_dir / "final", config, state) == step3


def test_lora_r_0_stops_at_the_budget_with_the_whole_model_rolled_back(tmp_path, pretrained_tiny_state):
    config, state = pretrained_tiny_state

    def weights(directory):
        return PaLM.from_pretrained(directory).state_dict()

    budget = _budget_after_step_3(tmp_path, config, state, lora__r=0, optim__lr=3e-3)
    stop = make(tmp_path / "stop", _pretrained(config, state), max_steps=9, save_every=3, kl_budget=budget,
                stop_at_kl_budget=True, lora__r=0, optim__lr=3e-3)
    assert [row["step"] for row in stop.train()][-1] == 6
    stop.cleanup()
    step3 = weights(tmp_path / "free" / "dpo" / "checkpoints" / "step_00000003")
    final = weights(tmp_path / "stop" / "dpo" / "final")
    assert all(torch.equal(final[k], step3[k]) for k in step3)  # final/: the whole model of step 3
    stopped = weights(tmp_path / "stop" / "dpo" / "checkpoints" / "step_00000006")
    assert not all(torch.equal(stopped[k], step3[k]) for k in step3)  # the checkpoint: where it stopped


def test_the_dpo_full_preset_is_the_dpo_preset_training_every_weight():
    """configs/rl/dpo-full.yaml differs from dpo.yaml only where training every weight needs it (its
    budget too: it reaches 90% further from the start), so a change to one preset's loss reaches both."""
    from palm_rlhf.runtime.config import config_to_dict, load_config

    lora, full = (config_to_dict(load_config(DPOConfig, name)) for name in ("dpo", "dpo-full"))
    def flat(d, prefix=""):
        return {k: v for key, value in d.items()
                for k, v in (flat(value, f"{prefix}{key}.").items() if isinstance(value, dict)
                             else [(prefix + key, value)])}

    lora, full = flat(lora), flat(full)
    differ = {k for k in lora if lora[k] != full[k]}
    assert differ == {"lora.r", "optim.lr", "max_steps", "kl_samples", "save_every", "kl_budget"}
    assert full["lora.r"] == 0 and full["optim.lr"] < lora["optim.lr"] and full["kl_samples"] > lora["kl_samples"]
    assert full["kl_budget"] > lora["kl_budget"]
