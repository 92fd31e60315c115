"""`palm-rlhf dpo --config dpo [key=value ...]`: DPO / IPO on preference JSONL."""

from __future__ import annotations

from .ppo import add_rl_command

EXAMPLES = """examples:
  palm-rlhf dpo --config dpo model=runs/sft data=prefs.jsonl out_dir=runs/dpo
  palm-rlhf dpo --config dpo model=runs/sft data=prefs.jsonl beta=0.2 loss_type=ipo
  palm-rlhf dpo --config dpo model=runs/sft data=prefs.jsonl kl_budget=8 stop_at_kl_budget=true
  torchrun --nproc_per_node 2 -m palm_rlhf dpo --config dpo model=runs/sft data=prefs.jsonl

Held-out implicit-reward accuracy and margin, and kl_ref (KL to the reference in nats per sequence,
on completions the policy samples for held-out prompts) are logged every eval.every steps to
OUT/metrics.jsonl; past kl_budget a warning (stop_at_kl_budget=true: the run ends there).
OUT/final/ holds the base with the trained actor merged, OUT/final/adapter.safetensors the actor alone.
"""


def register(sub) -> None:
    add_rl_command(sub, "dpo", "preference optimisation with DPO or IPO on pairwise JSONL", EXAMPLES,
                   "palm_rlhf.trainers.dpo.DPOConfig", "palm_rlhf.trainers.dpo.DPOTrainer")
