"""Summaries for the stats page: work per rater, inter-rater agreement, win-rate per checkpoint.

Pure functions over `Judgement` rows, so they are tested with hand-made judgements.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations

from .store import CHOICES, Judgement


@dataclass(frozen=True)
class RaterStats:
    rater: str
    judged: int
    choices: dict  # choice -> count, every choice present


@dataclass(frozen=True)
class CheckpointStats:
    """Head-to-head results of one checkpoint against the other in two-checkpoint pairs."""

    checkpoint: str
    wins: int = 0
    losses: int = 0
    ties: int = 0
    both_bad: int = 0

    @property
    def win_rate(self) -> float | None:
        """(wins + ties / 2) / (wins + losses + ties); both-bad judgements are left out."""
        decided = self.wins + self.losses + self.ties
        return None if decided == 0 else (self.wins + 0.5 * self.ties) / decided


@dataclass(frozen=True)
class FeedbackStats:
    total: int
    raters: list[RaterStats]
    shared_items: int          # items judged by two or more raters
    compared_pairs: int        # (rater, rater) judgement pairs on those items
    agreeing_pairs: int        # ... that made the same choice
    checkpoints: list[CheckpointStats] = field(default_factory=list)

    @property
    def agreement(self) -> float | None:
        return None if self.compared_pairs == 0 else self.agreeing_pairs / self.compared_pairs


def compute_stats(judgements: list[Judgement]) -> FeedbackStats:
    per_rater: dict[str, Counter] = defaultdict(Counter)
    by_item: dict[int, list[Judgement]] = defaultdict(list)
    head_to_head: dict[str, Counter] = defaultdict(Counter)
    for j in judgements:
        per_rater[j.rater][j.choice] += 1
        by_item[j.item_id].append(j)
        if j.checkpoint_a != j.checkpoint_b:
            _score(head_to_head, j)

    compared = agreeing = shared = 0
    for item_judgements in by_item.values():
        if len({j.rater for j in item_judgements}) < 2:
            continue
        shared += 1
        for x, y in combinations(item_judgements, 2):
            if x.rater != y.rater:
                compared += 1
                agreeing += x.choice == y.choice

    raters = [RaterStats(rater=name, judged=sum(c.values()), choices={k: c[k] for k in CHOICES})
              for name, c in sorted(per_rater.items())]
    checkpoints = [CheckpointStats(checkpoint=name, wins=c["win"], losses=c["loss"], ties=c["tie"],
                                   both_bad=c["both_bad"]) for name, c in sorted(head_to_head.items())]
    return FeedbackStats(total=len(judgements), raters=raters, shared_items=shared, compared_pairs=compared,
                         agreeing_pairs=agreeing, checkpoints=checkpoints)


def _score(table: dict[str, Counter], j: Judgement) -> None:
    a, b = j.checkpoint_a, j.checkpoint_b
    if j.choice == "a":
        table[a]["win"] += 1
        table[b]["loss"] += 1
    elif j.choice == "b":
        table[b]["win"] += 1
        table[a]["loss"] += 1
    else:  # "tie" or "both_bad" count the same for both sides
        table[a][j.choice] += 1
        table[b][j.choice] += 1
