"""Training runtime shared by every trainer: config loading, distributed setup, checkpoints,
optimizers and schedules, THE optimizer step, metric sinks and seeding."""

from .checkpoint import CheckpointManager
from .config import config_from_dict, config_to_dict, load_config
from .distributed import DistEnv, all_reduce_mean, barrier, cleanup, init_distributed
from .metrics import MetricsLogger, read_metrics
from .optim import Lion, OptimConfig, build_optimizer, build_scheduler, param_groups, warmup_cosine
from .seed import rng_state, seed_everything, set_rng_state
from .step import PRECISIONS, StepResult, TrainStep, autocast_context

__all__ = [
    "CheckpointManager", "config_from_dict", "config_to_dict", "load_config", "DistEnv", "all_reduce_mean",
    "barrier", "cleanup", "init_distributed", "MetricsLogger", "read_metrics", "Lion", "OptimConfig",
    "build_optimizer", "build_scheduler", "param_groups", "warmup_cosine", "rng_state", "seed_everything",
    "set_rng_state", "PRECISIONS", "StepResult", "TrainStep", "autocast_context",
]
