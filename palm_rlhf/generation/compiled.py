"""`torch.compile` of the decode step (`generate(..., compile=True)`).

A compiled step needs fixed shapes, so it runs the model's own forward
(`PaLM.forward_cached`) against `KVCache.at(slot)`: a cache allocated once per
(model, batch, cache length, dtype, LoRA scope) and reused by later calls,
seen with attention over every slot and the current slot passed as a tensor. Cache lengths are rounded up to a multiple of
`BUCKET` so prompts of similar length share one compiled graph.

Compilation is slow (seconds to a minute on a small CPU) and needs a working
C++ toolchain on CPU; when it fails the step falls back to the eager decode
path with a warning, and the failure is remembered so later calls do not retry.
"""

from __future__ import annotations

import logging
import warnings
import weakref

import torch
from torch import Tensor

from ..errors import InputError


log = logging.getLogger(__name__)

BUCKET = 256
_STATE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {key: CompiledDecoder}
_FAILED: set = set()  # reasons already warned about


def static_length(n: int) -> int:
    return -(-n // BUCKET) * BUCKET


def _compile_fn(fn):
    return torch.compile(fn, dynamic=False, fullgraph=True)


class CompiledDecoder:
    """A decoder (`step(tokens (b,)) -> logits (b, V)`) whose step is one compiled graph."""

    def __init__(self, model, cache, finetune_scope, disable_lora):
        self.cache = cache
        scope = dict(finetune_scope=finetune_scope, disable_lora=disable_lora)
        self.fn = _compile_fn(lambda tokens, slot: model.forward_cached(tokens[:, None], cache.at(slot), **scope))

    def step(self, tokens: Tensor) -> Tensor:
        if self.cache.length >= self.cache.max_len:
            raise InputError(f"KV cache is full ({self.cache.max_len} slots); allocate a larger cache")
        logits = self.fn(tokens, torch.tensor(self.cache.length, device=tokens.device))
        self.cache.advance(1)
        return logits


def compiled_decoder(model, batch: int, max_len: int, pad, finetune_scope, disable_lora) -> CompiledDecoder | None:
    """A decoder on a reused static cache whose step is compiled, or None when
    compilation is unavailable (after warning once)."""
    if "compile" in _FAILED:
        return None
    dtype = model.token_emb.weight.dtype
    key = (batch, static_length(max_len), dtype, finetune_scope, bool(disable_lora))
    decoders = _STATE.setdefault(model, {})
    decoder = decoders.get(key)
    if decoder is None:
        cache = model.new_kv_cache(batch, key[1], pad=pad)
        try:
            decoder = CompiledDecoder(model, cache, finetune_scope, disable_lora)
        except Exception as e:  # noqa: BLE001 - any failure means "use eager"
            _fall_back(e)
            return None
        decoders[key] = decoder
    else:
        decoder.cache.reset(pad)
    return decoder


def first_step(decoder: CompiledDecoder, tokens):
    """Run the first compiled step (where compilation actually happens); on failure
    warn, forget the compiled decoder and return None so the caller goes eager."""
    try:
        return decoder.step(tokens)
    except Exception as e:  # noqa: BLE001 - dynamo/inductor raise many types
        _fall_back(e)
        for decoders in _STATE.values():
            for key in [k for k, d in decoders.items() if d is decoder]:
                del decoders[key]
        return None


def _fall_back(error: Exception) -> None:
    _FAILED.add("compile")
    warnings.warn(f"torch.compile of the decode step failed ({type(error).__name__}: {error}); "
                  f"falling back to the eager decode step", RuntimeWarning, stacklevel=3)
