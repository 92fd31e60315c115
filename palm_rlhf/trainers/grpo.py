"""GRPO trainer: `palm-rlhf grpo --config grpo model=RUN prompts=FILE reward_fn=module:function [key=value ...]`.

No critic: each prompt is sampled `group_size` times and the group's scores
give the advantages (`palm_rlhf.rl.grpo`). `prompts_per_step` counts distinct
prompts, so a step collects prompts_per_step * group_size responses; under torchrun
prompts_per_step must divide by the number of processes, so every rank holds whole groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..model.checkpoint import load_adapter
from ..model.adapters import adapter_on_frozen_base
from ..ops import eval_mode
from ..rl.collect import rollout_packed
from ..rl.losses import aggregation_count
from ..rl.grpo import GRPOHyperparams, grpo_loss, grpo_prepare
from ..runtime.distributed import all_reduce_sum
from ..errors import ConfigError
from ..runtime.config import Converted
from ..runtime.optim import OptimConfig
from .rl_base import RLRunConfig, RLTrainerBase


@dataclass
class EntropyAdvantageConfig:
    """`entropy_advantage.*`: per-token entropy added to the advantage, min(scale * H_t, |A| / kappa)
    (Cheng et al. 2025, arXiv:2506.14758; the seed package's `add_entropy_to_advantage`)."""

    scale: float = 0.0               # 0: off; the paper uses 0.4 for GRPO (0.1 for PPO)
    kappa: float = 2.0               # the bonus never exceeds |A| / kappa


@dataclass
class ScoreCenteringConfig:
    """`score_centering.*`: options of policy_loss=score_centering (arXiv:2609.20807)."""

    topk: int | None = None          # centre over the sampler's top-k tokens (+ one tail event); null: whole vocabulary
    is_cap: float | None = None      # importance weight min(ratio, is_cap) (truncated IS); null: no weight

    def weight_fn(self):
        if self.is_cap is None:
            return None
        if not self.is_cap > 0:
            raise ConfigError(f"score_centering.is_cap={self.is_cap} must be > 0 (or null: no importance weight)")
        cap = float(self.is_cap)
        return lambda ratio: ratio.clamp(max=cap)


def _scale_by_std(value, values: dict) -> dict:
    on = value.strip().lower() in ("true", "yes", "1", "on") if isinstance(value, str) else bool(value)
    return {"advantage_norm": "std" if on else "constant"}


@dataclass
class GRPOConfig(RLRunConfig):
    out_dir: str = "runs/grpo"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, weight_decay=0.0, betas=(0.9, 0.999),
                                                                   warmup=0, schedule="constant"))
    group_size: int = 8              # samples per prompt (one group)
    clip_eps: float = 0.2            # ratio clip (low side, and high unless clip_eps_high)
    clip_eps_high: float | None = None  # upper ratio clip, e.g. 0.28 (DAPO); null: clip_eps
    kl_coef: float = 0.3             # weight of the k3 KL to the reference in the loss (configs/rl/grpo.yaml: why)
    advantage_norm: str = "std"      # std (GRPO) | mean (MaxRL: / the group's mean reward) | constant (Dr. GRPO)
    advantage_constant: float = 1.0  # the divisor of advantage_norm=constant
    aggregation: str = "seq_mean"        # seq_mean (GRPO) | token_mean (DAPO) | seq_sum_norm (Dr. GRPO)
    ent_coef: float = 0.0            # entropy bonus weight
    policy_loss: str = "clip"        # clip (PPO's ratio clip) | spo (quadratic ratio penalty) | score_centering
    entropy_advantage: EntropyAdvantageConfig = field(default_factory=EntropyAdvantageConfig)
    score_centering: ScoreCenteringConfig = field(default_factory=ScoreCenteringConfig)

    ALIASES: ClassVar[dict] = {**RLRunConfig.ALIASES,
                               "scale_by_std": Converted(_scale_by_std, "advantage_norm=std|mean|constant")}

    def __post_init__(self):
        super().__post_init__()
        self.hyperparams()

    def hyperparams(self) -> GRPOHyperparams:
        return GRPOHyperparams(group_size=self.group_size, clip_eps=self.clip_eps, clip_eps_high=self.clip_eps_high,
                               kl_coef=self.kl_coef, advantage_norm=self.advantage_norm,
                               advantage_constant=self.advantage_constant, aggregation=self.aggregation,
                               ent_coef=self.ent_coef, policy_loss=self.policy_loss,
                               entropy_scale=self.entropy_advantage.scale, entropy_kappa=self.entropy_advantage.kappa,
                               score_centering_topk=self.score_centering.topk,
                               score_centering_weight=self.score_centering.weight_fn())


class GRPOTrainer(RLTrainerBase):
    name = "grpo"

    def _build(self) -> None:
        c = self.config
        self.hp = c.hyperparams()
        self.actor_scope = c.lora.scope or "actor"
        adapter_on_frozen_base(self.model, self.actor_scope, r=c.lora.r, alpha=c.lora.alpha, **self._lora_options())
        if c.actor_adapter:
            load_adapter(self.model, c.actor_adapter, scope=self.actor_scope)

    def _expand_prompts(self, rows):
        # group by group: rows i*G .. i*G+G-1 share prompt i (a rank holds whole groups: the run checked
        # prompts_per_step % world == 0)
        return [p for p in rows for _ in range(self.config.group_size)]

    def _parameters(self):
        return list(self.model.finetune_parameters(self.actor_scope))

    def _prepare(self, rollout) -> dict:
        if self.hp.policy_loss == "score_centering":  # the sampler's whole distribution, as it sampled
            with torch.no_grad(), eval_mode(self.model):
                rollout.sampler_probs = self.scorer.policy_distribution(rollout_packed(rollout)).exp()
        stats = grpo_prepare(rollout, self.hp)  # each rank holds whole groups: advantages are local
        # the logged counts are the global batch's
        zero, groups = all_reduce_sum(torch.tensor(
            [stats["zero_variance_groups"], float(len(rollout) // self.hp.group_size)], dtype=torch.float64,
            device=rollout.scores.device)).tolist()
        return {"zero_variance_groups": zero, "zero_variance_frac": zero / max(groups, 1.0)}

    def _weight(self, mb):
        return float(aggregation_count(mb.mask, self.hp.aggregation))

    def _loss(self, mb):
        packed = rollout_packed(mb)
        if self.hp.policy_loss == "score_centering":  # one forward, the whole distribution kept
            log_probs_all = self.scorer.policy_distribution(packed)
            logp = log_probs_all.gather(-1, mb.responses[..., None]).squeeze(-1).masked_fill(~mb.mask, 0.0)
            entropy = -(log_probs_all.exp() * log_probs_all).sum(-1).masked_fill(~mb.mask, 0.0)
            return grpo_loss(logp, entropy, mb, self.hp, self.config.max_new_tokens, log_probs_all=log_probs_all)
        logp, entropy = self.scorer.policy(packed, with_entropy=True)
        return grpo_loss(logp, entropy, mb, self.hp, self.config.max_new_tokens)

    def _trainable_state(self):
        return dict(self.model.finetune_modules[self.actor_scope].state_dict())

    def _load_trainable_state(self, state):
        self.model.finetune_modules[self.actor_scope].load_state_dict(state)


def check_whole_groups(config, why: str) -> None:
    """batch_size and micro_batch_size must hold whole groups (for a trainer whose minibatches are groups)."""
    g = config.group_size
    if config.batch_size % g or (config.micro_batch_size and config.micro_batch_size % g):
        raise ConfigError(f"batch_size={config.batch_size} and micro_batch_size={config.micro_batch_size} must be "
                          f"multiples of group_size={g}: {why}")


class WholeGroupTrainer(GRPOTrainer):
    """GRPO's setup with minibatches of whole groups: an epoch shuffles the groups, not the rows, and a
    group's rows stay consecutive (rows i*G .. i*G+G-1 of a minibatch share a prompt)."""

    def _row_order(self, n, generator):
        g = self.hp.group_size
        if self.micro % g:
            raise ConfigError(f"each process's micro-batch holds {self.micro} rows, not a multiple of "
                              f"group_size={g}; choose batch_size / processes (or micro_batch_size) as a multiple")
        groups = torch.randperm(n // g, generator=generator)
        return (groups[:, None] * g + torch.arange(g)[None, :]).reshape(-1)


__all__ = ["GRPOConfig", "GRPOTrainer", "WholeGroupTrainer", "check_whole_groups", "EntropyAdvantageConfig",
           "ScoreCenteringConfig"]
