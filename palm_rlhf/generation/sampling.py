"""Turning next-token logits into a token and its log-probability.

`process_logits` applies the `SamplingConfig` (repetition penalty, temperature,
top-k, top-p, min-p) and returns the logits of the *sampling distribution*;
`sample` draws from it. The log-prob a rollout records is
`log_softmax(process_logits(...))[token]`: the probability with which the token
was actually drawn. With temperature 0 (greedy) the draw is an argmax, and the
recorded log-prob is that of the same processed logits at temperature 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import filter_min_p, filter_top_k, filter_top_p
from .config import SamplingConfig


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL repetition penalty. logits (b, V) float, seen (b, V) bool: tokens already present.

    A seen token's logit l becomes l / penalty if l > 0 else l * penalty, so a
    penalty > 1 always makes it less likely.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def process_logits(logits: Tensor, config: SamplingConfig, seen: Tensor | None = None) -> Tensor:
    """(b, V) raw logits -> (b, V) fp32 logits of the sampling distribution (-inf = filtered out)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.temperature > 0 and config.temperature != 1.0:
        logits = logits / config.temperature
    logits = filter_top_k(logits, config.top_k)
    logits = filter_top_p(logits, config.top_p)
    return filter_min_p(logits, config.min_p)


def sample(logits: Tensor, greedy: bool, generator=None, uniform: Tensor | None = None) -> Tensor:
    """Draw one token per row from softmax(logits): (b, V) -> (b,).

    Inverse-CDF sampling: with u ~ U[0, 1) (fp64, 53 random bits), the token is the
    first index whose cumulative probability exceeds u, so index i is drawn with
    probability p_i, and a token with p_i = 0 (filtered out) never is. One random
    number per row, where the Gumbel-max race needs one per vocabulary entry (and
    `exponential_` costs ~19 ns per value on a CPU: 5 µs a row for 256 ids).

    `generator` makes the draw repeatable; it may also be a sequence of b generators,
    one per row: then a row's draw does not depend on which other rows share the
    batch (RL uses this to make rollouts independent of how prompts are split over
    processes). `uniform`: the u's (b,), drawn beforehand (see `RowUniforms`); then
    `generator` is not used.
    """
    if greedy:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    if uniform is None:
        if isinstance(generator, (list, tuple)):
            uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=probs.device)
                                 for g in generator])
        else:
            uniform = torch.rand(probs.shape[0], generator=generator, dtype=torch.float64, device=probs.device)
    cdf = probs.double().cumsum(-1)  # (b, V)
    total = cdf[:, -1:]
    # u * total < total, also after rounding: the last kept token is the furthest a draw can reach
    target = torch.minimum(uniform.to(cdf.device, cdf.dtype)[:, None] * total, torch.nextafter(total, total.new_zeros(())))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


class RowUniforms:
    """The u's of `sample` for rows with one generator each, drawn for every step at once:
    one call per row per `generate` instead of one per row and step. Each row's draws
    come from its own generator alone, so they do not depend on the rest of the batch.
    """

    def __init__(self, generators, steps: int, device):
        self.draws = torch.stack([torch.rand(steps, generator=g, dtype=torch.float64, device=device)
                                  for g in generators], dim=1)  # (steps, b)

    def __call__(self, t: int) -> Tensor:
        """The u's (b,) for step t."""
        return self.draws[t]


def token_log_probs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[tokens]: (b, V), (b,) -> (b,)."""
    return logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
