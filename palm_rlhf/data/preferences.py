"""The one preference-data schema: JSONL, one record per line.

Reward training reads it and the feedback web app writes it. Two kinds of record:

pairwise (a person preferred ``chosen`` over ``rejected`` for ``prompt``)::

    {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5", "margin": 1.0, "annotator": "ana", "source": "webapp"}

    ``margin`` (optional, >= 0, default 0) asks the Bradley-Terry loss for at least that
    reward gap; ``annotator`` and ``source`` (optional strings) are provenance only.

pairwise, conversational (TRL's conversational preference format; read by DPO)::

    {"prompt": [{"role": "user", "content": "2+2?"}],
     "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}

    ``prompt`` is a message list; ``chosen`` and ``rejected`` are message lists (the reply's
    messages) or strings (the assistant's reply). DPO renders them with the model's chat template
    (`data.chat.encode_reply`): the prompt with the generation prompt, each reply as the template
    renders it, end-of-turn token included.

rating (a score for one response)::

    {"prompt": "Q: 2+2?", "response": " 4", "rating": 4}

Reading is strict, because a silently skipped line is a silently biased reward
model: a malformed line raises `DataError` naming the file, the line number and
the field; unknown fields, non-finite numbers, ratings outside ``rating_range`` and
files without any record are errors too. Blank lines are ignored.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

from ..errors import DataError
from ..files import atomic_write_bytes
from .chat import check_messages
from .jsonl import iter_jsonl

PAIRWISE_FIELDS = ("prompt", "chosen", "rejected", "margin", "annotator", "source")
RATING_FIELDS = ("prompt", "response", "rating")


def _is_number(v) -> bool:
    # bool is an int subclass; `true` is never a meaningful rating or margin
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class PairwiseRecord:
    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0
    annotator: str | None = None
    source: str | None = None

    def __post_init__(self):
        for name in ("prompt", "chosen", "rejected"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                check_messages(list(value), f"field '{name}'")
                object.__setattr__(self, name, tuple(dict(m) for m in value))
            elif not isinstance(value, str):
                raise DataError(f"field '{name}' must be a string (or, in a conversational record, a list of "
                                f"messages), got {type(value).__name__}")
        if isinstance(self.prompt, str) and not (isinstance(self.chosen, str) and isinstance(self.rejected, str)):
            raise DataError("fields 'chosen'/'rejected' are message lists but 'prompt' is a string; in a "
                            "conversational record the prompt is a list of messages too")
        if not _is_number(self.margin) or not math.isfinite(self.margin) or self.margin < 0:
            raise DataError(f"field 'margin' must be a finite number >= 0, got {self.margin!r}")
        for name in ("annotator", "source"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise DataError(f"field '{name}' must be a string when given, got {type(v).__name__}")
        if self.chosen == self.rejected:
            raise DataError("fields 'chosen' and 'rejected' are identical; a tie carries no preference, drop the record")

    @property
    def is_chat(self) -> bool:
        """A conversational record: its prompt is a message list."""
        return not isinstance(self.prompt, str)

    def __hash__(self):
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict:
        """JSON-ready dict; optional fields at their defaults are left out."""
        plain = lambda v: v if isinstance(v, str) else [dict(m) for m in v]  # noqa: E731
        d = {"prompt": plain(self.prompt), "chosen": plain(self.chosen), "rejected": plain(self.rejected)}
        if self.margin:
            d["margin"] = self.margin
        if self.annotator is not None:
            d["annotator"] = self.annotator
        if self.source is not None:
            d["source"] = self.source
        return d

    def swapped(self) -> "PairwiseRecord":
        """The same pair with the preference reversed (used by tests and label-noise studies)."""
        return PairwiseRecord(self.prompt, self.rejected, self.chosen, self.margin, self.annotator, self.source)


@dataclass(frozen=True)
class RatingRecord:
    prompt: str
    response: str
    rating: float

    def __post_init__(self):
        for name in ("prompt", "response"):
            if not isinstance(getattr(self, name), str):
                raise DataError(f"field '{name}' must be a string, got {type(getattr(self, name)).__name__}")
        if not _is_number(self.rating) or not math.isfinite(self.rating):
            raise DataError(f"field 'rating' must be a finite number, got {self.rating!r}")

    def to_dict(self) -> dict:
        return asdict(self)


PreferenceRecord = Union[PairwiseRecord, RatingRecord]


def record_from_dict(obj, rating_range: tuple[float, float] | None = None) -> PreferenceRecord:
    """Validate one decoded JSON value and build its record (DataError naming the field)."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}")
    if "chosen" in obj or "rejected" in obj:
        kind, fields, required = "pairwise", PAIRWISE_FIELDS, ("prompt", "chosen", "rejected")
    elif "response" in obj or "rating" in obj:
        kind, fields, required = "rating", RATING_FIELDS, RATING_FIELDS
    else:
        raise DataError("record is neither pairwise (prompt, chosen, rejected) "
                        "nor rating (prompt, response, rating)")
    unknown = sorted(set(obj) - set(fields))
    if unknown:
        raise DataError(f"unknown field '{unknown[0]}' in a {kind} record; allowed fields: {', '.join(fields)}")
    missing = [f for f in required if f not in obj]
    if missing:
        raise DataError(f"missing field '{missing[0]}' in a {kind} record")
    if kind == "pairwise":
        margin = obj.get("margin", 0.0)
        if margin is None:
            margin = 0.0
        return PairwiseRecord(obj["prompt"], obj["chosen"], obj["rejected"], margin,
                              obj.get("annotator"), obj.get("source"))
    record = RatingRecord(obj["prompt"], obj["response"], obj["rating"])
    if rating_range is not None:
        lo, hi = rating_range
        if not lo <= record.rating <= hi:
            raise DataError(f"field 'rating' is {record.rating!r}, outside the allowed range [{lo}, {hi}]")
    return record


def read_preferences(path, rating_range: tuple[float, float] | None = None) -> list[PreferenceRecord]:
    """Read every record of a preference JSONL file.

    ``rating_range=(lo, hi)`` makes any rating outside [lo, hi] an error (the reward
    trainer passes the range its head can represent).
    """
    path = Path(path)
    records: list[PreferenceRecord] = []
    for where, obj in iter_jsonl(path, missing="preference file not found; pass an existing JSONL file"):
        try:
            records.append(record_from_dict(obj, rating_range))
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
    if not records:
        raise DataError(f"{path}: no preference records; the file is empty")
    return records


def _encode(records: Iterable[PreferenceRecord]) -> bytes:
    lines = []
    for i, r in enumerate(records):
        if not isinstance(r, (PairwiseRecord, RatingRecord)):
            raise DataError(f"record {i} is a {type(r).__name__}; expected PairwiseRecord or RatingRecord")
        lines.append(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    return "".join(lines).encode("utf-8")


def write_preferences(path, records: Sequence[PreferenceRecord]) -> None:
    """Write `records` as JSONL, atomically (readers never see a half-written file)."""
    records = list(records)
    if not records:
        raise DataError(f"{path}: refusing to write an empty preference file; pass at least one record")
    atomic_write_bytes(Path(path), _encode(records))


def append_preferences(path, records: Sequence[PreferenceRecord]) -> None:
    """Append records with one write + fsync, so each call lands whole (for the web app)."""
    data = _encode(records)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


__all__ = ["PairwiseRecord", "RatingRecord", "PreferenceRecord", "record_from_dict", "read_preferences",
           "write_preferences", "append_preferences", "PAIRWISE_FIELDS", "RATING_FIELDS"]
