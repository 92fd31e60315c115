"""The README's promise, checked for every trainer: the same key means the same thing everywhere.

One table, eight trainers (pretrain, finetune, reward, PPO, GRPO, RLOO, REINFORCE++, DPO), built the
way the CLI builds them (`run_testing`):

* `optim.*` reaches THE optimizer (its lr, betas, weight decay) and THE step (max_grad_norm);
* `batch_size` is examples per optimizer step over all processes: 2 gloo processes at batch_size=8
  take the same steps as 1 process, and `micro_batch_size` x accumulation == one big batch;
* an old spelling builds the same config as the new key, with one notice naming the new key.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from palm_rlhf.runtime.config import config_to_dict, load_config
from palm_rlhf.runtime.metrics import read_metrics
from tests.helpers.runs import assert_same_metrics
from run_testing import config_and_trainer_classes, make_trainer, overrides, write_inputs
from tests.runtime.dist_testing import run_workers

KINDS = ("pretrain", "finetune", "reward", "ppo", "grpo", "rloo", "reinforce-pp", "tpo", "flowrl", "dpo")

# one optimizer step of 8 examples: sequences, SFT examples, pairs, rollout rows (PPO: 8 prompts;
# GRPO, RLOO, REINFORCE++-baseline: 4 prompts x 2 samples), pairs
EIGHT = {"pretrain": ["batch_size=8"], "finetune": ["batch_size=8"], "reward": ["batch_size=8", "dropout=0"],
         "ppo": ["prompts_per_step=8", "batch_size=8"], "grpo": ["prompts_per_step=4", "group_size=2", "batch_size=8"],
         "rloo": ["prompts_per_step=4", "group_size=2", "batch_size=8"],
         "reinforce-pp": ["prompts_per_step=4", "group_size=2", "batch_size=8"],
         "tpo": ["prompts_per_step=4", "group_size=2", "batch_size=8"],
         "flowrl": ["prompts_per_step=4", "group_size=2", "batch_size=8"], "dpo": ["batch_size=8"]}
# what each trainer trains, as final/ writes it
TRAINED = {"pretrain": "model", "finetune": "adapter", "reward": "model", "ppo": "adapter", "grpo": "adapter",
           "rloo": "adapter", "reinforce-pp": "adapter", "tpo": "adapter", "flowrl": "adapter", "dpo": "adapter"}


def _run(kind, tmp_path, out, *extra, max_steps=2):
    trainer = make_trainer(kind, tmp_path, out, *EIGHT[kind], *extra, max_steps=max_steps)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    return trainer


def _trained(kind, run_dir: Path) -> dict:
    return load_file(run_dir / "final" / f"{TRAINED[kind]}.safetensors")



def _assert_same_run(kind, one: Path, other: Path, atol: float = 1e-5) -> None:
    a, b = _trained(kind, one), _trained(kind, other)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=atol, rtol=0, msg=f"{kind}: {k}")
    assert_same_metrics(read_metrics(one), read_metrics(other), rel=1e-4, abs=1e-5, skip={"grad_norm"}, what=kind)


@pytest.mark.parametrize("kind", KINDS)
def test_optim_keys_reach_the_optimizer_and_the_step(tmp_path, kind):
    write_inputs(tmp_path)
    trainer = make_trainer(kind, tmp_path, "optim", "optim.lr=0.0123", "optim.betas=[0.8,0.9]",
                           "optim.weight_decay=0.01", "optim.max_grad_norm=0.7", "optim.warmup=0",
                           *(["critic_lr=0.02"] if kind == "ppo" else []), max_steps=1)
    try:
        trainer.setup()
        groups = trainer.optimizer.param_groups
        critic = {id(p) for p in trainer.actor_critic.critic_parameters()} if kind == "ppo" else set()
        for g in groups:
            is_critic = any(id(p) in critic for p in g["params"])
            assert g["initial_lr"] == (0.02 if is_critic else 0.0123) and g["betas"] == (0.8, 0.9)
            assert g["weight_decay"] == (0.01 if g["params"][0].ndim >= 2 else 0.0)  # matrices only
        assert trainer.run.stepper_.clip_grad_norm == 0.7
        trainer.train()
        assert trainer.run.history[0]["lr"] == pytest.approx(0.0123)  # no warmup: step 1 takes the peak lr
    finally:
        trainer.cleanup()


def _in_group(rank, world, tmp):
    """Every kind's batch_size=8 run, one after another, in this rank of one process group."""
    torch.set_num_threads(1)
    for kind in KINDS:
        _run(kind, Path(tmp), f"{kind}-two")
    return rank


class Runs:
    """The runs these tests compare, on one set of inputs, each made once per module:
    `one(kind)`: batch_size=8 in one process; `two(kind)`: the same in 2 gloo processes, every
    kind in ONE launch (starting the processes and the group costs more than a tiny run)."""

    def __init__(self, tmp: Path):
        self.tmp, self.done = tmp, set()
        write_inputs(tmp)

    def one(self, kind) -> Path:
        if (kind, "one") not in self.done:
            _run(kind, self.tmp, f"{kind}-one")
            self.done.add((kind, "one"))
        return self.tmp / f"{kind}-one"

    def two(self, kind) -> Path:
        if "two" not in self.done:
            assert run_workers(_in_group, 2, str(self.tmp)) == [0, 1]
            self.done.add("two")
        return self.tmp / f"{kind}-two"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("shared-keys"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_micro_batches_times_accumulation_equal_one_big_batch(runs, kind):
    """batch_size=8 in one forward, and in 4 micro-batches of 2 (accumulation 4): the same two steps."""
    small = _run(kind, runs.tmp, f"{kind}-small", "micro_batch_size=2")
    assert small.run.stepper_.grad_accum == 4
    _assert_same_run(kind, runs.one(kind), runs.tmp / f"{kind}-small")


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_at_batch_size_8_take_the_steps_of_one(runs, kind):
    """2 gloo processes (4 examples each per step) and 1 process, both at batch_size=8: the same run."""
    _assert_same_run(kind, runs.one(kind), runs.two(kind))


# kind, old spellings, the same in the new keys
OLD_AND_NEW = [
    ("pretrain", ["data.val_fraction=0.2", "eval_every=3", "eval_batches=2", "optim.warmup_steps=3",
                  "optim.clip_grad_norm=0.5", "optim.beta2=0.99", "grad_accum=2"],
     ["eval.fraction=0.2", "eval.every=3", "eval.samples=4", "optim.warmup=3", "optim.max_grad_norm=0.5",
      "optim.betas=[0.9,0.99]", "batch_size=4", "micro_batch_size=2"]),
    ("finetune", ["val_fraction=0.2", "val_data=held.jsonl", "eval_every=3", "grad_accum=4"],
     ["eval.fraction=0.2", "eval.data=held.jsonl", "eval.every=3", "batch_size=8", "micro_batch_size=2"]),
    ("reward", ["lr=0.01", "weight_decay=0.1", "warmup_steps=3", "min_lr_ratio=0.2", "clip_grad_norm=0.5",
                "optimizer=lion", "use_lora=false", "lora_r=4", "lora_alpha=16", "val_data=held.jsonl",
                "val_fraction=0.2", "eval_every=7", "grad_accum=2"],
     ["optim.lr=0.01", "optim.weight_decay=0.1", "optim.warmup=3", "optim.min_lr_ratio=0.2",
      "optim.max_grad_norm=0.5", "optim.name=lion", "lora.r=0", "lora.alpha=16", "eval.data=held.jsonl",
      "eval.fraction=0.2", "eval.every=7", "batch_size=4", "micro_batch_size=2"]),
    ("dpo", ["lr=0.01", "weight_decay=0.1", "warmup_steps=3", "min_lr_ratio=0.2", "max_grad_norm=null",
             "lora_r=4", "lora_alpha=16", "actor_scope=pol", "heldout=held.jsonl", "heldout_fraction=0.2",
             "eval_every=7", "steps=9"],
     ["optim.lr=0.01", "optim.weight_decay=0.1", "optim.warmup=3", "optim.min_lr_ratio=0.2",
      "optim.max_grad_norm=0", "lora.r=4", "lora.alpha=16", "lora.scope=pol", "eval.data=held.jsonl",
      "eval.fraction=0.2", "eval.every=7", "max_steps=9"]),
    ("ppo", ["lr=0.01", "weight_decay=0.1", "max_grad_norm=0.5", "lora_r=4", "lora_alpha=16", "minibatch_size=4"],
     ["optim.lr=0.01", "optim.weight_decay=0.1", "optim.max_grad_norm=0.5", "lora.r=4", "lora.alpha=16",
      "batch_size=4"]),
    ("grpo", ["lr=0.01", "max_grad_norm=0.5", "lora_r=4", "actor_scope=pol", "minibatch_size=4"],
     ["optim.lr=0.01", "optim.max_grad_norm=0.5", "lora.r=4", "lora.scope=pol", "batch_size=4"]),
]


@pytest.mark.parametrize("kind, old, new", OLD_AND_NEW, ids=[row[0] for row in OLD_AND_NEW])
def test_an_old_key_builds_what_its_new_key_builds_with_one_notice(tmp_path, caplog, kind, old, new):
    config_cls, _ = config_and_trainer_classes(kind)
    base = [o for o in overrides(kind, tmp_path, "x") if not o.startswith(("batch_size=", "eval.", "optim.", "lora."))]
    given = ["batch_size=2"] if any(k.startswith("grad_accum=") for k in old) else []  # per process, as it was
    with caplog.at_level(logging.WARNING, logger="palm_rlhf.runtime.config"):
        from_old = load_config(config_cls, None, base + given + old)
    from_new = load_config(config_cls, None, base + new)
    assert config_to_dict(from_old) == config_to_dict(from_new)
    notices = [r.getMessage() for r in caplog.records if "is deprecated" in r.getMessage()]
    assert len(notices) == len(old)  # one line per old spelling, naming what to write instead
    for key in (k.split("=")[0] for k in old):
        assert any(line.startswith(f"config key '{key}' is deprecated; write ") for line in notices), key


@pytest.mark.parametrize("kind", KINDS)
def test_old_keyword_arguments_build_the_same_config_in_python(kind):
    config_cls, _ = config_and_trainer_classes(kind)
    old = {"eval_every": 7} if kind in ("pretrain", "finetune", "reward", "dpo") else {"minibatch_size": 4}
    new = {"eval": {"every": 7}} if "eval_every" in old else {"batch_size": 4}
    if kind in ("tpo", "flowrl"):  # their batches hold whole groups
        old["group_size"] = new["group_size"] = 2
    if kind not in ("pretrain", "finetune"):  # their lr was optim.lr already
        old["lr"], new["optim"] = 0.01, {"lr": 0.01}
    assert config_to_dict(config_cls(**old)) == config_to_dict(config_cls(**new))


def test_flash_attn_is_accepted_with_a_notice_and_changes_nothing(tmp_path, caplog):
    """model.flash_attn=true: attention always runs through SDPA, so the key only says so, once."""
    from palm_rlhf.trainers.pretrain import PretrainConfig

    with caplog.at_level(logging.WARNING, logger="palm_rlhf.trainers.base"):
        on = load_config(PretrainConfig, None, ["model.flash_attn=true"])
    notices = [r.getMessage() for r in caplog.records if "flash_attn" in r.getMessage()]
    assert len(notices) == 1 and "scaled_dot_product_attention" in notices[0]
    off = load_config(PretrainConfig, None, [])
    assert on.model.kwargs(256) == off.model.kwargs(256)  # the model built is the same
