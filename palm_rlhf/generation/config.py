"""`SamplingConfig`: every knob of decoding, validated once.

The names are unambiguous: `top_k` is a *count* of tokens, `top_p` is the
nucleus *mass kept* (0.9 keeps the smallest set reaching 90%), `min_p` is a
fraction of the top token's probability. (The seed's `top_k(thres)` /
`top_p(thres)` filters, kept in `palm_rlhf.ops` for compatibility, mean
something else: see docs/generation.md.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class SamplingConfig:
    """How to pick each new token and when to stop.

    Logits are processed in this order: repetition_penalty -> temperature ->
    top_k -> top_p -> min_p; the next token is drawn from the softmax of the
    result (or its argmax when temperature == 0).

    max_new_tokens: upper bound on new tokens per row (>= 1).
    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0 = off).
    top_p: nucleus sampling; keep the smallest set whose probability reaches p (1.0 = off).
    min_p: keep tokens with probability >= min_p * p(top token) (0.0 = off).
    repetition_penalty: CTRL-style (Keskar et al. 2019): a logit of a token that already
        occurs in the prompt or the generated text is divided by the penalty when
        positive and multiplied by it when negative (1.0 = off).
    eos_token: a row stops after producing this id (the EOS is kept in its output); a list or
        tuple of ids stops at any of them (a Hugging Face checkpoint's `tokenizer.eos_ids`:
        its EOS and every `eos_token_id` of generation_config.json). `eos_ids` is the tuple.
    stop_sequences: token-id sequences; a row stops right after producing one of them
        (the sequence is kept in its output).
    seed: seeds a private `torch.Generator` so runs repeat exactly (None = global RNG).
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    eos_token: int | tuple[int, ...] | None = None
    stop_sequences: tuple = ()
    seed: int | None = None

    def __post_init__(self):
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ConfigError(f"SamplingConfig(max_new_tokens={self.max_new_tokens!r}) must be an integer >= 1")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"SamplingConfig({name}={value!r}) must be a finite number")
        if self.temperature < 0:
            raise ConfigError(f"SamplingConfig(temperature={self.temperature}) must be >= 0 (0 means greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"SamplingConfig(top_k={self.top_k!r}) must be an integer count >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"SamplingConfig(top_p={self.top_p}) must be in (0, 1]: the probability mass "
                              f"of the nucleus to keep (1.0 = off)")
        if not 0.0 <= self.min_p < 1.0:
            raise ConfigError(f"SamplingConfig(min_p={self.min_p}) must be in [0, 1) (0 = off)")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"SamplingConfig(repetition_penalty={self.repetition_penalty}) must be > 0 "
                              f"(1.0 = off, > 1 discourages repeats)")
        if isinstance(self.eos_token, (list, tuple)):
            if not self.eos_token or not all(_is_int(t) and t >= 0 for t in self.eos_token):
                raise ConfigError(f"SamplingConfig(eos_token={self.eos_token!r}) must be token ids >= 0 "
                                  f"(a non-empty list), one id, or None")
            self.eos_token = tuple(dict.fromkeys(self.eos_token))
            if len(self.eos_token) == 1:
                self.eos_token = self.eos_token[0]
        elif self.eos_token is not None and (not _is_int(self.eos_token) or self.eos_token < 0):
            raise ConfigError(f"SamplingConfig(eos_token={self.eos_token!r}) must be a token id >= 0, a list of "
                              f"them, or None")
        if self.seed is not None and not _is_int(self.seed):
            raise ConfigError(f"SamplingConfig(seed={self.seed!r}) must be an integer or None")
        self.stop_sequences = self._normalise_stops(self.stop_sequences)

    @staticmethod
    def _normalise_stops(stops) -> tuple[tuple[int, ...], ...]:
        if isinstance(stops, (str, bytes)):
            raise ConfigError("SamplingConfig(stop_sequences=...) takes token-id sequences, not text; "
                              "encode them first, e.g. [tokenizer.encode('\\n\\n')]")
        out = []
        for seq in stops:
            if _is_int(seq):
                seq = (seq,)
            if isinstance(seq, (str, bytes)):
                raise ConfigError(f"SamplingConfig(stop_sequences=...): {seq!r} is text; pass token ids "
                                  f"(tokenizer.encode({seq!r}))")
            seq = tuple(seq)
            if not seq or not all(_is_int(t) and t >= 0 for t in seq):
                raise ConfigError(f"SamplingConfig(stop_sequences=...): {seq!r} must be a non-empty "
                                  f"sequence of token ids >= 0")
            out.append(seq)
        return tuple(out)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a row: () without eos_token."""
        if self.eos_token is None:
            return ()
        return self.eos_token if isinstance(self.eos_token, tuple) else (self.eos_token,)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
