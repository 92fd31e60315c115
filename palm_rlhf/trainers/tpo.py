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

from ..rl.advantages import group_advantages
from ..rl.collect import rollout_packed
from ..rl.tpo import TPOHyperparams, tpo_minibatch_loss
from ..runtime.distributed import all_reduce_sum
from ..runtime.optim import OptimConfig
from .grpo import WholeGroupTrainer, check_whole_groups
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
        check_whole_groups(self, "TPO's loss compares a prompt's whole group")

    def hyperparams(self) -> TPOHyperparams:
        return TPOHyperparams(group_size=self.group_size, eta=self.eta, ent_coef=self.ent_coef, kl_coef=self.kl_coef)


class TPOTrainer(WholeGroupTrainer):
    """GRPO's actor-only setup and groups; TPO's group targets and loss over whole groups."""

    name = "tpo"

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
