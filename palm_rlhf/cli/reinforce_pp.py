"""`palm-rlhf reinforce-pp --config reinforce-pp [key=value ...]`: REINFORCE++ (and its baseline variant)."""

from __future__ import annotations

from .ppo import add_rl_command

EXAMPLES = """examples:
  palm-rlhf reinforce-pp --config reinforce-pp model=runs/sft prompts=prompts.txt reward_fn=my_rewards:score
  palm-rlhf reinforce-pp --config reinforce-pp model=runs/sft prompts=prompts.txt reward_model=runs/rm baseline=true group_size=4
  torchrun --nproc_per_node 2 -m palm_rlhf reinforce-pp --config reinforce-pp model=runs/sft prompts=prompts.txt reward_model=runs/rm

Per-token KL-shaped rewards, reward-to-go advantages whitened over the whole batch (every process),
PPO's clipped surrogate, no critic. baseline=true (REINFORCE++-baseline) samples each prompt
group_size times and subtracts the group's mean score first. OUT/final/ holds the base with the
trained actor merged, OUT/final/adapter.safetensors the actor alone.
"""


def register(sub) -> None:
    add_rl_command(sub, "reinforce-pp", "RL fine-tuning with REINFORCE++ / REINFORCE++-baseline (no critic)",
                   EXAMPLES, "palm_rlhf.trainers.reinforce_pp.ReinforcePPConfig",
                   "palm_rlhf.trainers.reinforce_pp.ReinforcePPTrainer")
