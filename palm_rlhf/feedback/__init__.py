"""The human-feedback web app: pairs of completions shown to raters, judgements stored in
SQLite, exported as the preference JSONL that reward training reads.

`store` (SQLite), `pairs` (pair sources + the background queue), `stats` and `export` need
only the standard library and torch; `app` and `server` need the `web` extra
(`pip install palm-rlhf[web]`). See docs/feedback.md.
"""

from .pairs import LoadedCheckpoint, ModelPairSource, PairDraft, PairQueue, PairSource, load_checkpoint, read_prompts
from .stats import compute_stats
from .store import FeedbackStore, IssuedPair, Judgement, JudgementRejected

__all__ = ["FeedbackStore", "IssuedPair", "Judgement", "JudgementRejected", "PairDraft", "PairSource",
           "PairQueue", "ModelPairSource", "LoadedCheckpoint", "load_checkpoint", "read_prompts", "compute_stats"]
