"""GRPO (Shao et al. 2024, arXiv:2402.03300): no critic; G samples per prompt and
group-normalised sequence advantages broadcast to every token, a clipped ratio,
and the KL to the reference as a k3 term in the loss.

Options (the seed package's switches, issue 34):
- advantage_norm: "std" (GRPO), "mean" (MaxRL, arXiv:2602.02710: divided by the group's mean
  reward), "constant" (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783: no per-group rescaling; with
  `aggregation='seq_sum_norm'` it also removes the length bias).
- policy_loss: "clip" (PPO's clipped ratio), "spo" (Simple Policy Optimization, arXiv:2401.16025:
  a quadratic penalty on the ratio instead of the clip), "score_centering" (Marek & Ryabinin,
  arXiv:2609.20807: a score-centred policy gradient over the vocabulary or its top-k; the rollout
  then keeps the sampler's whole distribution, rows x tokens x vocabulary floats).
- entropy_scale, entropy_kappa: per-token entropy added to the advantage, capped at |A| / kappa
  (Cheng et al. 2025, arXiv:2506.14758); scale 0 is off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..errors import ConfigError, InputError
from ..ops import masked_mean
from .advantages import ADVANTAGE_NORMS, entropy_shaped_advantages, group_advantages
from .kl import kl_per_token
from .losses import AGGREGATIONS, aggregate, ppo_policy_terms, score_centering_loss, spo_policy_terms

POLICY_LOSSES = ("clip", "spo", "score_centering")
from .rollout import Rollout


@dataclass
class GRPOHyperparams:
    group_size: int = 8
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    kl_coef: float = 0.04
    advantage_norm: str = "std"
    advantage_constant: float = 1.0
    aggregation: str = "seq_mean"
    ent_coef: float = 0.0
    policy_loss: str = "clip"
    entropy_scale: float = 0.0
    entropy_kappa: float = 2.0
    score_centering_topk: int | None = None
    score_centering_weight: Callable[[Tensor], Tensor] | None = None  # f(ratio); None: 1

    def __post_init__(self):
        if self.group_size < 2:
            raise ConfigError(f"group_size={self.group_size} must be >= 2 (advantages compare samples of a prompt)")
        if self.clip_eps <= 0:
            raise ConfigError(f"clip_eps={self.clip_eps} must be > 0")
        if self.kl_coef < 0 or self.ent_coef < 0:
            raise ConfigError("kl_coef and ent_coef must be >= 0")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation={self.aggregation!r}: use one of {', '.join(AGGREGATIONS)}")
        if self.advantage_norm not in ADVANTAGE_NORMS:
            raise ConfigError(f"advantage_norm={self.advantage_norm!r}: use one of {', '.join(ADVANTAGE_NORMS)}")
        if not self.advantage_constant > 0:
            raise ConfigError(f"advantage_constant={self.advantage_constant} must be > 0")
        if self.policy_loss not in POLICY_LOSSES:
            raise ConfigError(f"policy_loss={self.policy_loss!r}: use one of {', '.join(POLICY_LOSSES)}")
        if self.entropy_scale < 0 or self.entropy_kappa <= 0:
            raise ConfigError(f"entropy_advantage.scale={self.entropy_scale} must be >= 0 and "
                              f"entropy_advantage.kappa={self.entropy_kappa} > 0")
        if self.score_centering_topk is not None and self.score_centering_topk < 1:
            raise ConfigError(f"score_centering.topk={self.score_centering_topk} must be >= 1 "
                              f"(null: the whole vocabulary)")


def grpo_prepare(rollout: Rollout, hp: GRPOHyperparams) -> dict[str, float]:
    """Fill rollout.advantages (b, T) from group-relative scores; rows are grouped G at a time."""
    adv, zero_groups = group_advantages(rollout.scores, hp.group_size, hp.advantage_norm,
                                        constant=hp.advantage_constant)
    rollout.advantages = adv[:, None].expand_as(rollout.old_log_probs).masked_fill(~rollout.mask, 0.0).contiguous()
    return {"zero_variance_groups": float(zero_groups),
            "zero_variance_frac": zero_groups / max(len(rollout) // hp.group_size, 1)}


def grpo_loss(logp: Tensor, entropy: Tensor, mb: Rollout, hp: GRPOHyperparams, max_len: int | None = None,
              denominator: float | None = None, log_probs_all: Tensor | None = None
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of minibatch `mb` from its log-probs and entropy (b, T) under the current weights
    (`generation.scoring.Scorer.policy`); `max_len` is the generation budget (seq_sum_norm).
    policy_loss="score_centering" also needs `log_probs_all` (b, T, V), the policy's log-softmax
    (`Scorer.policy_distribution`), and `mb.sampler_probs` (b, T, V), the sampler's distribution."""
    mask = mb.mask
    adv = mb.advantages
    if hp.entropy_scale > 0:
        adv = entropy_shaped_advantages(adv, entropy, mask, hp.entropy_scale, hp.entropy_kappa)
    terms = ppo_policy_terms(logp, mb.old_log_probs, adv, mask, hp.clip_eps, hp.clip_eps_high)
    policy = terms.loss
    if hp.policy_loss == "spo":
        terms = spo_policy_terms(logp, mb.old_log_probs, adv, mask, hp.clip_eps)
        policy = terms.loss
    elif hp.policy_loss == "score_centering":
        if log_probs_all is None or mb.sampler_probs is None:
            raise InputError("policy_loss='score_centering' needs the policy's log-softmax over the vocabulary "
                             "(log_probs_all=, from Scorer.policy_distribution) and the rollout's sampler_probs")
        policy = score_centering_loss(log_probs_all, mb.sampler_probs, mb.responses, adv, mask,
                                      hp.score_centering_topk, hp.score_centering_weight)
    kl = kl_per_token(logp, mb.ref_log_probs, "k3").masked_fill(~mask, 0.0)
    per_token = policy + hp.kl_coef * kl - hp.ent_coef * entropy
    loss = aggregate(per_token, mask, hp.aggregation, max_len=max_len, denominator=denominator)
    with torch.no_grad():
        stats = {"policy_loss": masked_mean(policy, mask), "kl_k3": masked_mean(kl, mask),
                 "entropy": masked_mean(entropy, mask), "clip_frac": masked_mean(terms.clipped.float(), mask),
                 "approx_kl": masked_mean(terms.approx_kl, mask), "tokens": mask.sum().float()}
    return loss, stats


__all__ = ["POLICY_LOSSES", "GRPOHyperparams", "grpo_prepare", "grpo_loss"]
