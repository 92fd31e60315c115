"""Tensor helpers: the one home for small functions used across layers.

Masked statistics, log-prob gathering and the logit filters used by sampling.
Everything here is a pure function of its inputs.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor


# ---------------------------------------------------------------- masked statistics


def masked_sum(x: Tensor, mask: Tensor | None, dim=None) -> Tensor:
    if mask is not None:
        x = x.masked_fill(~mask.bool(), 0.0)
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor | None = None, dim=None) -> Tensor:
    """Mean of `x` over the positions where `mask` is true.

    An all-false mask gives 0 (never NaN): an empty selection contributes nothing
    to a loss rather than poisoning it.
    """
    if mask is None:
        return x.mean() if dim is None else x.mean(dim=dim)
    mask = mask.bool()
    total = masked_sum(x, mask, dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return total / count.clamp(min=1).to(total.dtype)


def masked_var(x: Tensor, mask: Tensor | None = None, unbiased: bool = True) -> Tensor:
    """Variance over the masked positions (all dims); 0 when fewer than 2 values."""
    n = x.numel() if mask is None else int(mask.bool().sum())
    if n < 2:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return masked_sum((x - masked_mean(x, mask)) ** 2, mask) / (n - 1 if unbiased else n)


# ---------------------------------------------------------------- log-probs


def log_probs_of(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[..., tokens] without materialising a second vocab tensor.

    logits (..., V) and tokens (...) -> (...). Computed in fp32 for stability.
    """
    logits = logits.float()
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) along the last dim, in nats (fp32)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ---------------------------------------------------------------- logit filters (new, unambiguous)


def filter_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the `k` largest logits per row (k is a count); others become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches `p`."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    # a token is dropped when the tokens ranked before it already reach p;
    # the top token is always kept (so p -> 0 means greedy, never an empty set)
    drop_sorted = (cum - sorted_logits.softmax(-1)) >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filter_min_p(logits: Tensor, min_p: float) -> Tensor:
    """Keep tokens whose probability is at least `min_p` times the top token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    threshold = probs.amax(-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


# ---------------------------------------------------------------- legacy seed filters


def top_k(logits: Tensor, thres: float = 0.9) -> Tensor:
    """Legacy (seed) semantics: keeps ceil((1 - thres) * vocab) tokens.

    `thres` is a *fraction of the vocabulary to drop*, not a count. Prefer
    `SamplingConfig(top_k=...)` / `filter_top_k`, which take a count.
    """
    k = math.ceil((1 - thres) * logits.shape[-1])
    val, ind = torch.topk(logits, k)
    out = torch.full_like(logits, float("-inf"))
    return out.scatter_(-1, ind, val)


def top_p(logits: Tensor, thres: float = 0.9) -> Tensor:
    """Legacy (seed) semantics: keeps the nucleus of mass (1 - thres).

    `thres=0.9` keeps a nucleus of 0.1, the inverse of the usual meaning. Prefer
    `SamplingConfig(top_p=...)` / `filter_top_p`. As in the seed, a token is kept
    while the mass ranked before it is <= 1 - thres (ties at the boundary keep
    one more token than `filter_top_p`), and the top token is always kept.
    """
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    mass_before = sorted_logits.softmax(-1).cumsum(-1)
    mass_before = F.pad(mass_before[..., :-1], (1, 0), value=0.0)  # exclusive cumsum
    drop_sorted = mass_before > (1 - thres)
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def gumbel_sample(logits: Tensor, temperature: float = 1.0, dim: int = -1, generator=None) -> Tensor:
    """Sample from softmax(logits / temperature) with the Gumbel-max trick."""
    noise = torch.empty_like(logits, dtype=torch.float32).uniform_(0, 1, generator=generator)
    exp_noise = (-torch.log(noise.clamp(min=1e-20))).clamp(min=1e-20)  # Exp(1), never 0
    gumbel = -torch.log(exp_noise)
    return ((logits / max(temperature, 1e-10)) + gumbel).argmax(dim=dim)


def masked_positions(mask: Tensor) -> tuple[Tensor, Tensor]:
    """mask (b, n) bool -> (positions (b, T), kept (b, T)): each row's True columns in order, then
    filler columns with kept False; T = the most True in a row (at least 1). A model asked for its
    outputs at `positions` only (`PaLM.forward(x, positions=...)`) skips the rest's last block and
    vocabulary projection: SFT's loss needs the assistant tokens alone."""
    T = max(int(mask.sum(-1).max()), 1) if mask.numel() else 1
    positions = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices[:, :T]  # True columns first
    return positions, mask.gather(-1, positions)


def token_cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean next-token cross entropy (nats) over the positions where `mask` is True.

    logits (b, n, V), targets (b, n), mask (b, n) bool or None (all positions). Computed in
    fp32 even under autocast. No ignore_index: which targets count is always an explicit mask.
    A mask with no True entries gives 0 (with a zero gradient), not NaN.
    """
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                             reduction="none")  # (b * n,)
    if mask is None:
        return losses.mean()
    mask = mask.reshape(-1).to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


@contextmanager
def eval_mode(module: torch.nn.Module):
    """`module.eval()` inside the block, its own train/eval mode restored after (errors included)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
