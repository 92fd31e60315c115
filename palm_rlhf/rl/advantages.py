"""Rewards per token, GAE, group-relative advantages and whitening.

Every tensor here is (b, T) over *response* tokens, with a bool `mask` (b, T)
that is True on real tokens (right-padded: a row's real tokens come first, its
last real token is the EOS or the last token before the length limit). Padding
gets exactly 0 in every output, so it can never leak into a loss.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..errors import ConfigError, InputError
from ..ops import masked_var

ReduceSum = Callable[[Tensor], Tensor]  # sums a tensor over all ranks (identity on one process)


def last_token_index(mask: Tensor) -> Tensor:
    """Index of each row's last real token (b,); 0 for an empty row (whose mask is all False)."""
    lengths = mask.long().sum(-1)
    return (lengths - 1).clamp(min=0)


def kl_shaped_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards r_t = -kl_coef * kl_t, plus the sequence score at the last real token.

    scores (b,), kl (b, T) per-token estimate (k1 by default), mask (b, T) -> (b, T).
    (Ziegler et al. 2019; "The N implementation details of RLHF with PPO", detail 5.)
    An empty row (no response token) gets no reward at all.
    """
    if scores.shape != mask.shape[:1]:
        raise InputError(f"scores {tuple(scores.shape)} must have one entry per row of mask {tuple(mask.shape)}")
    mask = mask.bool()
    rewards = (-kl_coef * kl).masked_fill(~mask, 0.0)
    last = last_token_index(mask)
    has_tokens = mask.any(-1)
    bonus = torch.zeros_like(rewards)
    bonus.scatter_(1, last[:, None], (scores.to(rewards.dtype) * has_tokens)[:, None])
    return rewards + bonus


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, arXiv:1506.02438).

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
    A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
    The episode ends at each row's last real token (EOS or length limit): the value
    after it is 0, and padding never feeds back into real tokens. Returns
    (advantages, returns = advantages + values), both (b, T) and 0 on padding.
    """
    mask = mask.bool()
    m = mask.to(rewards.dtype)
    rewards, values = rewards * m, values.detach() * m
    T = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = adv
        # a padded step is not part of the episode: the step before it sees V=0, A=0
        next_value, next_adv = values[:, t], adv
    returns = (advantages + values) * m
    return advantages, returns


def _local_or_global_sum(x: Tensor, reduce_sum: ReduceSum | None) -> Tensor:
    return x if reduce_sum is None else reduce_sum(x)


def global_masked_mean_var(x: Tensor, mask: Tensor, reduce_sum: ReduceSum | None = None) -> tuple[Tensor, Tensor, int]:
    """Mean and unbiased variance over the masked entries of every rank (two passes, stable).

    With `reduce_sum=None` this equals ops.masked_mean / ops.masked_var on the local tensor.
    """
    mask = mask.bool()
    x = x.double()
    stats = torch.stack([x.masked_fill(~mask, 0).sum(), mask.sum().double()])
    total, count = _local_or_global_sum(stats, reduce_sum).unbind()
    mean = total / count.clamp(min=1)
    sq = ((x - mean) ** 2).masked_fill(~mask, 0).sum()
    sq = _local_or_global_sum(sq, reduce_sum)
    n = int(count)
    var = sq / (n - 1) if n >= 2 else torch.zeros_like(sq)
    return mean, var, n


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, reduce_sum: ReduceSum | None = None,
           eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) with statistics over every rank's masked entries; 0 on padding.

    With shift_mean=False the mean is added back (used for rewards: rescale without
    changing their sign balance).
    """
    mean, var, _ = global_masked_mean_var(x, mask, reduce_sum)
    mean, var = mean.to(x.dtype), var.to(x.dtype)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out.masked_fill(~mask.bool(), 0.0)


ADVANTAGE_NORMS = ("std", "mean", "constant")


def group_advantages(scores: Tensor, group_size: int, norm: str = "std", eps: float = 1e-6,
                     constant: float = 1.0) -> tuple[Tensor, int]:
    """Group-relative advantages: each sample's score minus its group mean, divided by
    norm="std":      the group's (unbiased) std + eps (GRPO, Shao et al. 2024, arXiv:2402.03300);
    norm="mean":     |the group's mean score|, at least eps (MaxRL, arXiv:2602.02710: for rewards >= 0,
                     such as pass/fail, a prompt the policy rarely solves gets larger advantages);
    norm="constant": `constant` (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783: no per-group rescaling).

    scores (b * G,) ordered group by group (rows i*G .. i*G+G-1 share prompt i).
    Returns (advantages (b * G,), number of groups whose scores are all equal: those groups
    carry no learning signal, and their advantages are exactly 0).
    """
    if group_size < 1:
        raise ConfigError(f"group_size={group_size} must be >= 1")
    if norm not in ADVANTAGE_NORMS:
        raise ConfigError(f"advantage_norm={norm!r}: use one of {', '.join(ADVANTAGE_NORMS)}")
    if norm == "constant" and not constant > 0:
        raise ConfigError(f"advantage constant={constant!r} must be > 0")
    if scores.ndim != 1 or scores.numel() % group_size:
        raise InputError(f"scores of shape {tuple(scores.shape)} cannot be split into groups of {group_size}; "
                         f"pass a flat tensor whose length is a multiple of group_size")
    groups = scores.double().view(-1, group_size)  # (b, G)
    mean = groups.mean(-1, keepdim=True)
    centered = groups - mean
    spread = groups.max(-1).values - groups.min(-1).values
    zero_var = spread <= 1e-12 * groups.abs().max(-1).values.clamp(min=1.0)
    centered = centered.masked_fill(zero_var[:, None], 0.0)
    if norm == "std" and group_size > 1:
        centered = centered / (groups.std(-1, keepdim=True) + eps)
    elif norm == "mean":
        centered = centered / mean.abs().clamp(min=eps)
    elif norm == "constant":
        centered = centered / constant
    return centered.view(-1).to(scores.dtype), int(zero_var.sum())


def entropy_shaped_advantages(advantages: Tensor, entropy: Tensor, mask: Tensor, scale: float,
                              kappa: float) -> Tensor:
    """Advantages plus an entropy bonus per token (Cheng et al. 2025, "Reasoning with Exploration: An
    Entropy Perspective"): A'_t = A_t + min(scale * H_t, |A_t| / kappa), H_t the policy's entropy at
    token t with no gradient. The cap keeps the bonus from flipping the sign of a negative advantage
    (for kappa > 1) and gives a zero-advantage token no bonus. scale 0: unchanged.
    advantages, entropy, mask (b, T) -> (b, T), 0 on padding."""
    if scale < 0 or kappa <= 0:
        raise ConfigError(f"entropy_advantage scale={scale} must be >= 0 and kappa={kappa} > 0")
    mask = mask.bool()
    bonus = torch.minimum(scale * entropy.detach(), advantages.abs() / kappa)
    return (advantages + bonus).masked_fill(~mask, 0.0)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, reduce_sum: ReduceSum | None = None) -> Tensor:
    """1 - Var(returns - values) / Var(returns) over the masked tokens (1 = perfect critic, <= 0 useless),
    of every rank when `reduce_sum` is given.

    NaN-safe: returns 0 when the returns have no variance."""
    mask = mask.bool()
    if reduce_sum is None:
        var_ret, var_err = masked_var(returns, mask), masked_var(returns - values, mask)
    else:
        var_ret = global_masked_mean_var(returns, mask, reduce_sum)[1].to(returns.dtype)
        var_err = global_masked_mean_var(returns - values, mask, reduce_sum)[1].to(returns.dtype)
    if float(var_ret) <= 1e-12:
        return torch.zeros((), dtype=returns.dtype)
    return 1.0 - var_err / var_ret


__all__ = ["last_token_index", "kl_shaped_rewards", "gae", "global_masked_mean_var", "whiten", "group_advantages",
           "ADVANTAGE_NORMS", "entropy_shaped_advantages", "explained_variance"]
