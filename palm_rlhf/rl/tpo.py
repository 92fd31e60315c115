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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..ops import masked_mean
from .kl import kl_per_token
from .reinforce import check_group_size, grouped
from .rollout import Rollout


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


@dataclass
class TPOHyperparams:
    """group_size: samples per prompt; eta: the target's temperature on z-scored rewards; ent_coef: entropy
    bonus (the seed's beta_s); kl_coef: weight of GRPO's k3 KL to the reference, token mean per response,
    averaged over the group (0: none, as the seed)."""

    group_size: int = 8
    eta: float = 1.0
    ent_coef: float = 0.01
    kl_coef: float = 0.0

    def __post_init__(self):
        check_group_size(self.group_size, "TPO compares the samples of a prompt")
        if self.eta <= 0:
            raise ConfigError(f"eta={self.eta} must be > 0")
        if self.ent_coef < 0 or self.kl_coef < 0:
            raise ConfigError("ent_coef and kl_coef must be >= 0")


def tpo_minibatch_loss(logp: Tensor, entropy: Tensor, mb: Rollout, hp: TPOHyperparams
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean TPO loss over the minibatch's groups (mb holds whole groups, rows i*G .. i*G+G-1 sharing a
    prompt). logp, entropy (b, T) under the current weights. The target comes from the rollout's own
    old log-probs and scores, so it is fixed for every epoch over the rollout."""
    mask = mb.mask
    m = mask.to(logp.dtype)
    targets, has_variance = tpo_targets(mb.old_log_probs.sum(-1), mb.scores.float(), hp.group_size, hp.eta)
    seq_entropy = (entropy * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    per_group = tpo_loss((logp * m).sum(-1), seq_entropy, targets, has_variance, hp.group_size, hp.ent_coef)
    kl = kl_per_token(logp, mb.ref_log_probs, "k3").masked_fill(~mask, 0.0)
    if hp.kl_coef > 0:
        seq_kl = (kl * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        per_group = per_group + hp.kl_coef * grouped(seq_kl, hp.group_size).mean(-1)
    with torch.no_grad():
        stats = {"policy_loss": per_group.mean(), "kl_k3": masked_mean(kl, mask), "entropy": masked_mean(entropy, mask),
                 "target_max": targets.max(-1).values.mean(), "tokens": mask.sum().float()}
    return per_group.mean(), stats


__all__ = ["tpo_targets", "tpo_loss", "TPOHyperparams", "tpo_minibatch_loss"]
