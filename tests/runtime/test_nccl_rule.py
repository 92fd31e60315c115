"""The NCCL rule on CPU (see nccl_rule.py): collectives only through runtime.distributed, on the
model's device; the helpers pick a device the group serves (CUDA under NCCL); and the DPO and reward trainers'
distributed paths run under the rule in 2 gloo processes, equal to 1 process (the RL trainers'
in tests/trainers/test_rl_distributed.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import nccl_rule
from dist_testing import run_workers
from palm_rlhf.runtime import distributed as rdist
from tests.helpers.processes import torchrun_under_nccl_rule
from tests.helpers.runs import assert_same_metrics


@pytest.fixture
def one_process_group():
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            yield
        finally:
            nccl_rule.uninstall()
            dist.destroy_process_group()


def test_the_rule_rejects_collectives_outside_the_runtime_and_tensors_off_the_model_device(one_process_group):
    nccl_rule.install("cpu")
    nccl_rule.seen.clear()
    with pytest.raises(nccl_rule.NCCLRuleError, match=r"all_reduce called from .*test_nccl_rule.py:\d+; "
                                                      r"collectives go through palm_rlhf.runtime.distributed"):
        dist.all_reduce(torch.ones(2))  # what rl_base and dpo did with CPU-built statistics
    assert rdist.all_reduce_sum({"a": 1.5, "b": 2}) == {"a": 1.5, "b": 2.0}
    assert [name for name, where, _ in nccl_rule.seen] == ["all_reduce"]
    assert nccl_rule.seen[0][1].startswith(nccl_rule.RUNTIME_FILE)

    nccl_rule.install("meta")  # a model on another device than the CPU tensors handed over
    with pytest.raises(nccl_rule.NCCLRuleError, match="on cpu but the model is on meta .*device type cpu"):
        rdist.all_reduce_sum(torch.ones(2))
    nccl_rule.uninstall()
    assert not hasattr(dist.all_reduce, "nccl_rule_wraps")


def test_collective_device_is_the_gpu_under_nccl_and_the_callers_where_the_group_serves_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(rdist, "group_devices", lambda: ("cuda",))  # NCCL
    assert rdist.collective_device() == torch.device("cuda", 3)
    assert rdist.collective_device("cpu") == torch.device("cuda", 3)  # a CPU tensor is copied to the GPU
    assert rdist.collective_device("cuda:3") == torch.device("cuda", 3)
    monkeypatch.setattr(rdist, "group_devices", lambda: ("cpu", "cuda"))  # gloo, or cpu:gloo,cuda:nccl
    assert rdist.collective_device() == torch.device("cpu")
    assert rdist.collective_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for a real NCCL group")
def test_helpers_under_a_real_nccl_group(tmp_path):
    """The bug this rule stands for, on the real thing: NCCL rejects a CPU tensor; the helpers take
    CPU tensors, numbers and CUDA tensors alike."""
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/init", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        assert rdist.group_devices() == ("cuda",)
        with pytest.raises(Exception, match="device type cpu"):
            dist.all_reduce(torch.ones(2))
        cpu = rdist.all_reduce_sum(torch.tensor([1.0, 2.0], dtype=torch.float64))
        assert cpu.device.type == "cpu" and cpu.tolist() == [1.0, 2.0]
        gpu = rdist.all_reduce_mean(torch.ones(3, device="cuda"))
        assert gpu.device == torch.device("cuda", 0) and gpu.tolist() == [1.0, 1.0, 1.0]
        assert rdist.all_reduce_sum({"a": 2.5}) == {"a": 2.5}
        rdist.barrier()
    finally:
        dist.destroy_process_group()


def test_group_devices_of_real_groups(one_process_group):
    assert rdist.group_devices() == ("cpu", "cuda")  # gloo serves both


def _reductions(rank: int, world: int):
    nccl_rule.install("cpu")
    stats = torch.tensor([1.0, 2.0], dtype=torch.float64) * (rank + 1)
    out = {"tensor": rdist.all_reduce_sum(stats), "dict": rdist.all_reduce_mean({"loss": rank + 1.0, "n": 2}),
           "list": rdist.all_reduce_sum([rank, 1]), "input_unchanged": stats.tolist(),
           "seen": [name for name, _, _ in nccl_rule.seen]}
    rdist.barrier()
    return out


@pytest.mark.slow
def test_reductions_of_tensors_lists_and_dicts_over_two_processes():
    ranks = run_workers(_reductions, 2)
    for rank, r in enumerate(ranks):
        assert r["tensor"].tolist() == [3.0, 6.0] and r["tensor"].dtype == torch.float64
        assert r["dict"] == {"loss": 1.5, "n": 2.0}
        assert r["list"] == [1.0, 2.0]
        assert r["input_unchanged"] == [1.0 * (rank + 1), 2.0 * (rank + 1)]
        assert r["seen"] == ["all_reduce"] * 3


# ---------------------------------------------------------------- the trainers' distributed paths under the rule

HERE = Path(__file__).resolve().parent
RL = ["rollout_batch_size=3", "batch_size=8", "epochs=2", "max_new_tokens=6", "eos_token=10", "optim.lr=0.01",
      "sample_every=0", "reward_fn=nccl_rule_rewards:ascii_fraction", "progress=false"]
DPO = ["max_steps=3", "batch_size=4", "eval.every=2", "max_len=24", "optim.lr=0.01"]
ARGS = {
    "ppo": ["max_steps=2", "prompts_per_step=8", "kl_target=1.0", "kl_horizon=100", *RL],
    "grpo": ["max_steps=2", "prompts_per_step=4", "group_size=2", *RL],
    "rloo": ["max_steps=2", "prompts_per_step=4", "group_size=2", *RL],
    "reinforce-pp": ["max_steps=2", "prompts_per_step=8", "group_size=1", *RL],  # whitens over both ranks
    "dpo": DPO,
    "dpo-full": [*DPO, "lora.r=0"],
    "reward": ["max_steps=3", "eval.every=3", "log_every=1", "max_len=24", "optim.lr=0.003", "progress=false",
               "batch_size=8"],
}
COMMAND = {"ppo": ["ppo"], "grpo": ["grpo"], "rloo": ["rloo"], "reinforce-pp": ["reinforce-pp"], "dpo": ["dpo"],
           "dpo-full": ["dpo"], "reward": ["reward", "train"]}
INPUTS = {"ppo": ("model", "prompts"), "grpo": ("model", "prompts"), "rloo": ("model", "prompts"),
          "reinforce-pp": ("model", "prompts"), "dpo": ("model", "data"),
          "dpo-full": ("model", "data"), "reward": ("model", "data")}


def _inputs(tmp_path: Path) -> list[str]:
    from palm_rlhf.data.preferences import write_preferences
    from palm_rlhf.data.synthetic import rule_preference_pairs
    from palm_rlhf.model import PaLM

    torch.manual_seed(0)
    PaLM(num_tokens=256, dim=32, depth=1, heads=2, dim_head=16).save_pretrained(tmp_path / "base")
    (tmp_path / "prompts.txt").write_text("".join(f"{w} and\n" for w in
                                                  ["the", "cat", "sat", "on", "a", "red", "mat", "now"]))
    write_preferences(tmp_path / "prefs.jsonl", rule_preference_pairs(24, seed=0))
    return [f"model={tmp_path / 'base'}", f"prompts={tmp_path / 'prompts.txt'}", f"data={tmp_path / 'prefs.jsonl'}"]


def _argv(algo: str, inputs: list[str], out: Path, nproc: int) -> list[str]:
    args = [a for a in inputs if a.split("=")[0] in INPUTS[algo]]
    return [*COMMAND[algo], *args, *ARGS[algo], f"out_dir={out}"]


def _launch(algo: str, inputs: list[str], out: Path, nproc: int, device: str):
    return torchrun_under_nccl_rule(_argv(algo, inputs, out, nproc), str(out) + ".rule", nproc=nproc, device=device)


def _trained(algo: str, run_dir: Path) -> dict:
    """What the run trained: DPO's adapter, the reward model's weights, every weight (dpo-full)."""
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / ("adapter.safetensors" if algo == "dpo" else "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["dpo", "dpo-full", "reward"])
def test_trainers_in_two_gloo_processes_obey_the_nccl_rule(tmp_path, algo):
    """Every collective of the DPO and reward runs goes through the runtime on the model's device;
    the gradients go through DDP (C++), so the rule sees only statistics. DPO and reward training
    in 2 processes equal 1 process with the same global batch. (The RL trainers run under the rule
    in tests/trainers/test_rl_distributed.py, which launches them once for both checks.)"""
    from palm_rlhf.cli.main import main
    from palm_rlhf.runtime.metrics import read_metrics

    inputs = _inputs(tmp_path)
    seen = _launch(algo, inputs, tmp_path / "two", 2, "cpu")
    assert any(name == "all_reduce" and where.startswith(nccl_rule.RUNTIME_FILE) for name, where, _ in seen)
    assert main(_argv(algo, inputs, tmp_path / "one", 1)) == 0
    one, two = _trained(algo, tmp_path / "one"), _trained(algo, tmp_path / "two")
    assert one.keys() == two.keys()
    if algo == "dpo-full":  # it learned: every parameter moved from the base's (buffers do not train)
        from safetensors.torch import load_file

        from palm_rlhf.model import PaLM

        base = load_file(tmp_path / "base" / "model.safetensors")
        moved = {k for k in base if (one[k] - base[k]).abs().max() > 1e-6}
        assert moved == {name for name, _ in PaLM.from_pretrained(tmp_path / "base").named_parameters()}
    else:
        assert any(v.abs().max() > 1e-4 for k, v in one.items() if k.endswith("B"))  # it learned (LoRA B starts at 0)
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0)
    rows_one, rows_two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(rows_one) >= 3 and any(k.startswith(("heldout_", "val/")) for row in rows_two for k in row)  # it evaluated
    assert_same_metrics(rows_one, rows_two, rel=1e-5, abs=1e-5, what=algo)  # fp32 sums in another order


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: NCCL itself enforces the rule there")
@pytest.mark.parametrize("algo", ["ppo", "grpo", "dpo"])
def test_trainers_under_nccl_on_a_gpu(tmp_path, algo):
    """One process under torchrun on a GPU: a real NCCL group (which rejects CPU tensors) and DDP."""
    seen = _launch(algo, _inputs(tmp_path), tmp_path / "gpu", 1, "cuda")
    assert any(where.startswith(nccl_rule.RUNTIME_FILE) for _, where, _ in seen)
