"""`palm-rlhf dpo --config configs/rl/dpo.yaml [key=value ...]`: DPO / IPO on preference JSONL."""

from __future__ import annotations

from .ppo import make_rl_command

EXAMPLES = """examples:
  palm-rlhf dpo --config configs/rl/dpo.yaml
  palm-rlhf dpo --config configs/rl/dpo.yaml preferences=prefs.jsonl beta=0.2 loss_type=ipo
  torchrun --nproc_per_node 2 -m palm_rlhf dpo --config configs/rl/dpo.yaml

Held-out implicit-reward accuracy and margin are logged every eval_every steps to OUT/metrics.jsonl;
the trained adapter is written to OUT/actor.safetensors.
"""


def register(sub) -> None:
    make_rl_command(sub, "dpo", "preference optimisation with DPO or IPO on pairwise JSONL", EXAMPLES,
                    "palm_rlhf.trainers.dpo.DPOConfig", "palm_rlhf.trainers.dpo.DPOTrainer")
