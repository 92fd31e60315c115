"""TPO trainer: `palm-rlhf tpo --config tpo model=RUN prompts=FILE reward_fn=module:function [key=value ...]`.

Sequence-level TPO (arXiv:2604.06159; the maths is `palm_rlhf.rl.tpo`): each prompt is sampled
`group_size` times; the target over the group's responses is softmax(old log-prob + z-scored
reward / eta), and the policy's distribution over the same responses is trained toward it by
cross-entropy, with an entropy bonus (and, optionally, GRPO's k3 KL to the reference). A group whose
rewards are all equal leaves the policy unchanged. Minibatches hold whole groups (an epoch shuffles
groups, not rows), so batch_size and the per-process micro-batch must be multiples of group_size.
The setup (one actor LoRA scope, whole groups per rank) is GRPO's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..rl.advantages import group_advantages
from ..rl.collect import rollout_packed
from ..rl.tpo import TPOHyperparams, tpo_minibatch_loss
from ..runtime.distributed import all_reduce_sum
from ..runtime.optim import OptimConfig
from .grpo import GRPOTrainer
from .rl_base import RLRunConfig


@dataclass
class TPOConfig(RLRunConfig):
    out_dir: str = "runs/tpo"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, weight_decay=0.0, betas=(0.9, 0.999),
                                                                   warmup=0, schedule="constant"))  # GRPO's
    group_size: int = 8              # samples per prompt (one group); batch_size must be a multiple
    eta: float = 1.0                 # target temperature: small -> toward the best sample, large -> toward pi_old
    ent_coef: float = 0.01           # entropy bonus (the seed's beta_s)
    kl_coef: float = 0.0             # GRPO's k3 KL to the reference, per-token mean (0: none, as the seed)

    def __post_init__(self):
        super().__post_init__()
        self.hyperparams()
        if self.batch_size % self.group_size or (self.micro_batch_size and self.micro_batch_size % self.group_size):
            raise ConfigError(f"batch_size={self.batch_size} and micro_batch_size={self.micro_batch_size} must be "
                              f"multiples of group_size={self.group_size}: TPO's loss compares a prompt's whole group")

    def hyperparams(self) -> TPOHyperparams:
        return TPOHyperparams(group_size=self.group_size, eta=self.eta, ent_coef=self.ent_coef, kl_coef=self.kl_coef)


class TPOTrainer(GRPOTrainer):
    """GRPO's actor-only setup and groups; TPO's group targets and loss over whole groups."""

    name = "tpo"

    def _row_order(self, n, generator):
        g = self.hp.group_size
        if self.micro % g:
            raise ConfigError(f"each process's micro-batch holds {self.micro} rows, not a multiple of "
                              f"group_size={g}; choose batch_size / processes (or micro_batch_size) as a multiple")
        groups = torch.randperm(n // g, generator=generator)
        return (groups[:, None] * g + torch.arange(g)[None, :]).reshape(-1)

    def _prepare(self, rollout) -> dict:
        _, zero = group_advantages(rollout.scores, self.hp.group_size)  # only the count of flat groups
        zero, groups = all_reduce_sum(torch.tensor([float(zero), float(len(rollout) // self.hp.group_size)],
                                                   dtype=torch.float64, device=rollout.scores.device)).tolist()
        return {"zero_variance_groups": zero, "zero_variance_frac": zero / max(groups, 1.0)}

    def _weight(self, mb):
        return float(len(mb) // self.hp.group_size)  # the loss is a mean over groups

    def _loss(self, mb):
        logp, entropy = self.scorer.policy(rollout_packed(mb), with_entropy=True)
        return tpo_minibatch_loss(logp, entropy, mb, self.hp)


__all__ = ["TPOConfig", "TPOTrainer"]
