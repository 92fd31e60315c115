"""palm-rlhf: PaLM language models aligned with human feedback.

Seed-compatible names are importable from the top level, so code written for
`palm_rlhf_pytorch` switches by changing one import:

    from palm_rlhf import PaLM, RewardModel, RLHFTrainer, ActorCritic, ImplicitPRM
"""

from importlib import import_module

from .errors import CheckpointError, ConfigError, DataError, InputError, PalmRLHFError, TrainingError
from .model import PaLM

__version__ = "0.1.0"

# heavier objects load on first use so `import palm_rlhf` stays fast
_LAZY = {
    "RewardModel": "palm_rlhf.model.reward",
    "ImplicitPRM": "palm_rlhf.model.implicit_prm",
    "ActorCritic": "palm_rlhf.rl.actor_critic",
    "RLHFTrainer": "palm_rlhf.trainers.rlhf",
    "SamplingConfig": "palm_rlhf.generation",
    "load_model": "palm_rlhf.runtime.resolve",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'palm_rlhf' has no attribute {name!r}")


__all__ = ["PaLM", "PalmRLHFError", "ConfigError", "InputError", "DataError", "CheckpointError", "TrainingError",
           *_LAZY]
