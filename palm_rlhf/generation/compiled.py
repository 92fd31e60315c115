"""`torch.compile` of the decode step (`generate(..., compile=True)`).

A compiled step needs fixed shapes, so it runs `Decoder.static_step` against a
*static* cache: allocated once per (model, batch, cache length, dtype, LoRA
scope) and reused by later calls, with attention over every slot and the
current slot passed as a tensor. Cache lengths are rounded up to a multiple of
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

from ..model.decode import Decoder

log = logging.getLogger(__name__)

BUCKET = 256
_STATE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {key: Decoder}
_FAILED: set = set()  # reasons already warned about


def static_length(n: int) -> int:
    return -(-n // BUCKET) * BUCKET


def _compile_fn(fn):
    return torch.compile(fn, dynamic=False, fullgraph=True)


def compiled_decoder(model, batch: int, max_len: int, pad, finetune_scope, disable_lora) -> Decoder | None:
    """A Decoder on a reused static cache whose step is compiled, or None when
    compilation is unavailable (after warning once)."""
    if "compile" in _FAILED:
        return None
    dtype = model.token_emb.weight.dtype
    key = (batch, static_length(max_len), dtype, finetune_scope, bool(disable_lora))
    decoders = _STATE.setdefault(model, {})
    decoder = decoders.get(key)
    if decoder is None:
        cache = model.new_kv_cache(batch, key[1], pad=pad)
        decoder = Decoder(model, cache, finetune_scope, disable_lora, static=True)
        try:
            decoder.static_fn = _compile_fn(decoder.static_step)
        except Exception as e:  # noqa: BLE001 - any failure means "use eager"
            _fall_back(e)
            return None
        decoders[key] = decoder
    else:
        decoder.cache.reset(pad)
        decoder.rebind(pad)
        decoder.bind_weights()  # parameters may have been replaced since the last call
    return decoder


def first_step(decoder: Decoder, tokens):
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
