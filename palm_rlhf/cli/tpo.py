"""`palm-rlhf tpo --config tpo [key=value ...]`: sequence-level TPO (group targets, cross-entropy)."""

from __future__ import annotations

from .ppo import add_rl_command

EXAMPLES = """examples:
  palm-rlhf tpo --config tpo model=runs/sft prompts=prompts.txt reward_fn=my_rewards:score out_dir=runs/tpo
  palm-rlhf tpo --config tpo model=runs/sft prompts=prompts.txt reward_model=runs/rm group_size=8 eta=0.5
  torchrun --nproc_per_node 2 -m palm_rlhf tpo --config tpo model=runs/sft prompts=prompts.txt reward_model=runs/rm

prompts_per_step distinct prompts are sampled group_size times each; the target over a group is
softmax(old log-prob + z-scored reward / eta), learned by cross-entropy. batch_size must be a multiple
of group_size. OUT/final/ holds the base with the trained actor merged, OUT/final/adapter.safetensors
the actor alone; metrics go to OUT/metrics.jsonl.
"""


def register(sub) -> None:
    add_rl_command(sub, "tpo", "RL fine-tuning with sequence-level TPO (no critic, group targets)", EXAMPLES,
                   "palm_rlhf.trainers.tpo.TPOConfig", "palm_rlhf.trainers.tpo.TPOTrainer")
