"""The seed's import path `palm_rlhf_pytorch.grpo`: `from palm_rlhf.grpo import RLHFTrainer` (GRPO and its
switches, on `palm_rlhf.trainers.grpo`; see `palm_rlhf.trainers.seed_rl`)."""

from .trainers.seed_rl import SeedGRPOTrainer as RLHFTrainer

__all__ = ["RLHFTrainer"]
