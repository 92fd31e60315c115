"""PPO for language models ("The N Implementation Details of RLHF with PPO",
Huang et al. 2024, arXiv:2403.17031): k1 KL folded into per-token rewards, GAE,
whitened advantages, clipped policy and value losses, entropy bonus.

`ppo_prepare` turns a collected `Rollout` into rewards/advantages/returns once;
`ppo_loss` is the loss of one minibatch from the log-probs, entropy and values the current
weights give it (`palm_rlhf.generation.scoring.Scorer` computes them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from ..ops import masked_mean
from .advantages import ReduceSum, explained_variance, gae, global_masked_mean_var, kl_shaped_rewards, whiten
from .kl import kl_per_token
from .losses import aggregate, clipped_value_loss, ppo_policy_terms
from .rollout import Rollout


@dataclass
class PPOHyperparams:
    """gamma, lam: GAE discount and trace decay. clip_eps: policy ratio clip. value_clip: critic clip
    (None = off). vf_coef: weight of the value loss. ent_coef: entropy bonus (> 0 raises entropy).
    whiten_rewards: rescale per-token rewards (keeping their mean). whiten_advantages: normalise
    advantages over the whole batch (all ranks)."""

    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip: float | None = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    whiten_rewards: bool = False
    whiten_advantages: bool = True

    def __post_init__(self):
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"gamma={self.gamma} must be in [0, 1]")
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"lam={self.lam} must be in [0, 1]")
        if self.clip_eps <= 0:
            raise ConfigError(f"clip_eps={self.clip_eps} must be > 0")
        if self.value_clip is not None and self.value_clip <= 0:
            raise ConfigError(f"value_clip={self.value_clip} must be > 0 or null (off)")
        if self.vf_coef < 0 or self.ent_coef < 0:
            raise ConfigError("vf_coef and ent_coef must be >= 0")


def ppo_prepare(rollout: Rollout, hp: PPOHyperparams, kl_coef: float, reduce_sum: ReduceSum | None = None
                ) -> dict[str, float]:
    """Fill rollout.rewards / advantages / returns in place; return batch statistics."""
    mask = rollout.mask
    kl = kl_per_token(rollout.old_log_probs, rollout.ref_log_probs, "k1").masked_fill(~mask, 0.0)
    rewards = kl_shaped_rewards(rollout.scores, kl, mask, kl_coef)
    if hp.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False, reduce_sum=reduce_sum)
    advantages, returns = gae(rewards, rollout.values, mask, hp.gamma, hp.lam)
    if hp.whiten_advantages:
        advantages = whiten(advantages, mask, reduce_sum=reduce_sum)
    rollout.rewards, rollout.advantages, rollout.returns = rewards, advantages, returns
    # statistics of the global batch (every rank logs the same numbers)
    return {"explained_variance": float(explained_variance(rollout.values, returns, mask, reduce_sum)),
            "returns_mean": float(global_masked_mean_var(returns, mask, reduce_sum)[0]),
            "values_mean": float(global_masked_mean_var(rollout.values, mask, reduce_sum)[0])}


def ppo_loss(logp: Tensor, entropy: Tensor, values: Tensor, mb: Rollout, hp: PPOHyperparams,
             denominator: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of minibatch `mb` (token-mean; `denominator` = the token count it is normalised by).

    logp, entropy (b, T): the responses' log-probs and the policy's entropy under the current
    weights; values (b, T): the critic's values (all from `generation.scoring.Scorer`)."""
    mask = mb.mask
    terms = ppo_policy_terms(logp, mb.old_log_probs, mb.advantages, mask, hp.clip_eps)
    vf, vf_clipped = clipped_value_loss(values, mb.values, mb.returns, mask, hp.value_clip)
    per_token = terms.loss + hp.vf_coef * vf - hp.ent_coef * entropy  # minimising raises entropy
    loss = aggregate(per_token, mask, "token_mean", denominator=denominator)
    with torch.no_grad():
        stats = {"policy_loss": masked_mean(terms.loss, mask), "value_loss": masked_mean(vf, mask),
                 "entropy": masked_mean(entropy, mask), "clip_frac": masked_mean(terms.clipped.float(), mask),
                 "value_clip_frac": masked_mean(vf_clipped.float(), mask),
                 "approx_kl": masked_mean(terms.approx_kl, mask), "ratio_mean": masked_mean(terms.ratio, mask),
                 "tokens": mask.sum().float()}
    return loss, stats


__all__ = ["PPOHyperparams", "ppo_prepare", "ppo_loss"]
