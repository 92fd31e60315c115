"""From sampled token ids to the text a client sees: incremental decoding and stop strings.

OpenAI's `stop` is text, not token ids: a completion ends *before* the first stop string,
which is not returned. A token may end in the middle of a UTF-8 character or of a stop
string, so the text of the last few tokens is held back until it is certain: a streamed
delta is never taken back.
"""

from __future__ import annotations


def _held_suffix(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` might still become a stop string (or finish a
    UTF-8 character: the byte tokenizer decodes a partial one as U+FFFD)."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    if text.endswith("\ufffd"):
        hold = max(hold, 1)
    return hold


class TextStream:
    """One completion's text, fed a token at a time.

    `push(token)` returns the new text that is now certain (possibly ""); `finished` is set
    with `finish_reason` "stop" (EOS or a stop string) or "length" (`max_tokens` reached).
    """

    def __init__(self, tokenizer, max_tokens: int, stops=(), eos_id=None):
        """eos_id: an id or a collection of ids (the tokenizer's `eos_ids`) that end the text; None: none do."""
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.eos_ids = frozenset() if eos_id is None else frozenset([eos_id] if isinstance(eos_id, int) else eos_id)
        self.stops = tuple(s for s in stops if s)
        self.tokens: list[int] = []
        self.text = ""          # all text emitted so far
        self.finish_reason: str | None = None
        self.generated = 0      # tokens sampled (an EOS counts: the model produced it)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> str:
        self.generated += 1
        if token in self.eos_ids:
            return self._finish("stop", self.tokenizer.decode(self.tokens))
        self.tokens.append(token)
        full = self.tokenizer.decode(self.tokens)
        cut = min((i for i in (full.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            return self._finish("stop", full[:cut])
        if self.generated >= self.max_tokens:
            return self._finish("length", full)
        certain = full[: len(full) - _held_suffix(full, self.stops)]
        return self._emit(certain)

    def _emit(self, certain: str) -> str:
        if len(certain) <= len(self.text):
            return ""
        delta = certain[len(self.text):]
        self.text = certain
        return delta

    def _finish(self, reason: str, final: str) -> str:
        self.finish_reason = reason
        # a stop string may cut inside held-back text but never before text already sent
        return self._emit(final)
