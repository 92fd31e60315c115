"""PPO, GRPO, RLOO, REINFORCE++, TPO and FlowRL under torchrun: 2 CPU processes train exactly what 1
process trains with the same global batch, under the NCCL rule (tests/runtime/nccl_rule.py: every
collective goes through `palm_rlhf.runtime.distributed`, on the model's device).

Why it holds: the step's prompts come from a generator seeded by (seed, step); each rollout row's
sampling noise from one seeded by (seed, step, global row index) (`rl_base.row_generators`), so a
row is sampled identically whichever rank collects it and in whichever generation chunk (here
3 rows per chunk: 1 process collects 3+3+2, each rank 3+1). Advantage whitening, the KL
controller and the loss normalisers are summed over ranks (REINFORCE++ whitens its advantages over
both ranks' tokens; RLOO's groups, like GRPO's, stay whole on one rank), and `TrainStep` weights every
rank's loss by its token (PPO) or sequence (GRPO) count. With one minibatch per epoch (batch_size =
the global batch), what differs is only float summation order.

FlowRL needed two more things (trainers/flowrl.py): log Z's first gradient is 0 in exact arithmetic
(log Z = 0, weight 1, z-scores summing to 0 in each group), so its float value is rounding noise that
Adam's per-parameter normalisation turns into an lr-sized step; with the stored sampler log-probs in
the weight and a row-wise log Z, 1 and 2 processes differed by up to 8e-4 in the adapter. With the
on-policy weight taken as exactly 1 and log Z evaluated once per group the adapters agree within 2e-7
(measured 2026-12-07 at group_size 2 and 4, and with micro_batch_size=2). Either change alone left
9e-4 and 8e-4 at group_size 2; a row-wise log Z passes at group_size 2 with whole-group minibatches
(a group's two terms are exact negatives, added next to each other) but leaves 9e-5 at group_size 4,
so FlowRL runs here with groups of 4.

In those runs every rank holds as many response tokens as the other and the KL controller sits at
its clip; the second test (`rl_dist_worker`, stub rollouts) makes the token counts and the KLs of the
ranks differ, so a loss weighted 1 per rank or a controller fed one rank's KL shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from palm_rlhf.cli.main import main
from palm_rlhf.model import PaLM
from palm_rlhf.runtime import distributed as rdist
from palm_rlhf.runtime.metrics import read_metrics
from tests.helpers.processes import torchrun_under_nccl_rule
from tests.helpers.runs import assert_same_metrics

RUNTIME_FILE = str(Path(rdist.__file__).resolve())

HERE = Path(__file__).resolve().parent

COMMON = {
    "ppo": ["max_steps=2", "prompts_per_step=8", "kl_target=1.0", "kl_horizon=100"],  # the adaptive controller too
    "grpo": ["max_steps=2", "prompts_per_step=4", "group_size=2"],
    "rloo": ["max_steps=2", "prompts_per_step=4", "group_size=2"],
    "reinforce-pp": ["max_steps=2", "prompts_per_step=8", "group_size=1"],
    "tpo": ["max_steps=2", "prompts_per_step=4", "group_size=2"],
    # the preset's log Z (2 hidden layers); groups of 4, whose z-scores sum to 0 only up to rounding
    "flowrl": ["max_steps=2", "prompts_per_step=4", "group_size=4", "batch_size=16"],
}


def ascii_fraction(prompts, completions) -> list[float]:
    """Share of completion characters below 128: about half for a random byte model, so every
    GRPO group has score variance (a vowel reward is almost always 0 before training)."""
    return [sum(ord(ch) < 128 for ch in c) / max(len(c), 1) for c in completions]


def run_args(algo, tmp_path, out):
    return [algo, f"model={tmp_path / 'base'}", f"prompts={tmp_path / 'prompts.txt'}",
            "reward_fn=test_rl_distributed:ascii_fraction", "rollout_batch_size=3", "batch_size=8", "epochs=2",
            "max_new_tokens=6", "eos_token=10", "optim.lr=0.01", "sample_every=0", f"out_dir={out}", *COMMON[algo]]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "grpo", "rloo", "reinforce-pp", "tpo", "flowrl"])
def test_two_torchrun_processes_equal_one_process(tmp_path, algo):
    torch.manual_seed(0)
    PaLM(num_tokens=256, dim=32, depth=1, heads=2, dim_head=16).save_pretrained(tmp_path / "base")
    (tmp_path / "prompts.txt").write_text("".join(f"{w} and\n" for w in
                                                  ["the", "cat", "sat", "on", "a", "red", "mat", "now"]))
    # launched under the NCCL rule: every collective goes through the runtime, on the model's device
    seen = torchrun_under_nccl_rule(run_args(algo, tmp_path, tmp_path / "two"), str(tmp_path / "rule"),
                                    pythonpath=(HERE,))
    assert any(name == "all_reduce" and where.startswith(RUNTIME_FILE) for name, where, _ in seen)
    assert main(run_args(algo, tmp_path, tmp_path / "one")) == 0

    one_adapter, two_adapter = (load_file(tmp_path / run / "final" / "adapter.safetensors") for run in ("one", "two"))
    assert one_adapter.keys() == two_adapter.keys()
    # the actor's LoRA B starts at 0, so a non-zero B shows the runs really learned something
    assert any(v.abs().max() > 1e-4 for k, v in one_adapter.items() if k.endswith("B"))
    assert all((one_adapter[k] - two_adapter[k]).abs().max() <= 1e-5 for k in one_adapter)

    one = read_metrics(tmp_path / "one")
    assert [r["step"] for r in one] == [1, 2]
    assert_same_metrics(one, read_metrics(tmp_path / "two"), rel=1e-5, abs=1e-5, what=algo)


@pytest.mark.slow
def test_two_ranks_with_uneven_tokens_and_kl_equal_one_process(tmp_path):
    """`rl_dist_worker`: 2 PPO steps on stub rollouts whose ranks hold different token counts (4 vs 6) and
    different mean KLs, with the adaptive controller inside its clip. On every rank the controller takes
    exactly the values the global per-sequence KL and the global rollout count give (a rank's own KL, a
    token mean, or the rank's own row count would not); the loss of each rank is weighted by its tokens
    (grad norms, metrics and trained weights equal one process's); each rank's rows draw their own
    sampling noise, the same a single process draws for those rows."""
    from rl_dist_worker import expected_kl_values, run

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(HERE / "rl_dist_worker.py"), str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    one = run(tmp_path / "one")

    expected = expected_kl_values()
    for result in (*ranks, one):
        assert result["kl_values"] == pytest.approx(expected, rel=1e-7)
    # noise: 4 distinct row streams per step; ranks 0 and 1 hold rows 0-1 and 2-3 of the single process
    for step in range(2):
        assert ranks[0]["noise"][step] + ranks[1]["noise"][step] == one["noise"][step]
        assert len(set(one["noise"][step])) == 4
    assert_same_metrics(one["history"], ranks[0]["history"], rel=1e-5, abs=1e-5)
    two_state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert any(float(v.abs().max()) > 1e-4 for k, v in one["state"].items() if k.endswith("B"))
    for k, v in one["state"].items():
        assert float((v - two_state[k]).abs().max()) <= 1e-5, k
