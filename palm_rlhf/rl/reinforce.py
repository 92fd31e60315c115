"""Critic-free REINFORCE estimators: RLOO and REINFORCE++ (and REINFORCE++-baseline).

RLOO (Ahmadian et al. 2024, arXiv:2402.14740): k samples per prompt; the whole response is one
action with reward R_i = score_i - kl_coef * KL_i (KL_i: the sequence's summed k1 log-ratio to the
reference); each sample's baseline is the mean reward of the other k - 1 samples of its prompt:
    A_i = R_i - (sum_j R_j - R_i) / (k - 1) = k / (k - 1) * (R_i - mean_j R_j).
The advantage is the same for every token of the response.

REINFORCE++ (Hu 2025, arXiv:2501.03262): per-token rewards r_t = -kl_coef * k1_t plus the score at
the last token (as PPO's), returns G_t = sum_{s >= t} gamma^(s - t) r_s, and advantages = G
whitened over every token of the global batch (all ranks): no critic, no per-prompt groups.
REINFORCE++-baseline subtracts each prompt's mean score over its group of samples first (so a
prompt that is easy for every sample teaches nothing), then shapes and whitens the same way.
The KL stays in the per-token reward in both variants.

Both learn with the clipped surrogate of PPO (`policy_gradient_loss`): at ratio 1 (one update per
batch) its gradient is exactly REINFORCE's with these advantages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError, InputError
from ..ops import masked_mean
from .advantages import ReduceSum, kl_shaped_rewards, whiten
from .kl import kl_per_token
from .losses import AGGREGATIONS, aggregate, ppo_policy_terms
from .rollout import Rollout


def check_group_size(group_size: int, why: str) -> None:
    """A group-relative method needs at least 2 samples per prompt; `why` says what it compares."""
    if group_size < 2:
        raise ConfigError(f"group_size={group_size} must be >= 2 ({why})")


def grouped(scores: Tensor, group_size: int) -> Tensor:
    """(b * G,) -> (b, G): rows i*G .. i*G+G-1 are the samples of prompt i."""
    if scores.ndim != 1 or scores.numel() % group_size:
        raise InputError(f"scores of shape {tuple(scores.shape)} cannot be split into groups of {group_size}; "
                         f"pass a flat tensor whose length is a multiple of group_size")
    return scores.view(-1, group_size)


def leave_one_out_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO: each sample's reward minus the mean reward of the other samples of its prompt.
    rewards (b * k,) ordered group by group -> advantages (b * k,)."""
    if group_size < 2:
        raise ConfigError(f"group_size={group_size} must be >= 2 (the baseline is the other samples' mean)")
    groups = grouped(rewards, group_size)  # (b, k)
    others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)  # (b, k): mean of the other k - 1
    return (groups - others).reshape(-1)


def group_mean_baseline(scores: Tensor, group_size: int) -> Tensor:
    """REINFORCE++-baseline: each score minus the mean score of its prompt's group. (b * G,) -> (b * G,)."""
    groups = grouped(scores, group_size)
    return (groups - groups.mean(-1, keepdim=True)).reshape(-1)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = r_t + gamma * G_{t+1} over each row's real tokens (the episode ends at its last real
    token; padding is 0 and never feeds back). rewards, mask (b, T) -> (b, T)."""
    m = mask.bool().to(rewards.dtype)
    rewards = rewards * m
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[-1])):
        running = (rewards[:, t] + gamma * running) * m[:, t]
        out[:, t] = running
    return out


def reinforce_pp_advantages(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float, gamma: float = 1.0,
                            group_size: int | None = None, reduce_sum: ReduceSum | None = None
                            ) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (group_size None) or REINFORCE++-baseline (group_size G: the group mean score is
    subtracted first). scores (b,), kl (b, T) per-token k1, mask (b, T).
    Returns (advantages: the returns whitened over every masked token of every rank, returns), (b, T)."""
    if group_size is not None:
        scores = group_mean_baseline(scores, group_size)
    returns = discounted_returns(kl_shaped_rewards(scores, kl, mask, kl_coef), mask, gamma)
    return whiten(returns, mask, reduce_sum=reduce_sum), returns


def broadcast_to_tokens(per_row: Tensor, mask: Tensor) -> Tensor:
    """(b,) -> (b, T): the row's value on each of its real tokens, 0 on padding."""
    return per_row[:, None].to(torch.float32).expand(mask.shape).masked_fill(~mask.bool(), 0.0).contiguous()


# ---------------------------------------------------------------- hyperparameters, prepare, loss

@dataclass
class ReinforceHyperparams:
    """algorithm: "rloo" | "reinforce_pp" | "reinforce_pp_baseline". group_size: samples per prompt
    (RLOO and the baseline variant need >= 2; plain REINFORCE++ takes any, 1 included). kl_coef:
    weight of the k1 KL to the reference in the reward. gamma: discount of REINFORCE++'s returns.
    clip_eps, clip_eps_high: ratio clip (PPO's). aggregation: how per-token losses become one number.
    ent_coef: entropy bonus (> 0 raises entropy)."""

    algorithm: str = "rloo"
    group_size: int = 4
    kl_coef: float = 0.05
    gamma: float = 1.0
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    aggregation: str = "token_mean"
    ent_coef: float = 0.0

    ALGORITHMS = ("rloo", "reinforce_pp", "reinforce_pp_baseline")

    def __post_init__(self):
        if self.algorithm not in self.ALGORITHMS:
            raise ConfigError(f"algorithm={self.algorithm!r}: use one of {', '.join(self.ALGORITHMS)}")
        if self.group_size < (1 if self.algorithm == "reinforce_pp" else 2):
            raise ConfigError(f"group_size={self.group_size} must be >= 2 for {self.algorithm} (its baseline "
                              f"compares the samples of a prompt)")
        if self.clip_eps <= 0:
            raise ConfigError(f"clip_eps={self.clip_eps} must be > 0")
        if self.kl_coef < 0 or self.ent_coef < 0:
            raise ConfigError("kl_coef and ent_coef must be >= 0")
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"gamma={self.gamma} must be in [0, 1]")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation={self.aggregation!r}: use one of {', '.join(AGGREGATIONS)}")


def reinforce_prepare(rollout: Rollout, hp: ReinforceHyperparams, reduce_sum: ReduceSum | None = None
                      ) -> dict[str, float]:
    """Fill rollout.advantages (b, T) (and rollout.returns for REINFORCE++). Rows are grouped
    `group_size` at a time; each rank holds whole groups, so RLOO's baselines are local while
    REINFORCE++'s whitening statistics are summed over ranks by `reduce_sum`."""
    mask = rollout.mask
    kl = kl_per_token(rollout.old_log_probs, rollout.ref_log_probs, "k1").masked_fill(~mask, 0.0)
    if hp.algorithm == "rloo":
        rewards = rollout.scores.float() - hp.kl_coef * kl.sum(-1)  # (b,) sequence rewards
        rollout.advantages = broadcast_to_tokens(leave_one_out_advantages(rewards, hp.group_size), mask)
        return {}
    group = hp.group_size if hp.algorithm == "reinforce_pp_baseline" else None
    rollout.advantages, rollout.returns = reinforce_pp_advantages(rollout.scores.float(), kl, mask, hp.kl_coef,
                                                                  hp.gamma, group, reduce_sum)
    return {}


def policy_gradient_loss(logp: Tensor, entropy: Tensor, mb: Rollout, hp: ReinforceHyperparams,
                         max_len: int | None = None, denominator: float | None = None
                         ) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate with the minibatch's advantages, minus the entropy bonus, aggregated.
    logp, entropy (b, T): under the current weights (`generation.scoring.Scorer.policy`)."""
    mask = mb.mask
    terms = ppo_policy_terms(logp, mb.old_log_probs, mb.advantages, mask, hp.clip_eps, hp.clip_eps_high)
    per_token = terms.loss - hp.ent_coef * entropy
    loss = aggregate(per_token, mask, hp.aggregation, max_len=max_len, denominator=denominator)
    with torch.no_grad():
        stats = {"policy_loss": masked_mean(terms.loss, mask), "entropy": masked_mean(entropy, mask),
                 "clip_frac": masked_mean(terms.clipped.float(), mask),
                 "approx_kl": masked_mean(terms.approx_kl, mask), "tokens": mask.sum().float()}
    return loss, stats


__all__ = ["leave_one_out_advantages", "group_mean_baseline", "discounted_returns", "reinforce_pp_advantages",
           "broadcast_to_tokens", "ReinforceHyperparams", "reinforce_prepare", "policy_gradient_loss"]
