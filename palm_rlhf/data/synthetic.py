"""A simulated annotator with a known rule, for tests, demos and the quickstart.

The rule: a response is better the larger the share of its characters that belong to
``preferred_chars`` (default: the vowels). Because the true preference is known, a reward
model trained on these pairs can be checked exactly (held-out pairwise accuracy), and an RL
run can be checked against `rule_score`, the ground-truth reward.
"""

from __future__ import annotations

import random
import string
from typing import Callable

from ..errors import ConfigError
from .preferences import PairwiseRecord

VOWELS = "aeiou"


def rule_score(text: str, preferred_chars: str = VOWELS) -> float:
    """The ground-truth reward: the fraction of characters of `text` in `preferred_chars` (0 for "")."""
    if not text:
        return 0.0
    return sum(c in preferred_chars for c in text) / len(text)


def rule_annotator(preferred_chars: str = VOWELS, annotator: str = "rule") -> Callable:
    """A simulated person: ``annotate(prompt, a, b)`` returns the PairwiseRecord preferring the response
    with the higher `rule_score`, or None on a tie (a tie carries no preference)."""

    def annotate(prompt: str, a: str, b: str) -> PairwiseRecord | None:
        sa, sb = rule_score(a, preferred_chars), rule_score(b, preferred_chars)
        if sa == sb:
            return None
        chosen, rejected = (a, b) if sa > sb else (b, a)
        return PairwiseRecord(prompt, chosen, rejected, annotator=annotator,
                              source=f"synthetic:more-of:{preferred_chars}")

    return annotate


def rule_preference_pairs(n: int, *, preferred_chars: str = VOWELS, length: tuple[int, int] = (8, 16),
                          min_gap: int = 1, prompts: tuple[str, ...] = ("Say something: ", "Reply: ", "> "),
                          seed: int = 0) -> list[PairwiseRecord]:
    """`n` pairs labelled by `rule_annotator`. The two responses of a pair have the same length and
    differ by at least `min_gap` preferred characters, so "more of" and "a larger share of" agree.
    Deterministic for a given seed."""
    if n <= 0:
        raise ConfigError(f"rule_preference_pairs(n={n}): n must be > 0")
    lo, hi = length
    if not 1 <= lo <= hi:
        raise ConfigError(f"rule_preference_pairs(length={length}): need 1 <= min <= max")
    if not 1 <= min_gap <= lo:
        raise ConfigError(f"rule_preference_pairs(min_gap={min_gap}): need 1 <= min_gap <= {lo} (the shortest length)")
    if not preferred_chars:
        raise ConfigError("rule_preference_pairs(preferred_chars=''): give at least one character")
    others = [c for c in string.ascii_lowercase + " " if c not in preferred_chars]
    rng = random.Random(seed)
    annotate = rule_annotator(preferred_chars)

    def response(size: int, k: int) -> str:
        chars = [rng.choice(preferred_chars) for _ in range(k)] + [rng.choice(others) for _ in range(size - k)]
        rng.shuffle(chars)
        return "".join(chars)

    records = []
    while len(records) < n:
        size = rng.randint(lo, hi)
        ka, kb = rng.randint(0, size), rng.randint(0, size)
        if abs(ka - kb) < min_gap:
            continue
        record = annotate(rng.choice(prompts), response(size, ka), response(size, kb))
        if record is not None and record.chosen != record.rejected:
            records.append(record)
    return records


__all__ = ["VOWELS", "rule_score", "rule_annotator", "rule_preference_pairs"]
