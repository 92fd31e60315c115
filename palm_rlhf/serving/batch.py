"""The running decode batch of the server: rows join and leave between decode steps.

`palm_rlhf.generation` decodes a fixed set of prompts; a server gets new requests all the
time. This module keeps one left-padded `KVCache` (see `palm_rlhf.model.kv_cache`) whose rows
are slots: the waiting requests' prompts are prefilled together (`prefill`: one forward, no
padding), each prompt's keys/values are copied into a free slot so that they end at the batch's
current slot (the slot's `pad` says where they begin), and from then on it decodes in lock-step
with the others. A finished row frees its slot at once. So new requests join a running batch
(continuous batching) and short ones leave it.

- Capacity comes in buckets (1, 2, 4, ... up to `max_batch`): a decode step costs about the
  same for every row of the bucket, so a lone request does not pay for 64 rows. Each bucket's
  cache and decode engine (`backends.decoder_for`, weights bound in the layout best for that
  many rows) are built once and reused; moving to another bucket copies the live rows.
- Every row's keys were rotated by its own positions (0, 1, ... from its first token), and
  all caches share one `max_len`, hence one xpos centre, so copied keys stay valid.
- When the shared slot counter reaches `max_len`, the slots no live row uses any more (the
  smallest pad) are dropped by shifting everything left; a prompt longer than the counter
  shifts everything right. Both are copies of the live part of the cache.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import decoder_for
from ..generation import PackedPrompts


def _bucket(rows: int, max_batch: int) -> int:
    cap = 1
    while cap < rows:
        cap *= 2
    return min(cap, max_batch)


class DecodeBatch:
    """Slots of a KV cache holding live rows (any objects); `step(tokens)` decodes all of them."""

    def __init__(self, model, max_len: int, max_batch: int, finetune_scope=None):
        self.model, self.max_len, self.max_batch, self.scope = model, max_len, max_batch, finetune_scope
        self.pool: dict[int, tuple] = {}   # capacity -> (cache, decoder), built on first use
        self.cache = self.decoder = None
        self.rows: list = []               # slot -> row object or None

    # ------------------------------------------------------------------ slots

    @property
    def live(self) -> list[tuple[int, object]]:
        return [(slot, row) for slot, row in enumerate(self.rows) if row is not None]

    def __len__(self) -> int:
        return sum(row is not None for row in self.rows)

    @property
    def length(self) -> int:
        return self.cache.length if self.cache is not None else 0

    def prefill(self, prompts: list[list[int]]) -> tuple[Tensor, PackedPrompts]:
        """Prefill these prompts in one forward (packed into one row, no padding) -> each prompt's
        last-token logits (prompts, V) and the `PackedPrompts` whose `prompt(i)` keys/values `join`
        takes. Runs on the 4-row bucket's decoder: on a CPU its weights are prepacked for oneDNN,
        the fastest product for many rows (see `backends.cpu.Decoder.prefill`)."""
        cache, decoder = self._entry(_bucket(4, self.max_batch))
        packed = PackedPrompts.like(cache, [len(p) for p in prompts])
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=cache.k.device)
        return decoder.prefill(tokens, packed), packed

    def join(self, row, k: Tensor, v: Tensor) -> None:
        """Add a row whose prompt's keys and values are k, v (depth, n, d) (no padding; see `prefill`)."""
        n = k.shape[1]
        if n > self.max_len:
            raise ValueError(f"prompt of {n} tokens does not fit the {self.max_len}-slot cache")
        if None not in self.rows or (len(self) == 0 and len(self.rows) > 1):
            # full, or empty since the last burst: a lone row must not decode in a wide bucket
            self._resize(_bucket(len(self) + 1, self.max_batch))
        slot = self.rows.index(None)
        cache = self.cache
        if len(self) == 0:
            cache.reset(torch.zeros_like(cache.pad))
            cache.advance(n)
        elif cache.length < n:
            self._shift(n - cache.length)
        cache.write_row(slot, k, v)
        self.rows[slot] = row
        self.decoder.rebind(cache.pad)

    def leave(self, done) -> None:
        """Free the slots of these rows (objects given to `join`); the bucket shrinks to fit the rest."""
        done = {id(row) for row in done}
        if not done:
            return
        for slot, row in self.live:
            if id(row) in done:
                self.rows[slot] = None
                self.cache.pad[slot] = 0
        live = len(self)
        if live and _bucket(live, self.max_batch) < len(self.rows):
            self._resize(_bucket(live, self.max_batch))  # a copy of the live rows: cheaper than idle rows
        elif live:
            self.decoder.rebind(self.cache.pad)

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per slot (cap,) (anything for free slots); returns logits (cap, V)."""
        if self.cache.length >= self.max_len:
            self._compact()
        return self.decoder.step(tokens)

    # ------------------------------------------------------------------ cache moves

    def _live_pad(self) -> int:
        return min(int(self.cache.pad[slot]) for slot, _ in self.live)

    def _compact(self) -> None:
        """Drop the leading slots that no live row uses (its prompt starts later)."""
        cache, drop = self.cache, self._live_pad()
        if drop == 0:
            raise RuntimeError("a row outgrew the cache; requests are checked against the context first")
        cache.drop_leading(drop)
        self.decoder.rebind(cache.pad)

    def _shift(self, by: int) -> None:
        """Move every row's keys/values `by` slots later (room for a longer prompt)."""
        if self.cache.length + by > self.max_len:  # make room first
            self._compact()
        self.cache.shift_right(by)

    def _entry(self, cap: int):
        if cap not in self.pool:
            cache = self.model.new_kv_cache(cap, self.max_len)
            self.pool[cap] = (cache, decoder_for(self.model, cache, finetune_scope=self.scope))
        return self.pool[cap]

    def _resize(self, cap: int) -> None:
        """Move the live rows into the cache of capacity `cap` (slots renumbered from 0)."""
        live = self.live
        cache, decoder = self._entry(cap)
        if live:
            cache.take_rows(self.cache, torch.tensor([slot for slot, _ in live], device=self.cache.pad.device))
        else:
            cache.reset(torch.zeros_like(cache.pad))
        self.cache, self.decoder = cache, decoder
        self.rows = [row for _, row in live] + [None] * (cap - len(live))
        decoder.rebind(cache.pad)
