"""Batched, KV-cached generation: `generate` for rollouts, `stream` for interactive use.

One prefill runs all (left-padded) prompts through the model, each distinct prompt once
(`prefill`: a GRPO group repeats its prompt), and fills the cache; then each decode step feeds
one token per row. Rows that finish (EOS or a stop sequence) keep decoding in lock-step, since a batched matmul costs the same,
but their outputs are overwritten with padding and masked out.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from ..errors import InputError
from ..backends import decoder_for
from .compiled import compiled_decoder, first_step
from .config import SamplingConfig
from .prompts import pack_prompts
from .sampling import RowUniforms, process_logits, sample, token_log_probs
from ..ops import eval_mode

PAD_ID = 0


@dataclass
class GenerationOutput:
    """New tokens only (no prompt), right-padded with 0.

    tokens (b, T) long; log_probs (b, T) fp32, the log-probability of each token
    under the sampling distribution it was drawn from (see
    `palm_rlhf.generation.sampling`), 0 at padding; lengths (b,) new tokens per
    row (including a final EOS / stop sequence); mask (b, T) bool, True on real
    tokens; stop_reasons: "eos" | "stop_sequence" | "max_new_tokens" per row;
    prompt_lengths (b,). T is the longest row's length.
    """

    tokens: Tensor
    log_probs: Tensor
    lengths: Tensor
    mask: Tensor
    stop_reasons: list[str]
    prompt_lengths: Tensor

    def sequences(self) -> list[list[int]]:
        """Each row's new tokens as a Python list (padding dropped)."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]


class _Decode:
    """State of one batched decode: output buffers plus the step iterator."""

    def __init__(self, model, ids: Tensor, lengths: Tensor, config: SamplingConfig, generator,
                 finetune_scope, disable_lora, compile: bool = False):
        b, n = ids.shape
        T = config.max_new_tokens
        device = ids.device
        self.model, self.config, self.generator = model, config, generator
        self.scope = dict(finetune_scope=finetune_scope, disable_lora=disable_lora)
        self.ids, self.prompt_lengths = ids, lengths
        self.tokens = torch.zeros(b, T, dtype=torch.long, device=device)
        self.log_probs = torch.zeros(b, T, dtype=torch.float32, device=device)
        self.finished = torch.zeros(b, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(b, dtype=torch.long, device=device)
        self.reasons = ["max_new_tokens"] * b
        self.steps = 0
        self.seen = None
        if config.repetition_penalty != 1.0:
            real = torch.arange(n, device=device)[None, :] >= (n - lengths)[:, None]  # (b, n) not padding
            self.seen = torch.zeros(b, model.num_tokens, dtype=torch.bool, device=device)
            self.seen.scatter_(1, ids, real)
            # scatter_ writes the last value per index; padding id 0 may have overwritten a real 0
            self.seen[:, PAD_ID] = (ids.eq(PAD_ID) & real).any(-1)
        # the last sampled token is never fed back, so n + T - 1 slots suffice
        self.decoder = self.compiled = None
        if compile and T > 1:
            self.compiled = compiled_decoder(model, b, n + T - 1, n - lengths, finetune_scope, disable_lora)
        if self.compiled is not None:
            self.cache = self.compiled.cache  # a reused static cache, already reset to this batch's padding
        else:
            self.cache = model.new_kv_cache(b, n + T - 1, pad=n - lengths)
        self.stops = [torch.tensor(s, dtype=torch.long, device=device) for s in config.stop_sequences]
        self.eos = torch.tensor(config.eos_ids, dtype=torch.long, device=device) if config.eos_ids else None
        self.uniforms = None
        if isinstance(generator, (list, tuple)) and not config.greedy:
            self.uniforms = RowUniforms(generator, T, device)

    def __iter__(self) -> Iterator[Tensor]:
        """Yield each step's tokens (b,) (0 for rows already finished)."""
        config, T = self.config, self.config.max_new_tokens
        logits = prefill(self.model, self.ids, self.cache, **self.scope)  # (b, V)
        # without EOS or stop sequences no row can finish early: skip the bookkeeping
        can_stop = config.eos_token is not None or bool(self.stops)
        for t in range(T):
            logits = process_logits(logits, config, self.seen)
            tok = sample(logits, config.greedy, self.generator, None if self.uniforms is None else self.uniforms(t))
            logp = token_log_probs(logits, tok)
            self.steps = t + 1
            if can_stop:
                alive = ~self.finished
                tok = tok.masked_fill(self.finished, PAD_ID)
                logp = logp.masked_fill(self.finished, 0.0)
                self.lengths += alive.long()
            else:
                alive = None
                self.lengths.fill_(t + 1)
            self.tokens[:, t] = tok
            self.log_probs[:, t] = logp
            if self.seen is not None:
                newly_seen = self.seen.gather(1, tok[:, None]) | (True if alive is None else alive[:, None])
                self.seen.scatter_(1, tok[:, None], newly_seen)
            if can_stop:
                self._update_finished(t, tok, alive)
            yield tok
            if t == T - 1 or (can_stop and bool(self.finished.all())):
                return
            logits = self._decode_step(tok)

    def _decode_step(self, tok: Tensor) -> Tensor:
        if self.decoder is None and self.compiled is not None:
            logits = first_step(self.compiled, tok)  # compiles; None when that failed
            if logits is not None:
                self.decoder = self.compiled
                return logits
        if self.decoder is None:
            self.decoder = decoder_for(self.model, self.cache, **self.scope)
        return self.decoder.step(tok)

    def _update_finished(self, t: int, tok: Tensor, alive: Tensor) -> None:
        newly = torch.zeros_like(alive)
        if self.eos is not None:
            hit = alive & torch.isin(tok, self.eos)
            self._mark(hit, "eos")
            newly |= hit
        for stop in self.stops:
            L = stop.numel()
            if t + 1 < L:
                continue
            hit = alive & ~newly & self.tokens[:, t + 1 - L: t + 1].eq(stop).all(-1)
            self._mark(hit, "stop_sequence")
            newly |= hit
        self.finished |= newly

    def _mark(self, hit: Tensor, reason: str) -> None:
        if bool(hit.any()):
            for i in hit.nonzero().flatten().tolist():
                self.reasons[i] = reason

    def output(self) -> GenerationOutput:
        T = int(self.lengths.max()) if self.steps else 0
        mask = torch.arange(T, device=self.tokens.device)[None, :] < self.lengths[:, None]
        # clone (outside inference mode): inference tensors cannot be saved for backward later
        return GenerationOutput(tokens=self.tokens[:, :T].clone(), log_probs=self.log_probs[:, :T].clone(),
                                lengths=self.lengths.clone(), mask=mask.clone(), stop_reasons=list(self.reasons),
                                prompt_lengths=self.prompt_lengths.clone())


def prefill(model, ids: Tensor, cache, **scope) -> Tensor:
    """Left-padded prompts ids (b, n) into an empty `cache` (its `pad` set): their keys and values,
    and each row's last-token logits (b, V), as `model.forward_cached(ids, cache)` gives them.

    A prompt repeated in the batch (GRPO samples each prompt group_size times) runs through the
    model once: its keys, values and logits are copied to its other rows (rows of a batched forward
    are independent, so the result is the same up to float rounding; tests/generation/test_generate.py)."""
    if cache.length:
        raise InputError(f"prefill needs an empty cache; this one holds {cache.length} slots")
    b, n = ids.shape
    rows = torch.cat([ids, cache.pad[:, None]], dim=1)  # a prompt is its ids and its padding
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)  # (u, n + 1), (b,)
    if distinct.shape[0] == b:
        return model.forward_cached(ids, cache, **scope)
    # the same max_len: the xpos centre (PaLM's block) is the cache's max_len // 2
    once = model.new_kv_cache(distinct.shape[0], cache.max_len, pad=distinct[:, -1], dtype=cache.k.dtype)
    logits = model.forward_cached(distinct[:, :-1], once, **scope)  # (u, V)
    cache.k[:, :, :n] = once.k[:, inverse, :n]  # (depth, b, n, kv_dim)
    cache.v[:, :, :n] = once.v[:, inverse, :n]
    cache.advance(n)
    return logits[inverse]


def _check_model(model) -> None:
    if not getattr(model, "causal", True):
        raise InputError("generation needs a causal PaLM (causal=True); this model is bidirectional")


def _make_generator(config: SamplingConfig, generator, device):
    if generator is not None or config.seed is None:
        return generator
    return torch.Generator(device=device).manual_seed(config.seed)


@contextlib.contextmanager
def _eval_mode(model):
    with eval_mode(model):
        with torch.inference_mode():
            yield


def _start(model, prompts, config, lengths, finetune_scope, disable_lora, generator, compile=False) -> _Decode:
    if not isinstance(config, SamplingConfig):
        raise InputError(f"config must be a SamplingConfig, got {type(config).__name__}")
    _check_model(model)
    if finetune_scope is not None and not disable_lora:
        model.require_scope(finetune_scope)
    device = model.token_emb.weight.device
    ids, lens = pack_prompts(prompts, lengths, num_tokens=model.num_tokens, device=device)
    if isinstance(generator, (list, tuple)) and len(generator) != ids.shape[0]:
        raise InputError(f"got {len(generator)} generators for {ids.shape[0]} prompts; pass one torch.Generator "
                         f"per prompt, or a single one")
    generator = _make_generator(config, generator, device)
    return _Decode(model, ids, lens, config, generator, finetune_scope, disable_lora, compile)


def generate(model, prompts, config: SamplingConfig | None = None, *, lengths=None, finetune_scope=None,
             disable_lora: bool = False, generator: torch.Generator | None = None,
             compile: bool = False) -> GenerationOutput:
    """Continue each prompt; returns the new tokens and their log-probs.

    prompts: list of 1-D LongTensors (any lengths), or a right-padded (b, n)
    tensor with `lengths` (b,). A batch gives the same tokens as each prompt alone.
    compile: run the decode step through `torch.compile` with a static cache
    (see `palm_rlhf.generation.compiled`); falls back to eager with a warning.
    generator: one torch.Generator, or a list of one per prompt (each row's
    sample then depends only on its own prompt and generator).
    """
    config = config or SamplingConfig()
    with _eval_mode(model):
        decode = _start(model, prompts, config, lengths, finetune_scope, disable_lora, generator, compile)
        for _ in decode:
            pass
    return decode.output()  # outside inference mode: its clones are ordinary tensors


def stream(model, prompt, config: SamplingConfig | None = None, *, finetune_scope=None, disable_lora: bool = False,
           generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield the new token ids of one prompt as they are produced (EOS / stop
    sequence included, then the iterator ends)."""
    config = config or SamplingConfig()
    if isinstance(prompt, Tensor) and prompt.ndim == 2:
        if prompt.shape[0] != 1:
            raise InputError(f"stream() takes one prompt; got a batch of {prompt.shape[0]} (use generate())")
        prompt = prompt[0]
    with eval_mode(model):
        with torch.inference_mode():
            decode = _start(model, [prompt], config, None, finetune_scope, disable_lora, generator)
        steps = iter(decode)
        while True:
            # inference mode only around each step: the caller's code between
            # yields runs in its own autograd state
            with torch.inference_mode():
                tok = next(steps, None)
            if tok is None:
                return
            yield int(tok[0])
            if bool(decode.finished[0]):
                return
