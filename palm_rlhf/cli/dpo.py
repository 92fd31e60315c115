"""`palm-rlhf dpo --config dpo [key=value ...]`: DPO / IPO on preference JSONL."""

from __future__ import annotations

from .ppo import add_rl_command

EXAMPLES = """examples:
  palm-rlhf dpo --config dpo model=runs/sft data=prefs.jsonl out_dir=runs/dpo
  palm-rlhf dpo --config dpo model=runs/sft data=prefs.jsonl beta=0.2 loss_type=ipo
  torchrun --nproc_per_node 2 -m palm_rlhf dpo --config dpo model=runs/sft data=prefs.jsonl

Held-out implicit-reward accuracy and margin are logged every eval_every steps to OUT/metrics.jsonl.
OUT/final/ holds the base with the trained actor merged, OUT/final/adapter.safetensors the actor alone.
"""


def register(sub) -> None:
    add_rl_command(sub, "dpo", "preference optimisation with DPO or IPO on pairwise JSONL", EXAMPLES,
                   "palm_rlhf.trainers.dpo.DPOConfig", "palm_rlhf.trainers.dpo.DPOTrainer")
