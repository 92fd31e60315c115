"""RLOO trainer: `palm-rlhf rloo --config rloo model=RUN prompts=FILE reward_fn=module:function [key=value ...]`.

REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, arXiv:2402.14740; the maths is
`palm_rlhf.rl.reinforce`): each prompt is sampled `group_size` times, a sample's sequence reward
(score - kl_coef * its summed k1 KL to the reference) is compared with the mean of the other samples
of its prompt, and that advantage weighs every token of the response in the clipped surrogate.
No critic; the setup (one actor LoRA scope, whole groups per rank) is GRPO's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..rl.collect import rollout_packed
from ..rl.reinforce import ReinforceHyperparams, policy_gradient_loss, reinforce_prepare
from ..runtime.optim import OptimConfig
from .grpo import GRPOTrainer
from .rl_base import RLRunConfig


@dataclass
class RLOOConfig(RLRunConfig):
    out_dir: str = "runs/rloo"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, weight_decay=0.0, betas=(0.9, 0.999),
                                                                   warmup=0, schedule="constant"))  # GRPO's
    group_size: int = 8              # samples per prompt (k); the baseline is the mean of the other k - 1
    kl_coef: float = 2.0             # weight of the summed k1 KL in each sequence's reward (configs/rl/rloo.yaml: why)
    clip_eps: float = 0.2            # ratio clip (low side, and high unless clip_eps_high)
    clip_eps_high: float | None = None  # upper ratio clip; null: clip_eps
    aggregation: str = "seq_mean"    # seq_mean (GRPO's) | token_mean | seq_sum_norm (REINFORCE's sum / max_new_tokens)
    ent_coef: float = 0.0            # entropy bonus weight

    def __post_init__(self):
        super().__post_init__()
        self.hyperparams()

    def hyperparams(self) -> ReinforceHyperparams:
        return ReinforceHyperparams(algorithm="rloo", group_size=self.group_size, kl_coef=self.kl_coef,
                                    clip_eps=self.clip_eps, clip_eps_high=self.clip_eps_high,
                                    aggregation=self.aggregation, ent_coef=self.ent_coef)


class RLOOTrainer(GRPOTrainer):
    """GRPO's actor-only setup and groups; RLOO's advantages and loss."""

    name = "rloo"

    def _prepare(self, rollout) -> dict:
        return reinforce_prepare(rollout, self.hp)  # each rank holds whole groups: baselines are local

    def _loss(self, mb):
        logp, entropy = self.scorer.policy(rollout_packed(mb), with_entropy=True)
        return policy_gradient_loss(logp, entropy, mb, self.hp, self.config.max_new_tokens)


__all__ = ["RLOOConfig", "RLOOTrainer"]
