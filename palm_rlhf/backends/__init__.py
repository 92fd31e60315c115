"""Decode engines, chosen in one place (`decoder_for`) by one setting, `PaLM.backend`:

- ``"plain"``: `PaLM.forward_cached` per token, the model's one block forward; any device.
- ``"cpu"``: `palm_rlhf.backends.cpu.Decoder`, the same function with the weights bound once in
  the layouts a CPU streams fastest (oneDNN-prepacked where the build has it); CPU only.
- ``"auto"`` (default): ``"cpu"`` for a model on a CPU, ``"plain"`` elsewhere. The cpu engine has
  one decode step per block kind: `Decoder` (PaLM's parallel block) and `FamilyDecoder` (the
  Llama family's sequential block). On the development
  CPU the cpu engine decodes faster than the plain one (benchmarks/generate.py, ``ours`` vs
  ``ours-plain``; figures in benchmarks/README.md).

A decoder has three methods: ``step(tokens (b,)) -> next-token logits (b, V)``, which appends the
tokens to its KV cache; ``prefill(tokens (L,), packed)``, which runs prompts packed into one
row (`palm_rlhf.generation.PackedPrompts`, the server's way to prefill every waiting request at once)
and returns each prompt's last-token logits; and ``rebind(pad)``, called after the cache's rows
changed their padding (the server's rows join and leave). Both engines are tested against each other (tests/backends/).
"""

from __future__ import annotations

from torch import Tensor

from ..errors import ConfigError

BACKENDS = ("auto", "plain", "cpu")


class PlainDecoder:
    """One decode step through the model's own forward (`PaLM.forward_cached`)."""

    def __init__(self, model, cache, finetune_scope: str | None = None, disable_lora: bool = False):
        self.model, self.cache = model, cache
        self.scope = dict(finetune_scope=finetune_scope, disable_lora=disable_lora)

    def step(self, tokens: Tensor) -> Tensor:
        return self.model.forward_cached(tokens[:, None], self.cache, **self.scope)

    def rebind(self, pad: Tensor) -> None:
        """Nothing is bound: each step reads the cache's padding itself (the serving batch calls this
        after its slots change)."""

    def prefill(self, tokens: Tensor, packed) -> Tensor:
        """Packed prompts (`palm_rlhf.generation.PackedPrompts`), tokens (L,) -> last-token logits (prompts, V)."""
        return self.model.forward_cached(tokens[None], packed, at=packed.last_index(), **self.scope)[0]


def resolve(backend: str, device) -> str:
    """The engine `backend` means for a model on `device`: "plain" or "cpu"."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}; "
                          f"set model.backend to one of them")
    if backend == "auto":
        return "cpu" if getattr(device, "type", device) == "cpu" else "plain"
    if backend == "cpu" and getattr(device, "type", device) != "cpu":
        raise ConfigError(f"backend='cpu' needs a model on the CPU, not {device}; use backend='auto' or 'plain'")
    return backend


def decoder_for(model, cache, finetune_scope: str | None = None, disable_lora: bool = False):
    """The decode engine `model.backend` selects, over `cache` (see the module docstring)."""
    if resolve(getattr(model, "backend", "auto"), model.token_emb.weight.device) == "cpu":
        from .cpu import Decoder, FamilyDecoder

        engine = FamilyDecoder if getattr(model, "block", "parallel") == "sequential" else Decoder
        return engine(model, cache, finetune_scope, disable_lora)
    return PlainDecoder(model, cache, finetune_scope, disable_lora)


__all__ = ["BACKENDS", "PlainDecoder", "decoder_for", "resolve"]
