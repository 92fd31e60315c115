"""REINFORCE++ trainer: `palm-rlhf reinforce-pp --config reinforce-pp model=RUN prompts=FILE reward_fn=module:function`.

REINFORCE++ (Hu 2025, arXiv:2501.03262; the maths is `palm_rlhf.rl.reinforce`): PPO's per-token
KL-shaped reward and clipped surrogate without the critic; the advantage of a token is its
reward-to-go, whitened over every token of the global batch (all ranks). `baseline=true` is
REINFORCE++-baseline: each prompt is sampled `group_size` times and the group's mean score is
subtracted before shaping and whitening. The setup (one actor LoRA scope) is GRPO's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..rl.collect import rollout_packed
from ..rl.reinforce import ReinforceHyperparams, policy_gradient_loss, reinforce_prepare
from ..runtime.distributed import all_reduce_sum
from ..runtime.optim import OptimConfig
from .grpo import GRPOTrainer
from .rl_base import RLRunConfig


@dataclass
class ReinforcePPConfig(RLRunConfig):
    out_dir: str = "runs/reinforce-pp"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, weight_decay=0.0, betas=(0.9, 0.999),
                                                                   warmup=0, schedule="constant"))  # GRPO's
    baseline: bool = False           # REINFORCE++-baseline: subtract each prompt's mean score (group_size >= 2)
    group_size: int = 1              # samples per prompt (each prompt is repeated group_size times)
    kl_coef: float = 2.0             # weight of the per-token k1 KL in the reward (configs/rl/reinforce-pp.yaml: why)
    gamma: float = 1.0               # discount of the reward-to-go
    clip_eps: float = 0.2            # ratio clip (low side, and high unless clip_eps_high)
    clip_eps_high: float | None = None  # upper ratio clip; null: clip_eps
    aggregation: str = "token_mean"  # token_mean | seq_mean | seq_sum_norm
    ent_coef: float = 0.0            # entropy bonus weight

    def __post_init__(self):
        super().__post_init__()
        if self.baseline and self.group_size < 2:
            raise ConfigError(f"baseline=true needs group_size >= 2 (got {self.group_size}): the baseline is the "
                              f"mean score of a prompt's samples")
        self.hyperparams()

    def hyperparams(self) -> ReinforceHyperparams:
        return ReinforceHyperparams(algorithm="reinforce_pp_baseline" if self.baseline else "reinforce_pp",
                                    group_size=self.group_size, kl_coef=self.kl_coef, gamma=self.gamma,
                                    clip_eps=self.clip_eps, clip_eps_high=self.clip_eps_high,
                                    aggregation=self.aggregation, ent_coef=self.ent_coef)


class ReinforcePPTrainer(GRPOTrainer):
    """GRPO's actor-only setup; REINFORCE++'s advantages (whitened over every rank) and loss."""

    name = "reinforce-pp"

    def _prepare(self, rollout) -> dict:
        return reinforce_prepare(rollout, self.hp, all_reduce_sum)

    def _loss(self, mb):
        logp, entropy = self.scorer.policy(rollout_packed(mb), with_entropy=True)
        return policy_gradient_loss(logp, entropy, mb, self.hp, self.config.max_new_tokens)


__all__ = ["ReinforcePPConfig", "ReinforcePPTrainer"]
