"""Input and configuration checks of the decoder: bad input raises, with the fix in the message."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError, InputError

BLOCKS = ("parallel", "sequential")


def check_family(block, heads, kv_heads, causal, ff_inner, sliding_window):
    if block not in BLOCKS:
        raise ConfigError(f"PaLM(block={block!r}): block must be one of {', '.join(BLOCKS)}")
    if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
        raise ConfigError(f"PaLM(kv_heads={kv_heads!r}): the key/value heads must be a positive divisor of "
                          f"heads={heads}")
    if block == "parallel" and kv_heads != 1:
        raise ConfigError(f"PaLM(kv_heads={kv_heads}): PaLM's parallel block is multi-query (kv_heads=1); "
                          f"grouped-query attention needs block='sequential'")
    if block == "sequential" and not causal:
        raise ConfigError("PaLM(block='sequential') is a causal decoder; causal=False is PaLM's parallel block only")
    for name, value in (("ff_inner", ff_inner), ("sliding_window", sliding_window)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ConfigError(f"PaLM({name}={value!r}) must be a positive integer or None")


def check_config(dim, num_tokens, depth, dim_head, heads, ff_mult, attn_dropout, ff_dropout, lora_r,
                  rotary_xpos_scale_base):
    for name, value in (("dim", dim), ("num_tokens", num_tokens), ("depth", depth), ("dim_head", dim_head),
                        ("heads", heads), ("ff_mult", ff_mult), ("lora_r", lora_r)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"PaLM({name}={value!r}): {name} must be a positive integer")
    if dim_head % 2:
        raise ConfigError(f"PaLM(dim_head={dim_head}): rotary embeddings need an even dim_head; use {dim_head + 1}")
    for name, value in (("attn_dropout", attn_dropout), ("ff_dropout", ff_dropout)):
        if not 0.0 <= float(value) < 1.0:
            raise ConfigError(f"PaLM({name}={value!r}): dropout must be in [0, 1)")
    if not float(rotary_xpos_scale_base) > 0:
        raise ConfigError(f"PaLM(rotary_xpos_scale_base={rotary_xpos_scale_base!r}) must be > 0")


class InputChecks:
    """Mixin for `PaLM`: token ids and extra embeddings checked before a forward."""

    def _check_tokens(self, x: Tensor, min_len: int = 1) -> None:
        if not isinstance(x, Tensor):
            raise InputError(f"token ids must be a torch.Tensor, got {type(x).__name__}")
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise InputError(f"token ids must be an integer tensor, got dtype {x.dtype}; use x.long()")
        if x.ndim != 2:
            raise InputError(f"token ids must have shape (batch, seq_len), got {tuple(x.shape)}; "
                             f"use x.unsqueeze(0) for a single sequence")
        if x.shape[-1] < min_len or x.shape[0] == 0:
            raise InputError(f"token ids of shape {tuple(x.shape)} are too short: need seq_len >= {min_len}"
                             + (" for return_loss (inputs and shifted labels)" if min_len > 1 else ""))
        lo, hi = torch.aminmax(x)
        lo, hi = int(lo), int(hi)
        low_ok = 0 if self.causal else -(2**62)
        if lo < low_ok or hi >= self.num_tokens:
            bad = lo if lo < low_ok else hi
            neg = "" if self.causal else " (negative ids mark padding in non-causal mode)"
            raise InputError(f"token id {bad} is outside [0, {self.num_tokens}){neg}; "
                             f"check the tokenizer's vocabulary against PaLM(num_tokens={self.num_tokens})")

    def _check_extra_embed(self, extra_embed: Tensor | None, x: Tensor) -> None:
        if extra_embed is None:
            return
        expected = (*x.shape, self.dim)
        try:
            torch.broadcast_shapes(tuple(extra_embed.shape), expected)
            ok = extra_embed.ndim <= 3 and extra_embed.shape[-1] == self.dim
        except RuntimeError:
            ok = False
        if not ok:
            raise InputError(f"extra_embed of shape {tuple(extra_embed.shape)} does not match the token "
                             f"embeddings {expected}; it must broadcast to (batch, seq_len, dim={self.dim})")
