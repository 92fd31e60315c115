"""Checking prompts and packing a batch of them for the KV cache.

Prompts of different lengths are *left*-padded (see `palm_rlhf.model.kv_cache`):
every row then writes its next token into the same cache slot, so a decode
step is one batched matmul, and the cache's `pad` keeps padding invisible.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError


def _as_long_1d(prompt, index: int) -> Tensor:
    if not isinstance(prompt, Tensor):
        try:
            prompt = torch.as_tensor(prompt, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError) as e:
            raise InputError(f"prompt {index} is not a sequence of token ids: {e}") from None
    if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
        raise InputError(f"prompt {index} has dtype {prompt.dtype}; token ids must be integers (use .long())")
    if prompt.ndim != 1:
        raise InputError(f"prompt {index} has shape {tuple(prompt.shape)}; each prompt must be 1-D (n,)")
    if prompt.numel() == 0:
        raise InputError(f"prompt {index} is empty; every prompt needs at least one token "
                         f"(for unconditional text, start with a BOS/EOS id)")
    return prompt.long()


def pack_prompts(prompts, lengths=None, *, num_tokens: int, device=None) -> tuple[Tensor, Tensor]:
    """Validate prompts and left-pad them.

    prompts: a list of 1-D id tensors (or lists of ints); a single 1-D tensor
        (one prompt); or a right-padded (b, n) tensor, with `lengths` (b,) giving
        each row's real length (default: all n).
    Returns (ids (b, n_max) left-padded with 0, lengths (b,) long), on `device`.
    """
    if isinstance(prompts, Tensor) and prompts.ndim == 2:
        b, n = prompts.shape
        if b == 0 or n == 0:
            raise InputError(f"prompts of shape {(b, n)} are empty; need at least one row and one token")
        rows = _as_long_1d(prompts.reshape(-1), 0).view(b, n)
        if lengths is None:
            lengths = torch.full((b,), n, dtype=torch.long)
        lengths = torch.as_tensor(lengths, dtype=torch.long).reshape(-1).cpu()
        if lengths.shape[0] != b:
            raise InputError(f"lengths has {lengths.shape[0]} entries for {b} prompts")
        if bool((lengths < 1).any()) or bool((lengths > n).any()):
            raise InputError(f"lengths {lengths.tolist()} must each be in [1, {n}] (an empty prompt cannot "
                             f"be continued; the padded tensor has {n} columns)")
        prompt_list = [rows[i, : int(lengths[i])] for i in range(b)]
    else:
        if lengths is not None:
            raise InputError("lengths= is only for a padded (b, n) prompt tensor; a list of prompts "
                             "carries its own lengths")
        if isinstance(prompts, Tensor):
            prompts = [prompts]
        prompt_list = [_as_long_1d(p, i) for i, p in enumerate(prompts)]
        if not prompt_list:
            raise InputError("no prompts given; pass a list of 1-D token-id tensors")

    lengths = torch.tensor([p.numel() for p in prompt_list], dtype=torch.long)
    n_max = int(lengths.max())
    ids = torch.zeros(len(prompt_list), n_max, dtype=torch.long)
    for i, p in enumerate(prompt_list):
        lo, hi = int(p.min()), int(p.max())
        if lo < 0 or hi >= num_tokens:
            bad = lo if lo < 0 else hi
            raise InputError(f"prompt {i} contains token id {bad}, outside the model's vocabulary "
                             f"[0, {num_tokens}); check the tokenizer against PaLM(num_tokens=...)")
        ids[i, n_max - p.numel():] = p.cpu()
    return ids.to(device), lengths.to(device)
