"""`palm-rlhf rloo --config rloo [key=value ...]`: REINFORCE with a leave-one-out baseline."""

from __future__ import annotations

from .ppo import add_rl_command

EXAMPLES = """examples:
  palm-rlhf rloo --config rloo model=runs/sft prompts=prompts.txt reward_fn=my_rewards:score out_dir=runs/rloo
  palm-rlhf rloo --config rloo model=runs/sft prompts=prompts.txt reward_model=runs/rm group_size=8 kl_coef=0.1
  torchrun --nproc_per_node 2 -m palm_rlhf rloo --config rloo model=runs/sft prompts=prompts.txt reward_model=runs/rm

prompts_per_step distinct prompts are sampled group_size times each; a sample's baseline is the
mean reward of the other samples of its prompt. OUT/final/ holds the base with the trained actor
merged, OUT/final/adapter.safetensors the actor alone; metrics go to OUT/metrics.jsonl.
"""


def register(sub) -> None:
    add_rl_command(sub, "rloo", "RL fine-tuning with RLOO (no critic, leave-one-out baseline)", EXAMPLES,
                   "palm_rlhf.trainers.rloo.RLOOConfig", "palm_rlhf.trainers.rloo.RLOOTrainer")
