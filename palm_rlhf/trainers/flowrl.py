"""FlowRL trainer: `palm-rlhf flowrl --config flowrl model=RUN prompts=FILE reward_fn=module:function [key=value ...]`.

FlowRL (Zhu et al. 2025, arXiv:2509.15207; the maths is `palm_rlhf.rl.flowrl`): match the policy to
the reward distribution exp(beta * r_hat) * pi_ref through a squared trajectory-balance loss with a
learned log-partition function log Z(x). Each prompt is sampled `group_size` times and its rewards are
z-scored within the group; log Z(x) is a small MLP (`log_z.hidden`, `log_z.layers`) on the prompt's mean
final embedding under the actor (no gradient into the model), trained by the same optimizer as the
actor. Checkpoints hold both; final/ holds the actor (log Z is only needed for training).
The setup (one actor LoRA scope, whole groups per rank) is GRPO's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..ops import eval_mode
from ..rl.advantages import group_advantages
from ..rl.collect import rollout_packed
from ..rl.flowrl import FlowRLHyperparams, PartitionFunction, group_zscore, trajectory_balance_loss
from ..runtime.distributed import all_reduce_sum
from ..runtime.optim import OptimConfig
from .grpo import GRPOTrainer
from .rl_base import RLRunConfig


@dataclass
class LogZConfig:
    """`log_z.*`: the partition-function network on the prompt embedding."""

    hidden: int = 256                # width of its hidden layers
    layers: int = 2                  # hidden layers (0: a linear map)


@dataclass
class FlowRLConfig(RLRunConfig):
    out_dir: str = "runs/flowrl"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, weight_decay=0.0, betas=(0.9, 0.999),
                                                                   warmup=0, schedule="constant"))  # GRPO's
    group_size: int = 8              # samples per prompt; rewards are z-scored within each group
    beta: float = 15.0               # inverse temperature of the target exp(beta * r_hat) (the seed's default)
    clip_eps: float = 0.2            # the sequence importance weight is clipped to [1 - eps, 1 + eps]
    log_z: LogZConfig = field(default_factory=LogZConfig)

    def __post_init__(self):
        super().__post_init__()
        self.hyperparams()
        if self.log_z.hidden < 1 or self.log_z.layers < 0:
            raise ConfigError(f"log_z.hidden={self.log_z.hidden} must be >= 1 and log_z.layers={self.log_z.layers} "
                              f">= 0")


    def hyperparams(self) -> FlowRLHyperparams:
        return FlowRLHyperparams(group_size=self.group_size, beta=self.beta, clip_eps=self.clip_eps)


class FlowRLTrainer(GRPOTrainer):
    """GRPO's actor-only setup and groups; a log Z(x) network; the trajectory-balance loss."""

    name = "flowrl"

    def _build(self) -> None:
        super()._build()
        c = self.config
        device = self.model.token_emb.weight.device
        with torch.random.fork_rng(devices=[]):  # the same log Z on every process and in every run of this seed
            torch.manual_seed(c.seed)
            self.log_z = PartitionFunction(self.model.token_emb.weight.shape[1], c.log_z.hidden, c.log_z.layers)
        self.log_z.to(device)

    def _parameters(self):
        return super()._parameters() + list(self.log_z.parameters())

    def _sharded_modules(self):
        return [self.log_z]

    @torch.no_grad()
    def _prompt_embeddings(self, rollout):
        prompts, lengths = rollout.prompts, rollout.prompt_lengths
        positions = torch.arange(prompts.shape[1], device=prompts.device).expand_as(prompts)
        with eval_mode(self.model):
            hidden = self.model.hidden_states(prompts, positions, self.actor_scope).float()  # (b, n, d)
        mask = (positions < lengths[:, None]).to(hidden.dtype)
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)

    def _prepare(self, rollout) -> dict:
        g = self.hp.group_size
        rollout.prompt_embeddings = self._prompt_embeddings(rollout)
        rollout.normalized_scores = group_zscore(rollout.scores, g)  # each rank holds whole groups
        _, zero = group_advantages(rollout.scores, g)
        zero, groups = all_reduce_sum(torch.tensor([float(zero), float(len(rollout) // g)], dtype=torch.float64,
                                                   device=rollout.scores.device)).tolist()
        return {"zero_variance_groups": zero, "zero_variance_frac": zero / max(groups, 1.0)}

    def _weight(self, mb):
        return float(len(mb))  # the loss is a mean over sequences

    def _loss(self, mb):
        hp = self.hp
        logp, _ = self.scorer.policy(rollout_packed(mb))
        log_z = self.log_z(mb.prompt_embeddings)
        loss, balance = trajectory_balance_loss(log_z, logp, mb.ref_log_probs, mb.old_log_probs, mb.mask,
                                                mb.normalized_scores, hp.beta, hp.clip_eps)
        with torch.no_grad():
            stats = {"policy_loss": loss.mean(), "balance": balance.mean(), "balance_abs": balance.abs().mean(),
                     "log_z": log_z.mean(), "tokens": mb.mask.sum().float()}
        return loss.mean(), stats

    def _trainable_state(self):
        return {**super()._trainable_state(), **{f"log_z.{k}": v for k, v in self.log_z.state_dict().items()}}

    def _load_trainable_state(self, state):
        super()._load_trainable_state({k: v for k, v in state.items() if not k.startswith("log_z.")})
        self.log_z.load_state_dict({k[len("log_z."):]: v for k, v in state.items() if k.startswith("log_z.")})


__all__ = ["FlowRLConfig", "FlowRLTrainer", "LogZConfig"]
