"""Policy-gradient, value and preference losses.

Per-token losses are (b, T) over response tokens; `aggregate` turns them into
one scalar with an explicit, masked normaliser so padding never counts and
empty batches give 0 instead of NaN. The normaliser can be passed in, which is
how a minibatch or a rank contributes exactly its share of a global mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

AGGREGATIONS = ("token_mean", "seq_mean", "seq_sum_norm")


def aggregate(x: Tensor, mask: Tensor, mode: str = "token_mean", *, max_len: int | None = None,
              denominator: float | None = None) -> Tensor:
    """Reduce per-token values (b, T) to a scalar.

    token_mean:   sum over real tokens / number of real tokens (every token weighs the same; DAPO)
    seq_mean:     mean over each sequence's tokens, then mean over sequences (original GRPO)
    seq_sum_norm: sum over each sequence's tokens / max_len, then mean over sequences (Dr. GRPO,
                  arXiv:2503.20783: no 1/|o| length bias)
    `denominator` replaces the local count (tokens for token_mean, sequences otherwise), so a
    minibatch of a larger batch can be normalised by the batch's count.
    """
    mask = mask.bool()
    x = x.masked_fill(~mask, 0.0)
    if mode == "token_mean":
        total = x.sum()
        count = mask.sum() if denominator is None else denominator
    elif mode == "seq_mean":
        per_seq = x.sum(-1) / mask.sum(-1).clamp(min=1)
        total, count = per_seq.sum(), (x.shape[0] if denominator is None else denominator)
    elif mode == "seq_sum_norm":
        if not max_len:
            raise ConfigError("loss aggregation 'seq_sum_norm' needs max_len (the generation budget)")
        total = x.sum() / max_len
        count = x.shape[0] if denominator is None else denominator
    else:
        raise ConfigError(f"unknown loss aggregation {mode!r}; use one of {', '.join(AGGREGATIONS)}")
    count = torch.as_tensor(count, dtype=x.dtype, device=x.device).clamp(min=1)
    return total / count


def aggregation_count(mask: Tensor, mode: str) -> Tensor:
    """The local count `aggregate` divides by for `mode` (summed across minibatches/ranks by trainers)."""
    return mask.bool().sum() if mode == "token_mean" else torch.tensor(mask.shape[0])


@dataclass
class PolicyTerms:
    """Per-token pieces of the clipped PPO objective, each (b, T), 0 on padding."""

    loss: Tensor        # max(-A * ratio, -A * clip(ratio)): minimise
    ratio: Tensor
    clipped: Tensor     # bool: the clipped branch was the active one (no gradient flows)
    approx_kl: Tensor   # k3 estimate of KL(old || new) per token, a trust-region diagnostic


def ppo_policy_terms(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2,
                     clip_eps_high: float | None = None) -> PolicyTerms:
    """Clipped surrogate (Schulman et al. 2017, arXiv:1707.06347), per token.

    ratio = exp(logp - old_logp); loss = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high)).
    With ratio == 1 the gradient is -A * grad(logp): exactly REINFORCE with the same advantages.
    """
    mask = mask.bool()
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = (logp - old_logp).masked_fill(~mask, 0.0)
    ratio = log_ratio.exp()
    adv = advantages.detach().masked_fill(~mask, 0.0)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    loss = torch.maximum(unclipped, clipped).masked_fill(~mask, 0.0)
    was_clipped = (clipped > unclipped) & mask
    approx_kl = ((ratio - 1.0) - log_ratio).detach().masked_fill(~mask, 0.0)
    return PolicyTerms(loss, ratio.detach(), was_clipped, approx_kl)


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip_range: float | None = 0.2) -> tuple[Tensor, Tensor]:
    """0.5 * max((V - R)^2, (V_clipped - R)^2) per token, V_clipped = old + clip(V - old, -c, c).

    Returns (per-token loss (b, T), bool (b, T) where the clipped branch was active).
    `clip_range=None` gives the plain squared error.
    """
    mask = mask.bool()
    returns = returns.detach()
    err = (values - returns) ** 2
    if clip_range is None:
        return (0.5 * err).masked_fill(~mask, 0.0), torch.zeros_like(mask)
    v_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * torch.maximum(err, err_clipped)
    # inside the clip range old + (V - old) may differ from V by one ulp: only a real clamp counts
    active = (values - old_values).abs().gt(clip_range) & (err_clipped > err) & mask
    return loss.masked_fill(~mask, 0.0), active


# ---------------------------------------------------------------- preference optimisation

PREFERENCE_LOSSES = ("sigmoid", "ipo")


@dataclass
class PreferenceLossOutput:
    """Per-pair values (b,): the loss, the implicit rewards beta * (logp - ref_logp) of each side."""

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor

    def metrics(self) -> dict[str, float]:
        margin = self.chosen_rewards - self.rejected_rewards
        return {"loss": float(self.loss.detach().mean()), "reward_accuracy": float((margin > 0).float().mean()),
                "reward_margin": float(margin.mean()), "chosen_reward": float(self.chosen_rewards.mean()),
                "rejected_reward": float(self.rejected_rewards.mean())}


def preference_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                    beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0
                    ) -> PreferenceLossOutput:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290) or IPO (Azar et al. 2023, arXiv:2310.12036).

    Inputs are (b,) log-probabilities of each response (DPO: summed over its tokens; IPO:
    averaged over its tokens, as the IPO paper does). With
        h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected):
    sigmoid: -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)   (eps = label_smoothing)
    ipo:     (h - 1 / (2 * beta))^2
    """
    if beta <= 0:
        raise ConfigError(f"beta={beta} must be > 0")
    chosen_logratio = policy_chosen - ref_chosen.detach()
    rejected_logratio = policy_rejected - ref_rejected.detach()
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        loss = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ConfigError(f"unknown preference loss {loss_type!r}; use one of {', '.join(PREFERENCE_LOSSES)}")
    return PreferenceLossOutput(loss, beta * chosen_logratio.detach(), beta * rejected_logratio.detach())


__all__ = ["AGGREGATIONS", "aggregate", "aggregation_count", "PolicyTerms", "ppo_policy_terms",
           "clipped_value_loss", "PREFERENCE_LOSSES", "PreferenceLossOutput", "preference_loss"]
