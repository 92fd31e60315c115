"""Judgements -> the preference JSONL that reward training reads (`palm_rlhf.data.preferences`).

- "A is better" / "B is better" become one `PairwiseRecord` each: the chosen completion,
  the rejected one, `annotator` = the rater, `source` = "feedback:<checkpoint of chosen> vs
  <checkpoint of rejected>" (one name when both came from the same checkpoint).
- "tie" and "both bad" carry no pairwise preference (the schema rejects chosen == rejected
  ties, and Bradley-Terry has no term for them), so they are left out and counted in the
  summary. They stay in the database for the stats page and for anyone who wants them.
- A pair judged by several raters gives one record per rater, disagreements included:
  reward training sees the real label noise.
- The optional 1-5 rating ("how much better") becomes `margin` only with
  `margin_from_rating=True`: margin = (rating - 1) / 4, so 1 -> 0.0 and 5 -> 1.0.
- Two completions that are the same text cannot be a preference; they are skipped too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..data.preferences import PairwiseRecord, write_preferences
from ..errors import DataError
from .store import FeedbackStore, Judgement


@dataclass
class ExportSummary:
    written: int = 0
    skipped: dict = field(default_factory=lambda: {"tie": 0, "both_bad": 0, "identical": 0})


def judgement_to_record(j: Judgement, margin_from_rating: bool = False) -> PairwiseRecord | None:
    """The pairwise record of one judgement, or None for a tie / both-bad / identical pair."""
    if j.choice not in ("a", "b") or j.completion_a == j.completion_b:
        return None
    if j.choice == "a":
        chosen, rejected, won, lost = j.completion_a, j.completion_b, j.checkpoint_a, j.checkpoint_b
    else:
        chosen, rejected, won, lost = j.completion_b, j.completion_a, j.checkpoint_b, j.checkpoint_a
    margin = (j.rating - 1) / 4 if margin_from_rating and j.rating is not None else 0.0
    source = f"feedback:{won}" if won == lost else f"feedback:{won} vs {lost}"
    return PairwiseRecord(prompt=j.prompt, chosen=chosen, rejected=rejected, margin=margin,
                          annotator=j.rater, source=source)


def export_preferences(store: FeedbackStore, out, *, margin_from_rating: bool = False) -> ExportSummary:
    """Write every A/B judgement in `store` to `out` (atomically); returns what was written/skipped."""
    summary, records = ExportSummary(), []
    for j in store.judgements():
        record = judgement_to_record(j, margin_from_rating)
        if record is None:
            summary.skipped["identical" if j.choice in ("a", "b") else j.choice] += 1
            continue
        records.append(record)
    if not records:
        raise DataError(f"{store.path}: no A/B judgements to export yet "
                        f"(skipped: {summary.skipped}); collect some with `palm-rlhf feedback serve`")
    write_preferences(Path(out), records)
    summary.written = len(records)
    return summary
