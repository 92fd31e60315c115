"""Sequence-level TPO (arXiv:2604.06159): within each prompt's group of G samples, a target
distribution over the G responses,

    q = softmax(log pi_old(y_j|x) + z_j / eta),   z = the group's z-scored rewards,

and the policy's distribution over the same G responses, softmax_j(log pi(y_j|x)), is trained
toward q by cross-entropy, with an entropy bonus. q tilts the sampler's own preference among its
samples by exp(z / eta): eta small -> close to the best sample, eta large -> close to pi_old.
A group whose rewards are all equal has no target beyond pi_old and is left out of the loss
entirely: it leaves the policy unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .reinforce import grouped


def tpo_targets(old_seq_logp: Tensor, scores: Tensor, group_size: int, eta: float = 1.0
                ) -> tuple[Tensor, Tensor]:
    """old_seq_logp (b * G,) summed response log-probs under the sampler; scores (b * G,), group by group.
    Returns (targets (b, G), each row summing to 1; has_variance (b,) bool: False where every reward
    of the group is equal, whose target is then softmax(old log-probs))."""
    if eta <= 0:
        raise ConfigError(f"tpo eta={eta} must be > 0")
    if group_size < 2:
        raise ConfigError(f"group_size={group_size} must be >= 2 (TPO compares the samples of a prompt)")
    s = grouped(scores.double(), group_size)
    std = s.std(-1, keepdim=True)
    has_variance = (s.max(-1).values - s.min(-1).values) > 1e-12 * s.abs().max(-1).values.clamp(min=1.0)
    z = torch.where(has_variance[:, None], (s - s.mean(-1, keepdim=True)) / std.clamp(min=1e-8),
                    torch.zeros_like(s))
    old = F.log_softmax(grouped(old_seq_logp.double(), group_size), -1)
    return F.softmax(old + z / eta, -1).to(old_seq_logp.dtype), has_variance


def tpo_loss(seq_logp: Tensor, seq_entropy: Tensor, targets: Tensor, has_variance: Tensor, group_size: int,
             ent_coef: float = 0.0) -> Tensor:
    """Per-group loss (b,): cross-entropy H(q, softmax_j(seq_logp_j)) - ent_coef * mean_j(seq_entropy_j),
    and exactly 0 (no gradient) for a group without reward variance.
    seq_logp (b * G,) summed response log-probs under the current policy (differentiable);
    seq_entropy (b * G,) each response's mean per-token entropy; targets (b, G), has_variance (b,)
    from `tpo_targets`."""
    if ent_coef < 0:
        raise ConfigError(f"ent_coef={ent_coef} must be >= 0")
    logp = F.log_softmax(grouped(seq_logp, group_size), -1)
    ce = -(targets.detach() * logp).sum(-1)
    loss = ce - ent_coef * grouped(seq_entropy, group_size).mean(-1)
    return torch.where(has_variance, loss, torch.zeros_like(loss))


__all__ = ["tpo_targets", "tpo_loss"]
