"""A small key/value cache: per layer, (batch, max_len, kv_dim) keys and values, where
kv_dim = kv_heads * dim_head (the heads side by side, as the projection writes them).

Allocated once for (batch, max_len); it never grows. With PaLM's multi-query attention
(kv_heads 1) the cache is 2 * depth * batch * max_len * dim_head values: for dim_head 64,
depth 6, batch 8 and 2048 positions that is 12.6 MB in fp32.

Prompts of different lengths are *left-padded*: row r's first `pad[r]` slots
are padding, so every row writes its next token into the same slot and a
decode step is one batched matmul. Positions are explicit: slot t of row r
holds position t - pad[r].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import InputError


class KVCache(nn.Module):
    def __init__(self, depth: int, batch: int, max_len: int, kv_dim: int, *, device=None,
                 dtype=torch.float32, pad: Tensor | None = None):
        super().__init__()
        self.max_len = max_len
        self.register_buffer("k", torch.zeros(depth, batch, max_len, kv_dim, device=device, dtype=dtype),
                             persistent=False)
        self.register_buffer("v", torch.zeros(depth, batch, max_len, kv_dim, device=device, dtype=dtype),
                             persistent=False)
        pad = torch.zeros(batch, dtype=torch.long, device=device) if pad is None else pad.to(device)
        self.register_buffer("pad", pad, persistent=False)  # (b,) left-padding per row
        self.length = 0  # slots filled so far (shared by all rows)
        # xpos centre: fixed for the cache's lifetime (see RotaryEmbedding)
        self.center = max_len // 2

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def reset(self, pad: Tensor | None = None) -> None:
        self.length = 0
        if pad is not None:
            self.pad.copy_(pad)

    def positions(self, n: int) -> Tensor:
        """Positions of the next n slots for every row: (b, n)."""
        if self.length + n > self.max_len:
            raise InputError(f"KV cache is full: {self.length} + {n} tokens > max_len {self.max_len}; "
                             f"allocate a larger cache")
        slots = torch.arange(self.length, self.length + n, device=self.k.device)
        return slots[None, :] - self.pad[:, None]

    def attention_mask(self, n: int) -> Tensor:
        """Which cached slots each of the next n queries may see: (b, 1, n, length + n).
        A padding slot's query sees only itself (it is never read, but must stay finite)."""
        end = self.length + n
        slots = torch.arange(end, device=self.k.device)
        query_slots = torch.arange(self.length, end, device=self.k.device)[:, None]  # (n, 1)
        not_pad = slots[None, :] >= self.pad[:, None]  # (b, j)
        seen = (slots <= query_slots) & (not_pad[:, None, :] | (slots == query_slots))  # (b, n, j)
        return seen[:, None]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (b, n, d) at the current offset; return all slots so far (b, j, d)."""
        n = k.shape[1]
        end = self.length + n
        self.k[layer, :, self.length:end] = k
        self.v[layer, :, self.length:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    # ---------------------------------------------------------------- slot moves (continuous batching)

    def write_row(self, row: int, k: Tensor, v: Tensor) -> None:
        """Put one prompt's keys and values (depth, n, kv_dim) into `row` so that they end at the
        current slot (`length`); the row's padding is everything before them."""
        n, end = k.shape[1], self.length
        if n > end:
            raise InputError(f"a prompt of {n} tokens does not end at slot {end}; shift the cache first")
        self.k[:, row, end - n:end] = k
        self.v[:, row, end - n:end] = v
        self.pad[row] = end - n

    def drop_leading(self, drop: int) -> None:
        """Forget the first `drop` slots of every row (no live row uses them): shift left."""
        end = self.length
        self.k[:, :, :end - drop] = self.k[:, :, drop:end].clone()
        self.v[:, :, :end - drop] = self.v[:, :, drop:end].clone()
        self.pad.sub_(drop).clamp_(min=0)
        self.length = end - drop

    def shift_right(self, by: int) -> None:
        """Move every row's slots `by` later (room for a longer prompt); the rows' padding grows."""
        end = self.length
        if end + by > self.max_len:
            raise InputError(f"cannot shift {end} slots by {by} in a {self.max_len}-slot cache; drop slots first")
        self.k[:, :, by:end + by] = self.k[:, :, :end].clone()
        self.v[:, :, by:end + by] = self.v[:, :, :end].clone()
        self.pad.add_(by)
        self.length = end + by

    def take_rows(self, other: "KVCache", rows: Tensor) -> None:
        """Become `other`'s `rows` (renumbered from 0), with its filled slots and their padding."""
        self.reset(torch.zeros_like(self.pad))
        end, live = other.length, len(rows)
        if live:
            self.k[:, :live, :end] = other.k[:, rows, :end]
            self.v[:, :live, :end] = other.v[:, rows, :end]
            self.pad[:live] = other.pad[rows]
            self.advance(end)

    def at(self, slot: Tensor) -> "StaticSlot":
        """This cache seen from one decode slot given as a tensor, for a compiled step."""
        return StaticSlot(self, slot)


class StaticSlot:
    """A `KVCache` at decode slot `slot` (a 0-d tensor) with shapes independent of the slot,
    as `torch.compile` needs: one query per row, attention over all max_len slots (those
    after `slot` and the padding masked). Same interface as the cache; the caller advances it."""

    def __init__(self, cache: KVCache, slot: Tensor):
        self.cache, self.slot, self.center = cache, slot, cache.center

    def positions(self, n: int) -> Tensor:
        return (self.slot - self.cache.pad)[:, None]  # (b, 1)

    def attention_mask(self, n: int) -> Tensor:
        slots = torch.arange(self.cache.max_len, device=self.slot.device)
        seen = (slots <= self.slot) & (slots >= self.cache.pad[:, None])  # (b, max_len)
        return seen[:, None, None]  # (b, 1, 1, max_len)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.cache.k[layer].index_copy_(1, self.slot.view(1), k)
        self.cache.v[layer].index_copy_(1, self.slot.view(1), v)
        return self.cache.k[layer], self.cache.v[layer]

    def advance(self, n: int) -> None:
        pass  # the caller advances the cache outside the compiled step

