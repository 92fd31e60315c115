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


def sample(logits: Tensor, greedy: bool, generator=None) -> Tensor:
    """Draw one token per row from softmax(logits): (b, V) -> (b,).

    Uses the exponential-race form of the Gumbel-max trick: argmax(p / E) with
    E ~ Exp(1) picks index i with probability p_i, and a seeded `generator`
    makes the draw repeatable. `generator` may also be a sequence of b
    generators, one per row: then a row's draw does not depend on which other
    rows share the batch (RL uses this to make rollouts independent of how
    prompts are split over processes).
    """
    if greedy:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    if isinstance(generator, (list, tuple)):
        race = torch.stack([torch.empty_like(probs[0]).exponential_(1.0, generator=g) for g in generator])  # (b, V)
    else:
        race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(-1)


def token_log_probs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[tokens]: (b, V), (b,) -> (b,)."""
    return logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
