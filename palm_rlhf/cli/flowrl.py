"""`palm-rlhf flowrl --config flowrl [key=value ...]`: FlowRL (reward-distribution matching, learned log Z)."""

from __future__ import annotations

from .ppo import add_rl_command

EXAMPLES = """examples:
  palm-rlhf flowrl --config flowrl model=runs/sft prompts=prompts.txt reward_fn=my_rewards:score out_dir=runs/flowrl
  palm-rlhf flowrl --config flowrl model=runs/sft prompts=prompts.txt reward_model=runs/rm group_size=8 beta=5
  torchrun --nproc_per_node 2 -m palm_rlhf flowrl --config flowrl model=runs/sft prompts=prompts.txt reward_model=runs/rm

prompts_per_step distinct prompts are sampled group_size times each; rewards are z-scored in each
group and the policy is matched to exp(beta * reward) * reference through a trajectory-balance loss with
a learned log Z(prompt). OUT/final/ holds the base with the trained actor merged,
OUT/final/adapter.safetensors the actor alone; metrics go to OUT/metrics.jsonl.
"""


def register(sub) -> None:
    add_rl_command(sub, "flowrl", "RL fine-tuning with FlowRL (reward-distribution matching, learned log Z)",
                   EXAMPLES,
                   "palm_rlhf.trainers.flowrl.FlowRLConfig", "palm_rlhf.trainers.flowrl.FlowRLTrainer")
