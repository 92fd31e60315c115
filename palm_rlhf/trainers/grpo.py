"""GRPO trainer: `palm-rlhf grpo --config grpo model=RUN prompts=FILE reward_fn=module:function [key=value ...]`.

No critic: each prompt is sampled `group_size` times and the group's scores
give the advantages (`palm_rlhf.rl.grpo`). `prompts_per_step` counts distinct
prompts, so a step collects prompts_per_step * group_size responses; under torchrun
prompts_per_step must divide by the number of processes, so every rank holds whole groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.checkpoint import load_adapter
from ..model.adapters import adapter_on_frozen_base
from ..rl.collect import rollout_packed
from ..rl.losses import aggregation_count
from ..rl.grpo import GRPOHyperparams, grpo_loss, grpo_prepare
from ..runtime.distributed import all_reduce_sum
from ..runtime.optim import OptimConfig
from .rl_base import RLRunConfig, RLTrainerBase


@dataclass
class GRPOConfig(RLRunConfig):
    out_dir: str = "runs/grpo"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, weight_decay=0.0, betas=(0.9, 0.999),
                                                                   warmup=0, schedule="constant"))
    group_size: int = 8              # samples per prompt (one group)
    clip_eps: float = 0.2            # ratio clip (low side, and high unless clip_eps_high)
    clip_eps_high: float | None = None  # upper ratio clip, e.g. 0.28 (DAPO); null: clip_eps
    kl_coef: float = 0.3             # weight of the k3 KL to the reference in the loss (configs/rl/grpo.yaml: why)
    scale_by_std: bool = True        # divide advantages by the group's std (false: Dr. GRPO)
    aggregation: str = "seq_mean"        # seq_mean (GRPO) | token_mean (DAPO) | seq_sum_norm (Dr. GRPO)
    ent_coef: float = 0.0            # entropy bonus weight

    def __post_init__(self):
        super().__post_init__()
        self.hyperparams()

    def hyperparams(self) -> GRPOHyperparams:
        return GRPOHyperparams(group_size=self.group_size, clip_eps=self.clip_eps, clip_eps_high=self.clip_eps_high,
                               kl_coef=self.kl_coef, scale_by_std=self.scale_by_std, aggregation=self.aggregation,
                               ent_coef=self.ent_coef)


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
        stats = grpo_prepare(rollout, self.hp)  # each rank holds whole groups: advantages are local
        # the logged counts are the global batch's
        zero, groups = all_reduce_sum(torch.tensor(
            [stats["zero_variance_groups"], float(len(rollout) // self.hp.group_size)], dtype=torch.float64,
            device=rollout.scores.device)).tolist()
        return {"zero_variance_groups": zero, "zero_variance_frac": zero / max(groups, 1.0)}

    def _weight(self, mb):
        return float(aggregation_count(mb.mask, self.hp.aggregation))

    def _loss(self, mb):
        logp, entropy = self.scorer.policy(rollout_packed(mb), with_entropy=True)
        return grpo_loss(logp, entropy, mb, self.hp, self.config.max_new_tokens)

    def _trainable_state(self):
        return dict(self.model.finetune_modules[self.actor_scope].state_dict())

    def _load_trainable_state(self, state):
        self.model.finetune_modules[self.actor_scope].load_state_dict(state)


__all__ = ["GRPOConfig", "GRPOTrainer"]
