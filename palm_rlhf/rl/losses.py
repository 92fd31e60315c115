"""Policy-gradient, value and preference losses.

Per-token losses are (b, T) over response tokens; `aggregate` turns them into
one scalar with an explicit, masked normaliser so padding never counts and
empty batches give 0 instead of NaN. The normaliser can be passed in, which is
how a minibatch or a rank contributes exactly its share of a global mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


def spo_policy_terms(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                     eps: float = 0.2) -> PolicyTerms:
    """Simple Policy Optimization (Xie et al., arXiv:2401.16025, Algorithm 1 line 14), per token:
    loss = -A * ratio + |A| / (2 * eps) * (ratio - 1)^2.

    The quadratic penalty replaces PPO's clip: its gradient keeps pulling the ratio back toward 1
    (the loss is minimised at ratio = 1 + eps * sign(A)) instead of vanishing once the ratio leaves
    [1 - eps, 1 + eps]. At ratio 1 its gradient is -A * grad(logp), as PPO's. `clipped` marks the
    tokens whose ratio is outside [1 - eps, 1 + eps] (a trust-region diagnostic; no branch is cut)."""
    if eps <= 0:
        raise ConfigError(f"clip_eps={eps} must be > 0 (SPO's penalty is |A| / (2 * clip_eps))")
    mask = mask.bool()
    log_ratio = (logp - old_logp).masked_fill(~mask, 0.0)
    ratio = log_ratio.exp()
    adv = advantages.detach().masked_fill(~mask, 0.0)
    loss = (-adv * ratio + adv.abs() / (2.0 * eps) * (ratio - 1.0) ** 2).masked_fill(~mask, 0.0)
    outside = ((ratio.detach() - 1.0).abs() > eps) & mask
    approx_kl = ((ratio - 1.0) - log_ratio).detach().masked_fill(~mask, 0.0)
    return PolicyTerms(loss, ratio.detach(), outside, approx_kl)


def score_centering_loss(log_probs: Tensor, sampler_probs: Tensor, actions: Tensor, advantages: Tensor,
                         mask: Tensor, topk: int | None = None, weight_fn: Callable[[Tensor], Tensor] | None = None,
                         eps: float = 1e-6) -> Tensor:
    """Score-centred policy gradient (Marek & Ryabinin, arXiv:2609.20807), per token (b, T), 0 on padding.

    log_probs (b, T, V): the policy's log-softmax over the vocabulary (differentiable); sampler_probs
    (b, T, V): the distribution the tokens were sampled from (no gradient); actions (b, T) the sampled
    ids; advantages (b, T); weight_fn: an importance weight f(ratio) (None: 1, no importance weighting;
    e.g. `lambda r: r.clamp(max=2)` is truncated IS). With p = exp(log_probs), q = sampler_probs and
    r = p / q (no gradient):

        loss_t = -A_t * (f(r_a) * log p_a - sum_v c_v * log p_v),   c_v = q_v * f(r_v)   (no gradient)

    The centring term removes the expected score under the sampler, so a training/inference mismatch
    between p and q adds no systematic drift. Its gradient, with f = 1 and p = q, is exactly
    REINFORCE's (sum_v p_v grad log p_v = 0). topk k < V: the sum runs over q's k most likely tokens,
    and the rest of the vocabulary is one tail event of mass 1 - sum_k: the coefficients become
    c_v = q_v f(r_v) - f(rho) / rho * p_v with rho = (1 - sum_k p) / (1 - sum_k q)."""
    mask = mask.bool()
    q = sampler_probs.detach()
    w = weight_fn if weight_fn is not None else torch.ones_like
    logp_a = log_probs.gather(-1, actions[..., None]).squeeze(-1)
    q_a = q.gather(-1, actions[..., None]).squeeze(-1)
    ratio_a = (logp_a.detach().exp() / q_a.clamp(min=eps))
    weighted = w(ratio_a) * logp_a
    vocab = log_probs.shape[-1]
    if topk is not None and topk < 1:
        raise ConfigError(f"score_centering_topk={topk} must be >= 1 (or null: the full vocabulary)")
    use_topk = topk is not None and topk < vocab
    if use_topk:
        head_q, head_ids = q.topk(topk, dim=-1)
        head_logp = log_probs.gather(-1, head_ids)
    else:
        head_q, head_logp = q, log_probs
    head_p = head_logp.detach().exp()
    coef = head_q * w(head_p / head_q.clamp(min=eps))
    if use_topk:
        tail_q = (1.0 - head_q.sum(-1)).clamp(min=eps)
        tail_p = (1.0 - head_p.sum(-1)).clamp(min=eps)
        rho = tail_p / tail_q
        coef = coef - (w(rho) / rho)[..., None] * head_p
    centred = weighted - (coef.detach() * head_logp).sum(-1)
    return (-advantages.detach() * centred).masked_fill(~mask, 0.0)


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


__all__ = ["AGGREGATIONS", "aggregate", "aggregation_count", "PolicyTerms", "ppo_policy_terms", "spo_policy_terms",
           "score_centering_loss",
           "clipped_value_loss", "PREFERENCE_LOSSES", "PreferenceLossOutput", "preference_loss"]
