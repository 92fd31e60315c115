"""KL to the reference policy: per-token estimators and the coefficient controllers.

Estimators (http://joschu.net/blog/kl-approx.html), with log r = ref - logp on
tokens sampled from the policy:

    k1 = logp - ref              unbiased for KL(pi || ref), can be negative per token
    k2 = 0.5 * (logp - ref)^2    biased, low variance, always >= 0
    k3 = exp(ref - logp) - (ref - logp) - 1   unbiased and always >= 0 per token

The direction is KL(policy || reference): the samples come from the policy.
(The seed's "KL" compared old and new rollout policies, with the arguments reversed.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_per_token(logp: Tensor, ref_logp: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token KL(policy || ref) estimate from the sampled tokens' log-probs (same shape in and out)."""
    diff = logp - ref_logp
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * diff.pow(2)
    if estimator == "k3":
        # exp(-d) + d - 1 >= 0; clamp the exponent so a huge drift cannot overflow to inf
        neg = (-diff).clamp(max=20.0)
        return neg.exp() - neg - 1.0
    raise ConfigError(f"unknown KL estimator {estimator!r}; use one of {', '.join(KL_ESTIMATORS)}")


@dataclass
class FixedKLController:
    """A constant KL coefficient."""

    value: float = 0.05

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": float(self.value)}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Proportional controller of lm-human-preferences (Ziegler et al. 2019, arXiv:1909.08593, sec. 2.2).

    After each batch of `n_steps` samples with mean sequence KL `current_kl`:
        e = clip(current_kl / target - 1, -0.2, 0.2)
        value <- value * (1 + e * n_steps / horizon)
    so the coefficient rises while the KL is above target and falls while it is below.
    """

    value: float = 0.05
    target: float = 6.0
    horizon: int = 10000

    def __post_init__(self):
        if self.target <= 0:
            raise ConfigError(f"AdaptiveKLController(target={self.target}) must be > 0")
        if self.horizon <= 0:
            raise ConfigError(f"AdaptiveKLController(horizon={self.horizon}) must be > 0")

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": float(self.value), "target": float(self.target), "horizon": int(self.horizon)}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), int(state["horizon"])


def make_kl_controller(coef: float, target: float | None = None, horizon: int = 10000):
    """Fixed when `target` is None, adaptive otherwise."""
    if coef < 0:
        raise ConfigError(f"kl_coef={coef} must be >= 0")
    if target is None:
        return FixedKLController(coef)
    return AdaptiveKLController(coef, target, horizon)


def negative_kl_is_significant(kl_tokens: Tensor, mask: Tensor, z: float = 3.0) -> bool:
    """True when the mean k1 over real tokens is below zero by more than `z` standard errors.

    k1 is unbiased, so a mean that is clearly negative means the log-probs used for the
    policy and the reference disagree on what was sampled (a bug, or mismatched temperature).
    """
    mask = mask.bool()
    n = int(mask.sum())
    if n < 2:
        return False
    vals = kl_tokens[mask].double()
    mean, std = vals.mean(), vals.std()
    return bool(mean < -z * std / n ** 0.5) and bool(mean < -1e-6)


@dataclass
class SequenceKL:
    """KL(policy || reference) per sequence, estimated on responses sampled from the policy.

    mean: the mean over sequences of sum_t (logp - ref_logp) (nats per sequence, the k1
    estimator summed over each response's tokens: unbiased, a single sequence can be < 0);
    stderr: its standard error over sequences (0 with one sequence); per_token: the mean over
    all real tokens; sequences: how many went in.
    """

    mean: float
    stderr: float
    per_token: float
    sequences: int

    def over(self, budget: float | None) -> bool:
        """Whether the mean passed `budget` nats per sequence (None: no budget)."""
        return budget is not None and self.mean > budget


def sequence_kl(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> SequenceKL:
    """Summed log-ratio policy vs reference over each sampled response.

    logp, ref_logp: (b, T) log-probs of the sampled tokens under the policy and the reference;
    mask: (b, T) True on real response tokens (padding contributes nothing).
    """
    if logp.shape != ref_logp.shape or logp.shape != mask.shape or logp.dim() != 2:
        raise ConfigError(f"sequence_kl: logp {tuple(logp.shape)}, ref_logp {tuple(ref_logp.shape)} and mask "
                          f"{tuple(mask.shape)} must be the same (b, T) shape")
    mask = mask.bool()
    per_seq = ((logp.double() - ref_logp.double()) * mask).sum(-1)  # (b,)
    b = per_seq.numel()
    stderr = float(per_seq.std() / b ** 0.5) if b > 1 else 0.0
    tokens = int(mask.sum())
    per_token = float(per_seq.sum() / tokens) if tokens else 0.0
    return SequenceKL(float(per_seq.mean()) if b else 0.0, stderr, per_token, b)


__all__ = ["KL_ESTIMATORS", "kl_per_token", "FixedKLController", "AdaptiveKLController", "make_kl_controller",
           "negative_kl_is_significant", "SequenceKL", "sequence_kl"]
