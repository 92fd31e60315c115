"""`distributed=fsdp` (FSDP2, sharded by block) for reward training, DPO, GRPO and PPO, on PaLM's
parallel block and on a Llama checkpoint's sequential block (RLOO and REINFORCE++ on the Llama,
and FlowRL and TPO there against DDP): 2 gloo processes train what 1 process trains with the same
global batch: every trained weight of final/ within 1e-4 (absolute; most agree to 1e-6, but Adam's
normalised step magnifies the reduction-order noise of a near-zero gradient entry), every logged
metric within 1e-4 (relative or absolute: DPO's held-out margins are differences of
log-probabilities summed over whole sequences) -- fp32 sums in another order, nothing more. And an
FSDP checkpoint resumes in one process to the same final/, and a one-process checkpoint continues
under FSDP (both directions for each trainer, on one family or the other).

All 2-process runs share ONE launch (`fsdp_worker.train_all`, under the NCCL rule: every collective of
ours goes through palm_rlhf.runtime.distributed); the one-process runs are in this process.

What is sharded: the policy (its frozen base, the LoRA scopes, hence the reference: the same model with
the actor scope off), PPO's value head, the trained reward model, and the frozen one PPO scores with
(PaLM's PPO runs take `reward_model=` beside `reward_fn=`); rollouts and DPO's evaluation run with the
model unsharded (`runtime.fsdp.gathered`), the learning forwards sharded.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from palm_rlhf.cli.main import main
from palm_rlhf.runtime.metrics import read_metrics
from tests.helpers.runs import assert_same_metrics
from tests.runtime import nccl_rule
from tests.runtime.dist_testing import run_workers

pytestmark = pytest.mark.slow

# trained weights, absolute: Adam's normalised step turns rounding noise in a near-zero gradient into
# up to lr per update, and PPO on the Llama takes 4 updates at lr 2e-3 (observed: 5.2e-5 on a 0.18 weight)
TOL = 1e-4
METRIC_TOL = 1e-4   # logged metrics, relative or absolute
RL = ["rollout_batch_size=3", "batch_size=8", "epochs=2", "max_new_tokens=5", "optim.lr=0.01", "sample_every=0",
      "reward_fn=fsdp_worker:ascii_fraction", "max_steps=2"]
ARGS = {
    "reward": (["reward", "train"], ["max_steps=2", "eval.every=2", "max_len=24", "optim.lr=0.003", "batch_size=8"]),
    # a kl_budget never reached, with the stop: checkpoints also hold the last weights within it (gathered, sharded)
    "dpo": (["dpo"], ["max_steps=2", "batch_size=4", "eval.every=2", "max_len=24", "optim.lr=0.01", "kl_samples=3",
                      "kl_max_new_tokens=4", "kl_budget=1000", "stop_at_kl_budget=true"]),
    # every weight trains: the reference is a frozen copy of the model, sharded the same way; PaLM only
    "dpo-full": (["dpo"], ["max_steps=2", "batch_size=4", "eval.every=2", "max_len=24", "optim.lr=0.003", "kl_samples=3",
                           "kl_max_new_tokens=4", "lora.r=0"]),
    "grpo": (["grpo"], [*RL, "prompts_per_step=4", "group_size=2"]),
    "ppo": (["ppo"], [*RL, "prompts_per_step=4", "kl_target=1.0", "kl_horizon=100", "kl_budget=1000",
                      "stop_at_kl_budget=true"]),
    # GRPO's loop plus a log Z network beside the policy (sharded as a module of its own), against DDP in the same
    # launch: FlowRL's 2 processes differ from 1 by ~1e-4 (log Z after one step) under DDP too, a FlowRL matter
    # (docs/scaling.md), not FSDP's
    "flowrl": (["flowrl"], [*RL, "prompts_per_step=4", "group_size=2", "log_z.hidden=16", "log_z.layers=1"]),
    # GRPO's loop, TPO's loss over whole groups; against DDP too: against 1 process the weights agree, but its
    # logged policy_loss (a mean of near-cancelling group terms) differed by more than 1e-4 at step 2
    "tpo": (["tpo"], [*RL, "prompts_per_step=4", "group_size=2"]),
    # the other RL trainers on the same shared code (rl_base): the Llama only
    "rloo": (["rloo"], [*RL, "prompts_per_step=4", "group_size=2"]),
    "reinforce-pp": (["reinforce-pp"], [*RL, "prompts_per_step=8", "group_size=1"]),
}
PALM_ONLY, LLAMA_ONLY = {"dpo-full"}, {"rloo", "reinforce-pp"}
AGAINST_DDP = ("flowrl", "tpo")  # on the Llama, FSDP against DDP in the same launch


def _inputs(tmp_path):
    from palm_rlhf.data.preferences import write_preferences
    from palm_rlhf.data.synthetic import rule_preference_pairs
    from palm_rlhf.model import PaLM
    from tests.helpers.families import make_hf_checkpoint
    from tests.helpers.hf_tokenizers import llama3

    torch.manual_seed(0)
    PaLM(num_tokens=256, dim=32, depth=2, heads=2, dim_head=16).save_pretrained(tmp_path / "palm")
    llama3(tmp_path / "llama")
    make_hf_checkpoint("llama", tmp_path / "llama", vocab=400, bos_token_id=0, eos_token_id=[1, 4], pad_token_id=None,
                       hidden_size=32, intermediate_size=64)
    (tmp_path / "prompts.txt").write_text("".join(f"{w} and\n" for w in
                                                  ["the", "cat", "sat", "on", "a", "red", "mat", "now"]))
    write_preferences(tmp_path / "prefs.jsonl", rule_preference_pairs(16, seed=0))


def _argv(tmp_path, family, algo, out, *extra):
    command, args = ARGS[algo]
    if algo == "ppo" and family == "palm":  # plus the reward model the palm-reward runs trained (sharded too)
        args = [*args, f"reward_model={tmp_path / 'palm-reward-one'}"]
    rl = algo in ("grpo", "ppo", "flowrl", "tpo", "rloo", "reinforce-pp")
    data = f"prompts={tmp_path / 'prompts.txt'}" if rl else f"data={tmp_path / 'prefs.jsonl'}"
    # the Llama's larger gradients at lr 0.01 clip half the ratios: a regime that magnifies float noise
    family_args = (["lora.targets=[q,v,up,down]", *["optim.lr=0.002"] * rl] if family == "llama"
                   else ["eos_token=10"] * rl)
    return [*command, f"model={tmp_path / family}", data, *args, *family_args, "progress=false", "save_every=1",
            f"out_dir={tmp_path / out}", *extra]


def _trained(run_dir, algo):
    return load_file(run_dir / "final" / ("model.safetensors" if algo in ("reward", "dpo-full") else "adapter.safetensors"))


def _same_run(one_dir, two_dir, algo):
    one, two = _trained(one_dir, algo), _trained(two_dir, algo)
    assert one.keys() == two.keys()
    if algo == "dpo-full":  # every parameter moved from the start (buffers do not train)
        from palm_rlhf.model import PaLM

        start = load_file(one_dir.parent / "palm" / "model.safetensors")
        moved = {k for k in start if (one[k] - start[k]).abs().max() > 1e-6}
        assert moved == {name for name, _ in PaLM.from_pretrained(one_dir.parent / "palm").named_parameters()}
    else:
        assert any(v.abs().max() > 1e-4 for k, v in one.items() if k.endswith("B")), "LoRA B starts at 0: nothing learned"
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=TOL, rtol=0, msg=f"{two_dir.name}: {k}")
    assert_same_metrics(read_metrics(one_dir), read_metrics(two_dir), rel=METRIC_TOL, abs=METRIC_TOL, what=two_dir.name)


def _rewind_to_step_1(run_dir, copy_to=None):
    """A run as if interrupted after step 1 (optionally a copy of it)."""
    if copy_to is not None:
        shutil.copytree(run_dir, copy_to)
        run_dir = copy_to
    shutil.rmtree(run_dir / "checkpoints" / "step_00000002")
    shutil.rmtree(run_dir / "final")
    (run_dir / "checkpoints" / "latest").write_text("step_00000001")
    return run_dir


# (family, trainer) whose one-process checkpoint continues under FSDP; the others' FSDP checkpoint in one process
ONE_TO_FSDP = {("palm", "grpo"), ("llama", "reward"), ("llama", "dpo"), ("llama", "ppo"), ("palm", "dpo-full")}


def test_fsdp_in_two_processes_equals_one_process_for_every_family(tmp_path):
    _inputs(tmp_path)
    runs = [(family, algo) for family in ("palm", "llama") for algo in ARGS
            if algo not in AGAINST_DDP and algo not in (LLAMA_ONLY if family == "palm" else PALM_ONLY)]
    for family, algo in runs:
        assert main(_argv(tmp_path, family, algo, f"{family}-{algo}-one")) == 0
    commands = [_argv(tmp_path, f, a, f"{f}-{a}-fsdp", "distributed=fsdp") for f, a in runs]
    commands += [_argv(tmp_path, "llama", algo, f"llama-{algo}-{how}", f"distributed={how}")
                 for algo in AGAINST_DDP for how in ("ddp", "fsdp")]
    for family, algo in sorted(ONE_TO_FSDP):
        resumed = _rewind_to_step_1(tmp_path / f"{family}-{algo}-one", tmp_path / f"{family}-{algo}-one-then-fsdp")
        commands.append(_argv(tmp_path, family, algo, resumed.name, "distributed=fsdp"))
    seen = run_workers(fsdp_worker_train_all(), 2, commands)  # ONE launch of 2 processes for all of them
    for where in seen:  # the rule was armed, and every collective of ours came through the runtime
        assert any(w.startswith(nccl_rule.RUNTIME_FILE) for w in where)

    for algo in AGAINST_DDP:
        _same_run(tmp_path / f"llama-{algo}-ddp", tmp_path / f"llama-{algo}-fsdp", algo)
    for family, algo in runs:
        one = tmp_path / f"{family}-{algo}-one"
        _same_run(one, tmp_path / f"{family}-{algo}-fsdp", algo)
        # checkpoints hold full tensors: they move between one process and FSDP, both ways
        if (family, algo) in ONE_TO_FSDP:
            resumed = tmp_path / f"{family}-{algo}-one-then-fsdp"
        else:
            resumed = _rewind_to_step_1(tmp_path / f"{family}-{algo}-fsdp")
            assert main(_argv(tmp_path, family, algo, resumed.name)) == 0
        expected, got = _trained(one, algo), _trained(resumed, algo)
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], atol=TOL, rtol=0, msg=f"{resumed.name}: {k}")


def fsdp_worker_train_all():
    from fsdp_worker import train_all

    return train_all
