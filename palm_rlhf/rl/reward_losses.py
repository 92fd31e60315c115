"""Reward-model losses and validation metrics: pure functions of tensors.

* `bradley_terry_loss` - pairwise preferences (Bradley & Terry 1952; Ouyang et al. 2022 eq. 1):
  ``-log sigma(r_chosen - r_rejected - margin)``. The optional margin (Llama 2, Touvron et al. 2023,
  eq. 2) asks for at least that gap before the loss flattens.
* `binned_rating_loss` - cross-entropy over rating bins (the seed's ``num_binned_output``).
* `rating_mse_loss` - regression on a scalar rating (the seed's scalar head).
* `implicit_prm_loss` - re-exported from `palm_rlhf.model.implicit_prm`, its one home.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from ..model.implicit_prm import implicit_prm_loss

_REDUCTIONS = ("mean", "sum", "none")


def _reduce(x: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    return x


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise InputError(f"reduction={reduction!r}; use one of {', '.join(_REDUCTIONS)}")


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | float | None = None,
                       reduction: str = "mean") -> Tensor:
    """``-log sigma(r_c - r_r - margin)`` per pair, reduced. Rewards (b,), margin scalar or (b,).

    `F.logsigmoid` keeps it finite for any gap (``log(sigmoid(x))`` underflows to -inf at x ~ -104).
    """
    _check_reduction(reduction)
    if chosen_rewards.shape != rejected_rewards.shape:
        raise InputError(f"chosen rewards {tuple(chosen_rewards.shape)} and rejected rewards "
                         f"{tuple(rejected_rewards.shape)} must have the same shape (one pair per row)")
    gap = chosen_rewards.float() - rejected_rewards.float()
    if margin is not None:
        gap = gap - (margin.float() if isinstance(margin, Tensor) else float(margin))
    return _reduce(-F.logsigmoid(gap), reduction)


def binned_rating_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of bin logits (b, K) against integer bin labels (b,) in [0, K)."""
    _check_reduction(reduction)
    if labels.is_floating_point():
        if not torch.equal(labels, labels.round()):
            raise InputError("binned ratings must be whole numbers (bin indices); use a scalar head "
                             "(num_binned_output=0) for fractional ratings")
        labels = labels.long()
    k = logits.shape[-1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise InputError(f"rating labels must lie in [0, {k - 1}] for {k} bins; got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return F.cross_entropy(logits.float(), labels, reduction=reduction)


def rating_mse_loss(pred: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Squared error of a scalar reward (b,) against ratings (b,)."""
    _check_reduction(reduction)
    return F.mse_loss(pred.float(), labels.to(torch.float32), reduction=reduction)


@torch.no_grad()
def pairwise_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """accuracy: fraction of pairs with r_c > r_r (a tie counts 1/2, so a constant model scores 0.5);
    mean_margin: mean of r_c - r_r."""
    gap = chosen_rewards.float() - rejected_rewards.float()
    acc = (gap > 0).float() + 0.5 * (gap == 0).float()
    return {"accuracy": acc.mean().item(), "mean_margin": gap.mean().item()}


@torch.no_grad()
def rating_metrics(pred: Tensor, labels: Tensor) -> dict[str, float]:
    """accuracy: the prediction rounded to the nearest whole rating equals the label; mae: mean |pred - label|."""
    pred, labels = pred.float(), labels.float()
    return {"accuracy": (pred.round() == labels).float().mean().item(),
            "mae": (pred - labels).abs().mean().item()}


__all__ = ["bradley_terry_loss", "binned_rating_loss", "rating_mse_loss", "implicit_prm_loss",
           "pairwise_metrics", "rating_metrics"]
