"""`palm-rlhf grpo --config grpo [key=value ...]`: group-relative policy optimisation."""

from __future__ import annotations

from .ppo import add_rl_command

EXAMPLES = """examples:
  palm-rlhf grpo --config grpo model=runs/sft prompts=prompts.txt reward_model=runs/rm out_dir=runs/grpo
  palm-rlhf grpo --config grpo model=runs/sft prompts=prompts.txt reward_fn=my_rewards:score group_size=16
  palm-rlhf grpo --config grpo model=runs/sft prompts=prompts.txt reward_model=runs/rm advantage_norm=constant aggregation=seq_sum_norm
  palm-rlhf grpo --config grpo model=runs/sft prompts=prompts.txt reward_fn=my_rewards:score policy_loss=spo entropy_advantage.scale=0.4
  torchrun --nproc_per_node 2 -m palm_rlhf grpo --config grpo model=runs/sft prompts=prompts.txt reward_model=runs/rm

prompts_per_step distinct prompts are sampled group_size times each. OUT/final/ holds the base with
the trained actor merged, OUT/final/adapter.safetensors the actor alone; metrics (with
zero_variance_groups) go to OUT/metrics.jsonl.
"""


def register(sub) -> None:
    add_rl_command(sub, "grpo", "RL fine-tuning with GRPO / Dr. GRPO / MaxRL / SPO (no critic, group advantages)",
                   EXAMPLES,
                   "palm_rlhf.trainers.grpo.GRPOConfig", "palm_rlhf.trainers.grpo.GRPOTrainer")
