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


SAMPLE_BLOCK = 256  # vocabulary entries per block of `sample`'s two-level search


def sample(logits: Tensor, greedy: bool, generator=None, uniform: Tensor | None = None) -> Tensor:
    """Draw one token per row from softmax(logits): (b, V) -> (b,).

    Inverse-CDF sampling: with u ~ U[0, 1) (fp64, 53 random bits), the token is the
    first index whose cumulative probability exceeds u, so index i is drawn with
    probability p_i, and a token with p_i = 0 (filtered out) never is. One random
    number per row, where the Gumbel-max race needs one per vocabulary entry (and
    `exponential_` costs ~19 ns per value on a CPU: 5 µs a row for 256 ids).

    The cumulative sum is taken in two levels when V > `SAMPLE_BLOCK`: over the sums of
    blocks of 256 entries, then inside the one block that holds u. A full fp64 cumsum of
    a 32,000-entry vocabulary (with its fp32 -> fp64 copy) took 3.1 of a 16.8 ms decode
    step of 16 rows on the development CPU (`benchmarks/decode_profile.py`); the two
    levels read the probabilities once more, in fp32.

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
    uniform = uniform.to(probs.device, torch.float64)[:, None]  # (b, 1)
    b, vocab = probs.shape
    if vocab <= SAMPLE_BLOCK:
        return _first_above(probs.double().cumsum(-1), uniform).squeeze(-1)
    pad = -vocab % SAMPLE_BLOCK
    blocks = (torch.nn.functional.pad(probs, (0, pad)) if pad else probs).view(b, -1, SAMPLE_BLOCK)
    ends = blocks.sum(-1).double().cumsum(-1)  # (b, blocks): the mass up to each block's end
    block = _first_above(ends, uniform)  # (b, 1): the block the draw falls in
    before = torch.where(block > 0, ends.gather(1, (block - 1).clamp(min=0)), 0.0)
    within = blocks.gather(1, block[:, :, None].expand(-1, -1, SAMPLE_BLOCK)).squeeze(1).double().cumsum(-1)
    # the draw's mass inside its block; clamped again below the block's own total (its sum above rounds differently)
    target = (uniform * ends[:, -1:] - before).clamp(min=0.0)
    return (block * SAMPLE_BLOCK + _first_above(within, target, scaled=False)).squeeze(-1)


def _first_above(cdf: Tensor, u: Tensor, scaled: bool = True) -> Tensor:
    """(b, n) non-decreasing, u (b, 1) -> the first index (b, 1) whose cdf exceeds u * total
    (`scaled`) or u; the target is kept below the total, after rounding too, so the furthest
    a draw reaches is the last entry with mass."""
    total = cdf[:, -1:]
    target = u * total if scaled else u
    target = torch.minimum(target, torch.nextafter(total, total.new_zeros(())))
    return torch.searchsorted(cdf, target, right=True)


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
