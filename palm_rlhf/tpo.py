"""The seed's import path `palm_rlhf_pytorch.tpo`: `from palm_rlhf.tpo import RLHFTrainer` (sequence-level TPO,
on `palm_rlhf.trainers.tpo`; see `palm_rlhf.trainers.seed_rl`)."""

from .trainers.seed_rl import SeedTPOTrainer as RLHFTrainer

__all__ = ["RLHFTrainer"]
