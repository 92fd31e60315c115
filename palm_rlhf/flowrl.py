"""The seed's import path `palm_rlhf_pytorch.flowrl`: `from palm_rlhf.flowrl import FlowRLTrainer` (on
`palm_rlhf.trainers.flowrl`; see `palm_rlhf.trainers.seed_rl`)."""

from .trainers.seed_rl import SeedFlowRLTrainer as FlowRLTrainer

__all__ = ["FlowRLTrainer"]
