"""GRPO (Shao et al. 2024, arXiv:2402.03300): no critic; G samples per prompt and
group-normalised sequence advantages broadcast to every token, a clipped ratio,
and the KL to the reference as a k3 term in the loss.

Options: `scale_by_std=False` and `aggregation='seq_sum_norm'` give Dr. GRPO
(Liu et al. 2025, arXiv:2503.20783), which removes the std and length biases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from ..ops import masked_mean
from .advantages import group_advantages
from .kl import kl_per_token
from .losses import AGGREGATIONS, aggregate, ppo_policy_terms
from .rollout import Rollout


@dataclass
class GRPOHyperparams:
    group_size: int = 8
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    kl_coef: float = 0.04
    scale_by_std: bool = True
    aggregation: str = "seq_mean"
    ent_coef: float = 0.0

    def __post_init__(self):
        if self.group_size < 2:
            raise ConfigError(f"group_size={self.group_size} must be >= 2 (advantages compare samples of a prompt)")
        if self.clip_eps <= 0:
            raise ConfigError(f"clip_eps={self.clip_eps} must be > 0")
        if self.kl_coef < 0 or self.ent_coef < 0:
            raise ConfigError("kl_coef and ent_coef must be >= 0")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation={self.aggregation!r}: use one of {', '.join(AGGREGATIONS)}")


def grpo_prepare(rollout: Rollout, hp: GRPOHyperparams) -> dict[str, float]:
    """Fill rollout.advantages (b, T) from group-relative scores; rows are grouped G at a time."""
    adv, zero_groups = group_advantages(rollout.scores, hp.group_size, hp.scale_by_std)
    rollout.advantages = adv[:, None].expand_as(rollout.old_log_probs).masked_fill(~rollout.mask, 0.0).contiguous()
    return {"zero_variance_groups": float(zero_groups),
            "zero_variance_frac": zero_groups / max(len(rollout) // hp.group_size, 1)}


def grpo_loss(logp: Tensor, entropy: Tensor, mb: Rollout, hp: GRPOHyperparams, max_len: int | None = None,
              denominator: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of minibatch `mb` from its log-probs and entropy (b, T) under the current weights
    (`generation.scoring.Scorer.policy`); `max_len` is the generation budget (seq_sum_norm)."""
    mask = mb.mask
    terms = ppo_policy_terms(logp, mb.old_log_probs, mb.advantages, mask, hp.clip_eps, hp.clip_eps_high)
    kl = kl_per_token(logp, mb.ref_log_probs, "k3").masked_fill(~mask, 0.0)
    per_token = terms.loss + hp.kl_coef * kl - hp.ent_coef * entropy
    loss = aggregate(per_token, mask, hp.aggregation, max_len=max_len, denominator=denominator)
    with torch.no_grad():
        stats = {"policy_loss": masked_mean(terms.loss, mask), "kl_k3": masked_mean(kl, mask),
                 "entropy": masked_mean(entropy, mask), "clip_frac": masked_mean(terms.clipped.float(), mask),
                 "approx_kl": masked_mean(terms.approx_kl, mask), "tokens": mask.sum().float()}
    return loss, stats


__all__ = ["GRPOHyperparams", "grpo_prepare", "grpo_loss"]
