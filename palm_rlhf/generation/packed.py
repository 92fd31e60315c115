"""Several prompts prefilled in one forward, packed into one row without padding.

A server prefills every waiting request this way, then each prompt's keys and values join
the decode cache of its row (`palm_rlhf.serving`); the decode backends' `prefill` take it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError


class PackedPrompts:
    """Several prompts prefilled as one row of one forward, without padding: each token sees
    only the earlier tokens of its own prompt (a block-diagonal causal mask) and has its
    position within that prompt. A server prefills every waiting request this way (one
    product per weight for all their tokens), then copies prompt i's keys/values,
    `prompt(i)`, into the cache its row decodes in.

    Same interface as `KVCache` for `PaLM.forward_cached` (one call, all tokens at once).
    `center` must be the decode cache's xpos centre (its max_len // 2), so that the keys
    computed here are the ones that cache would hold.
    """

    def __init__(self, lengths, depth: int, dim_head: int, center: int, *, device=None, dtype=torch.float32):
        if not lengths or min(lengths) < 1:
            raise InputError(f"every packed prompt needs at least one token; got lengths {list(lengths)}")
        sizes = torch.tensor(list(lengths), dtype=torch.long, device=device)
        self.ends = sizes.cumsum(0)
        self.starts = self.ends - sizes
        total = int(self.ends[-1])
        segment = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)  # (L,)
        index = torch.arange(total, device=device)
        self.segment, self.token_positions = segment, index - self.starts[segment]  # (L,) each
        self.k = torch.zeros(depth, total, dim_head, device=device, dtype=dtype)
        self.v = torch.zeros(depth, total, dim_head, device=device, dtype=dtype)
        self.center, self.length, self.total = center, 0, total

    @classmethod
    def like(cls, cache, lengths) -> "PackedPrompts":
        """Packed prompts whose keys/values fit `cache`, a `KVCache` (same depth, head size, xpos centre, dtype)."""
        depth, _, _, dim_head = cache.k.shape
        return cls(lengths, depth, dim_head, cache.center, device=cache.k.device, dtype=cache.k.dtype)

    def positions(self, n: int) -> Tensor:
        if self.length or n != self.total:
            raise InputError(f"packed prompts are prefilled in one call of all {self.total} tokens, got {n}")
        return self.token_positions[None]  # (1, L)

    def attention_mask(self, n: int) -> Tensor:
        index = torch.arange(self.total, device=self.k.device)
        seen = (self.segment[:, None] == self.segment[None, :]) & (index[None, :] <= index[:, None])  # (L, L)
        return seen[None, None]  # (1, 1, L, L)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k[layer], self.v[layer] = k[0], v[0]  # k, v (1, L, d)
        return k, v

    def advance(self, n: int) -> None:
        self.length += n

    def last_index(self) -> Tensor:
        """The index of each prompt's last token in the packed row: (prompts,)."""
        return self.ends - 1

    def prompt(self, i: int) -> tuple[Tensor, Tensor]:
        """Prompt i's keys and values, (depth, n_i, d) each."""
        start, end = int(self.starts[i]), int(self.ends[i])
        return self.k[:, start:end], self.v[:, start:end]
