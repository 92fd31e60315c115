"""`palm-rlhf grpo --config configs/rl/grpo.yaml [key=value ...]`: group-relative policy optimisation."""

from __future__ import annotations

from .ppo import make_rl_command

EXAMPLES = """examples:
  palm-rlhf grpo --config configs/rl/grpo.yaml
  palm-rlhf grpo --config configs/rl/grpo.yaml group_size=16 scale_by_std=false aggregation=seq_sum_norm
  torchrun --nproc_per_node 2 -m palm_rlhf grpo --config configs/rl/grpo.yaml

prompts_per_step distinct prompts are sampled group_size times each. The trained actor adapter is
written to OUT/actor.safetensors; metrics (with zero_variance_groups) to OUT/metrics.jsonl.
"""


def register(sub) -> None:
    make_rl_command(sub, "grpo", "RL fine-tuning with GRPO / Dr. GRPO (no critic, group advantages)", EXAMPLES,
                    "palm_rlhf.trainers.grpo.GRPOConfig", "palm_rlhf.trainers.grpo.GRPOTrainer")
