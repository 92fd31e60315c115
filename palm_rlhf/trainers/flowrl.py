"""FlowRL trainer: `palm-rlhf flowrl --config flowrl model=RUN prompts=FILE reward_fn=module:function [key=value ...]`.

FlowRL (Zhu et al. 2025, arXiv:2509.15207; the maths is `palm_rlhf.rl.flowrl`): match the policy to
the reward distribution exp(beta * r_hat) * pi_ref through a squared trajectory-balance loss with a
learned log-partition function log Z(x). Each prompt is sampled `group_size` times and its rewards are
z-scored within the group; log Z(x) is a small MLP (`log_z.hidden`, `log_z.layers`) on the prompt's mean
final embedding under the actor (no gradient into the model), trained by the same optimizer as the
actor. Checkpoints hold both; final/ holds the actor (log Z is only needed for training).
The setup (one actor LoRA scope, whole groups per rank) is GRPO's; minibatches hold whole groups
(TPO's order), so batch_size and the per-process micro-batch must be multiples of group_size.

log Z's first update: until the first update after sampling, the policy is the sampler, so the
importance weight is exactly 1, log Z = 0 and the group's z-scored rewards sum to 0: log Z's gradient
is 0 in exact arithmetic. Computed, it is rounding noise, and Adam's per-parameter normalisation
turns noise into an lr-sized step of random sign (1 and 2 processes differed by 8e-4 after two steps).
So the on-policy weight is taken as exactly 1 (the stored sampler log-probs come from other batch
shapes and differ by ~4e-6 nats a sequence, which times beta * r_hat ~ 10 was most of that noise),
and log Z is evaluated once per group, so each group's terms are summed, always in the same order,
before groups meet (a row-wise log Z summed ±10 terms of all groups in batch order).
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
from .grpo import WholeGroupTrainer, check_whole_groups
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
        check_whole_groups(self, "FlowRL evaluates log Z once per group")
        if self.log_z.hidden < 1 or self.log_z.layers < 0:
            raise ConfigError(f"log_z.hidden={self.log_z.hidden} must be >= 1 and log_z.layers={self.log_z.layers} "
                              f">= 0")


    def hyperparams(self) -> FlowRLHyperparams:
        return FlowRLHyperparams(group_size=self.group_size, beta=self.beta, clip_eps=self.clip_eps)


class FlowRLTrainer(WholeGroupTrainer):
    """GRPO's actor-only setup and groups, minibatches of whole groups; a log Z(x) network; the
    trajectory-balance loss."""

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
        self._sampled_at = self.scheduler.last_epoch  # optimizer updates so far: the policy that sampled
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
        g = hp.group_size
        log_z = self.log_z(mb.prompt_embeddings[::g])[:, None].expand(-1, g).reshape(-1)  # once per group (b,)
        on_policy = self.scheduler.last_epoch == self._sampled_at  # no update since sampling: weight exactly 1
        old_logp = logp.detach() if on_policy else mb.old_log_probs
        loss, balance = trajectory_balance_loss(log_z, logp, mb.ref_log_probs, old_logp, mb.mask,
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
