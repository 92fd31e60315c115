"""PPO trainer: `palm-rlhf ppo --config ppo model=RUN prompts=FILE reward_model=RUN [key=value ...]`.

    trainer = PPOTrainer(PPOConfig(model="runs/sft", prompts="prompts.txt", reward_model="runs/rm"))
    trainer.setup().train()     # OUT/final: the base with the actor merged, adapter.safetensors, tokenizer

The loop lives in `rl_base`; this file adds the critic, the KL controller, and the
PPO prepare/loss from `palm_rlhf.rl.ppo`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..errors import ConfigError
from ..model.checkpoint import load_adapter
from ..rl.actor_critic import ActorCritic
from ..rl.collect import rollout_packed
from ..rl.kl import make_kl_controller
from ..rl.ppo import PPOHyperparams, ppo_loss, ppo_prepare
from ..runtime.distributed import all_reduce_sum
from .rl_base import RLRunConfig, RLTrainerBase


@dataclass
class PPOConfig(RLRunConfig):
    out_dir: str = "runs/ppo"
    critic_lr: float = 1e-4          # critic (value scope + head) peak learning rate (the actor's: optim.lr)
    kl_coef: float = 2.0                 # initial (or fixed) coefficient of the k1 penalty (configs/rl/ppo.yaml: why)
    kl_target: float | None = None       # set to use the adaptive controller (target KL per sequence)
    kl_horizon: int = 10000          # steps over which the adaptive controller moves
    gamma: float = 1.0               # discount
    lam: float = 0.95                # GAE lambda
    clip_eps: float = 0.2            # PPO ratio clip
    value_clip: float | None = 0.2   # value-loss clip; null: off
    vf_coef: float = 0.5             # weight of the value loss
    ent_coef: float = 0.0            # entropy bonus weight
    whiten_rewards: bool = False     # whiten rewards over the batch
    whiten_advantages: bool = True   # whiten advantages over the batch

    def __post_init__(self):
        super().__post_init__()
        if self.critic_lr <= 0:
            raise ConfigError(f"critic_lr={self.critic_lr} must be > 0")
        self.hyperparams()  # validates the PPO fields
        make_kl_controller(self.kl_coef, self.kl_target, self.kl_horizon)

    def hyperparams(self) -> PPOHyperparams:
        """The PPO fields of this config (same names, flat in YAML) as `rl.ppo.PPOHyperparams`."""
        return PPOHyperparams(**{f.name: getattr(self, f.name) for f in fields(PPOHyperparams)})


class PPOTrainer(RLTrainerBase):
    """`actor_critic=` may pass a ready `ActorCritic` built on `model` (the seed-compatible path)."""

    name = "ppo"

    def __init__(self, config: PPOConfig, *, actor_critic: ActorCritic | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self.actor_critic = actor_critic
        if actor_critic is not None and self.model is None:
            self.model = actor_critic.actor_palm

    def _build(self) -> None:
        c = self.config
        self.hp = c.hyperparams()
        if self.actor_critic is None:
            self.actor_critic = ActorCritic(self.model, actor_lora_r=c.lora.r, critic_lora_r=c.lora.r,
                                            lora_alpha=c.lora.alpha, actor_lora_scope=c.lora.scope or "actor",
                                            lora_options=self._lora_options())
        self.actor_scope = self.actor_critic.actor_lora_scope
        if c.actor_adapter:
            load_adapter(self.model, c.actor_adapter, scope=self.actor_scope)
        self.kl_ctl = make_kl_controller(c.kl_coef, c.kl_target, c.kl_horizon)

    def _parameters(self):
        return self.actor_critic.actor_parameters() + self.actor_critic.critic_parameters()

    def _lr_of(self):
        actor = {id(p) for p in self.actor_critic.actor_parameters()}
        return lambda name, p: None if id(p) in actor else self.config.critic_lr

    def _critic(self):
        return self.actor_critic

    def _sharded_modules(self):
        return [self.actor_critic.value_head]

    def _prepare(self, rollout) -> dict:
        stats = ppo_prepare(rollout, self.hp, self.kl_ctl.value, all_reduce_sum)
        stats["kl_coef"] = self.kl_ctl.value
        return stats

    def _learn(self, rollout, step):
        stats = super()._learn(rollout, step)
        # the controller sees the global batch's mean sequence KL (lm-human-preferences), the same on every
        # rank, and the number of rows actually collected over all ranks
        kl = (rollout.old_log_probs - rollout.ref_log_probs).masked_fill(~rollout.mask, 0).sum(-1)
        total = all_reduce_sum(torch.stack([kl.sum(), torch.tensor(float(len(kl)), device=kl.device)]).double())
        self.kl_ctl.update(float(total[0] / total[1]), int(total[1]))
        return stats

    def _loss(self, mb):
        packed = rollout_packed(mb)
        logp, entropy = self.scorer.policy(packed, with_entropy=True)
        return ppo_loss(logp, entropy, self.scorer.values(packed), mb, self.hp)

    def _trainable_state(self):
        return self.actor_critic.trainable_state()

    def _load_trainable_state(self, state):
        self.actor_critic.load_trainable_state(state)

    def _extra_state(self):
        return {"kl_controller": self.kl_ctl.state_dict()}

    def _load_extra_state(self, state):
        self.kl_ctl.load_state_dict(state["kl_controller"])


__all__ = ["PPOConfig", "PPOTrainer"]
