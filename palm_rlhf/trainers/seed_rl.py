"""The seed package's three other RL trainers, under their constructor arguments and `train(...)` calls,
running on this package's trainers: `palm_rlhf.grpo.RLHFTrainer` (GRPO and its switches),
`palm_rlhf.flowrl.FlowRLTrainer` and `palm_rlhf.tpo.RLHFTrainer` (palm_rlhf_pytorch 0.8.0's
grpo.py, flowrl.py, tpo.py are the specification).

The seed's schedule: `train(num_episodes, max_timesteps, update_timesteps, ...)` draws one random prompt
per timestep and samples it `num_times + 1` times (one group); every `update_timesteps` timesteps it
learns from the groups collected. Here that is one step of the trainer with prompts_per_step =
update_timesteps and group_size = num_times + 1, repeated num_episodes * max_timesteps //
update_timesteps times (a leftover smaller than update_timesteps is not learned from, as in the seed).
`max_seq_len` counts the prompt, as in `palm_rlhf.RLHFTrainer`. What differs under the same names is
listed in docs/migrating.md.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..errors import ConfigError, InputError
from ..generation import SamplingConfig, generate
from ..model.palm import PaLM
from ..model.reward import RewardModel
from ..rl.collect import strip_eos
from ..rl.rewards import as_reward_source
from ..runtime.optim import OptimConfig
from ..runtime.vocab import LoraConfig
from .flowrl import FlowRLConfig, FlowRLTrainer
from .grpo import GRPOConfig, GRPOTrainer
from .rlhf import _prompt_rows, seed_schedule
from .tpo import TPOConfig, TPOTrainer

log = logging.getLogger(__name__)


# the constructor arguments every seed group trainer takes and hands to _SeedGroupTrainer as they are
SHARED_ARGUMENTS = ("prompts", "prompts_path", "prompt_token_ids", "tokenizer", "palm", "reward_model", "actor_lr",
                    "actor_wd", "actor_lora", "actor_lora_r", "actor_dropout", "betas", "max_norm", "pad_value",
                    "minibatch_size", "epochs", "accelerate_kwargs", "out_dir", "seed")


def _shared_arguments(arguments: dict) -> dict:
    """The shared constructor arguments out of a subclass constructor's `locals()`."""
    return {name: arguments[name] for name in SHARED_ARGUMENTS}


class _SeedGroupTrainer:
    """What the seed's GRPO, FlowRL and TPO trainers share: prompts, the actor's LoRA, the optimizer
    arguments, save/load of the actor, best-of-n generate, the episode schedule."""

    kind = ""
    scope = "actor"

    def __init__(self, *, prompts, prompts_path, prompt_token_ids, tokenizer, palm: PaLM, reward_model: RewardModel,
                 num_times: int, actor_lr: float, actor_wd: float, actor_lora: bool, actor_lora_r: int,
                 actor_dropout: float, betas, max_norm: float | None, pad_value: float, minibatch_size: int,
                 epochs: int, accelerate_kwargs: dict | None, out_dir: str | None, seed: int):
        name = type(self).__name__
        if accelerate_kwargs:
            log.warning("%s(accelerate_kwargs=...) is ignored: use torchrun for several processes", name)
        if not actor_lora:
            raise ConfigError(f"{name}(actor_lora=False): RL here trains a LoRA actor scope against the frozen "
                              f"base as its reference; pass actor_lora=True (actor_lora_r sets its rank)")
        if actor_dropout:
            log.warning("%s(actor_dropout=%g) is ignored: rollouts and updates run without dropout, so the "
                        "first update's ratio is exactly 1", name, actor_dropout)
        if num_times < 1:
            raise ConfigError(f"{name}: the number of extra samples per prompt must be >= 1 (got {num_times}); "
                              f"a group needs 2 samples to compare")
        self.palm = palm
        self.prompt_rows = _prompt_rows(prompts, prompts_path, prompt_token_ids, tokenizer, pad_value)
        self.num_prompts = len(self.prompt_rows)
        self.reward_model = reward_model.eval()
        self.group_size = num_times + 1
        self.optim = OptimConfig(lr=actor_lr, weight_decay=actor_wd, betas=tuple(betas), max_grad_norm=max_norm or 0.0,
                                 warmup=0, schedule="constant")
        self.lora = LoraConfig(r=actor_lora_r, scope=self.scope)
        self.minibatch_size, self.epochs, self.out_dir, self.seed = minibatch_size, epochs, out_dir, seed
        self.history: list[dict] = []

    @property
    def device(self) -> torch.device:
        return self.palm.device

    def _config(self, **common):  # the algorithm's config
        raise NotImplementedError

    def _trainer(self, config):
        raise NotImplementedError

    def _batch_size(self, update_timesteps: int) -> int:
        return min(self.minibatch_size, update_timesteps * self.group_size)  # the seed's minibatches count sequences

    def train(self, num_episodes: int = 50000, max_timesteps: int = 500, update_timesteps: int = 5000,
              max_batch_size: int = 16, max_seq_len: int = 2048, eos_token: int | None = None,
              temperature: float = 1.0, **ignored) -> list[dict]:
        if ignored:
            log.warning("%s.train: %s ignored (no replay buffer on disk here)", type(self).__name__, sorted(ignored))
        updates, max_new = seed_schedule(type(self).__name__, self.prompt_rows, num_episodes, max_timesteps,
                                         update_timesteps, max_seq_len)
        if updates == 0:
            return self.history
        config = self._config(out_dir=self.out_dir or tempfile.mkdtemp(prefix=f"{self.kind}-"), max_steps=updates,
                              prompts_per_step=update_timesteps, group_size=self.group_size,
                              rollout_batch_size=max_batch_size, batch_size=self._batch_size(update_timesteps),
                              epochs=self.epochs, max_new_tokens=max_new, temperature=temperature,
                              eos_token=eos_token, seed=self.seed, sample_every=0, optim=self.optim, lora=self.lora)
        trainer = self._trainer(config)
        try:
            trainer.setup()
            self._adjust(trainer)
            self.history.extend(trainer.train())
            self._after(trainer)
        finally:
            trainer.cleanup()
        log.info("%s training complete", self.kind)
        return self.history

    def _adjust(self, trainer) -> None:
        pass

    def _after(self, trainer) -> None:
        pass

    def _actor_state(self) -> dict:
        return dict(self.palm.finetune_modules[self.scope].state_dict()) if self.scope in self.palm.finetune_modules \
            else {}

    def save(self, filepath="./checkpoint.pt") -> None:
        """The actor's LoRA weights (the seed saves its actor)."""
        torch.save(self._actor_state(), filepath)

    def load(self, filepath="./checkpoint.pt") -> None:
        """Load what `save` wrote, through the one safe reader (a file that would run code is refused)."""
        from ..files import load_state_dict_file
        from ..model.adapters import adapter_on_frozen_base

        state = load_state_dict_file(Path(filepath), map_location=self.device)
        if self.scope not in self.palm.finetune_modules:
            adapter_on_frozen_base(self.palm, self.scope, r=self.lora.r, alpha=self.lora.alpha)
        self.palm.finetune_modules[self.scope].load_state_dict(state)

    @torch.no_grad()
    def generate(self, max_seq_len: int, *args, prompt: Tensor, num_samples: int = 4, eos_token: int | None = None,
                 temperature: float = 1.0, **kwargs) -> Tensor:
        """Best-of-n: `num_samples` continuations of one prompt under the trained actor; the prompt + the
        completion the reward model scores highest (1-D)."""
        if args or kwargs:
            log.warning("%s.generate: extra arguments %s are ignored", type(self).__name__, sorted(kwargs) or args)
        prompt = torch.as_tensor(prompt, dtype=torch.long)
        if prompt.ndim != 1:
            raise InputError(f"prompt must be one 1-D sequence of ids (got shape {tuple(prompt.shape)})")
        max_new = max_seq_len - prompt.numel()
        if max_new < 1:
            raise ConfigError(f"max_seq_len={max_seq_len} leaves no room after a {prompt.numel()}-token prompt")
        scope = self.scope if self.scope in self.palm.finetune_modules else None
        out = generate(self.palm, [prompt] * num_samples,
                       SamplingConfig(max_new_tokens=max_new, temperature=temperature, eos_token=eos_token),
                       finetune_scope=scope)
        completions = [strip_eos(row[:n], r) for row, n, r in zip(out.tokens, out.lengths.tolist(), out.stop_reasons)]
        scores = as_reward_source(self.reward_model)([prompt.cpu()] * num_samples, [c.cpu() for c in completions],
                                                     out.stop_reasons)
        best = int(scores.argmax())
        return torch.cat([prompt.to(out.tokens.device), out.tokens[best, : int(out.lengths[best])]])


class SeedGRPOTrainer(_SeedGroupTrainer):
    """`palm_rlhf_pytorch.grpo.RLHFTrainer`'s arguments on `palm_rlhf.trainers.grpo.GRPOTrainer`."""

    kind = "grpo"

    def __init__(self, *, prompts: list[str] | None = None, prompts_path: str | None = None,
                 prompt_token_ids: Tensor | None = None, tokenizer=None, palm: PaLM, reward_model: RewardModel,
                 grpo_num_times_sample_rewards: int = 10, actor_lr: float = 1e-4, actor_wd: float = 0.0,
                 actor_lora: bool = True, actor_lora_r: int = 8, actor_dropout: float = 0.0, betas=(0.9, 0.999),
                 max_norm: float | None = None, eps_clip: float = 0.2, beta_s: float = 0.01, pad_value: float = 0.0,
                 minibatch_size: int = 16, epochs: int = 1, kl_div_loss_weight: float = 0.1,
                 use_simple_policy_optimization: bool = False, use_dr_grpo: bool = False,
                 dr_grpo_constant: float | None = None, use_max_rl: bool = False, use_score_centering: bool = False,
                 score_centering_topk: int | None = None,
                 score_centering_weight_fn: Callable[[Tensor], Tensor] = torch.ones_like,
                 add_entropy_to_advantage: bool = False, entropy_to_advantage_kappa: float = 2.0,
                 entropy_to_advantage_scale: float = 0.4, accelerate_kwargs: dict | None = None,
                 out_dir: str | None = None, seed: int = 0):
        dr_grpo = use_dr_grpo or dr_grpo_constant is not None
        if dr_grpo and use_max_rl:
            raise ConfigError("use_dr_grpo and use_max_rl are exclusive (one divides by a constant, the other by "
                              "the group's mean reward); pick one")
        if use_simple_policy_optimization and use_score_centering:
            raise ConfigError("use_simple_policy_optimization and use_score_centering are exclusive; pick one")
        super().__init__(num_times=grpo_num_times_sample_rewards, **_shared_arguments(locals()))
        self.options = dict(
            clip_eps=eps_clip, ent_coef=beta_s, kl_coef=kl_div_loss_weight,
            advantage_norm="constant" if dr_grpo else "mean" if use_max_rl else "std",
            advantage_constant=float(dr_grpo_constant if dr_grpo_constant is not None else self.group_size),
            policy_loss="spo" if use_simple_policy_optimization else
            "score_centering" if use_score_centering else "clip",
            entropy_advantage={"scale": entropy_to_advantage_scale if add_entropy_to_advantage else 0.0,
                               "kappa": entropy_to_advantage_kappa},
            score_centering={"topk": score_centering_topk})
        self.weight_fn = None if score_centering_weight_fn is torch.ones_like else score_centering_weight_fn

    def _config(self, **common):
        return GRPOConfig(**common, **self.options)

    def _trainer(self, config):
        return GRPOTrainer(config, model=self.palm, reward=as_reward_source(self.reward_model),
                           prompts=self.prompt_rows)

    def _adjust(self, trainer) -> None:
        if self.weight_fn is not None:  # a callable is no config value: handed to the loss directly
            trainer.hp = replace(trainer.hp, score_centering_weight=self.weight_fn)


class SeedFlowRLTrainer(_SeedGroupTrainer):
    """`palm_rlhf_pytorch.flowrl.FlowRLTrainer`'s arguments on `palm_rlhf.trainers.flowrl.FlowRLTrainer`."""

    kind = "flowrl"

    def __init__(self, *, prompts: list[str] | None = None, prompts_path: str | None = None,
                 prompt_token_ids: Tensor | None = None, tokenizer=None, palm: PaLM, reward_model: RewardModel,
                 flowrl_num_times_sample: int = 8, beta: float = 15.0, actor_lr: float = 1e-4, actor_wd: float = 0.0,
                 actor_lora: bool = True, actor_lora_r: int = 8, actor_dropout: float = 0.0, betas=(0.9, 0.999),
                 max_norm: float | None = None, eps_clip: float = 0.2, beta_s: float = 0.01, pad_value: float = 0.0,
                 minibatch_size: int = 16, epochs: int = 1, kl_div_loss_weight: float = 0.1,
                 partition_function_hidden_dim: int = 768, partition_function_lr: float = 1e-4,
                 accelerate_kwargs: dict | None = None, out_dir: str | None = None, seed: int = 0):
        super().__init__(num_times=flowrl_num_times_sample, **_shared_arguments(locals()))
        if partition_function_lr != actor_lr:
            log.warning("FlowRLTrainer(partition_function_lr=%g): log Z trains with the actor's optimizer and "
                        "lr (%g) here", partition_function_lr, actor_lr)
        # the seed's beta_s and kl_div_loss_weight are stored but never enter its FlowRL loss; so here too
        self.options = dict(beta=beta, clip_eps=eps_clip, log_z={"hidden": partition_function_hidden_dim})
        self.log_z = None

    def _batch_size(self, update_timesteps: int) -> int:
        # the seed's minibatches count sequences; ours hold whole groups (log Z is evaluated once per group)
        return max(1, min(self.minibatch_size, update_timesteps * self.group_size) // self.group_size) * self.group_size

    def _config(self, **common):
        return FlowRLConfig(**common, **self.options)

    def _trainer(self, config):
        return FlowRLTrainer(config, model=self.palm, reward=as_reward_source(self.reward_model),
                             prompts=self.prompt_rows)

    def _after(self, trainer) -> None:
        self.log_z = trainer.log_z  # the trained partition function (the seed's self.partition_function)

    @property
    def partition_function(self):
        return self.log_z


class SeedTPOTrainer(_SeedGroupTrainer):
    """`palm_rlhf_pytorch.tpo.RLHFTrainer`'s arguments on `palm_rlhf.trainers.tpo.TPOTrainer`."""

    kind = "tpo"

    def __init__(self, *, prompts: list[str] | None = None, prompts_path: str | None = None,
                 prompt_token_ids: Tensor | None = None, tokenizer=None, palm: PaLM, reward_model: RewardModel,
                 num_times_sample_rewards: int = 10, actor_lr: float = 1e-4, actor_wd: float = 0.0,
                 actor_lora: bool = True, actor_lora_r: int = 8, actor_dropout: float = 0.0, betas=(0.9, 0.999),
                 max_norm: float | None = None, beta_s: float = 0.01, pad_value: float = 0.0,
                 minibatch_size: int = 16, epochs: int = 1, tpo_eta: float = 1.0,
                 accelerate_kwargs: dict | None = None, out_dir: str | None = None, seed: int = 0):
        super().__init__(num_times=num_times_sample_rewards, **_shared_arguments(locals()))
        self.options = dict(eta=tpo_eta, ent_coef=beta_s, kl_coef=0.0)  # the seed's TPO has no KL term

    def _batch_size(self, update_timesteps: int) -> int:
        return min(self.minibatch_size, update_timesteps) * self.group_size  # the seed's minibatches count groups

    def _config(self, **common):
        return TPOConfig(**common, **self.options)

    def _trainer(self, config):
        return TPOTrainer(config, model=self.palm, reward=as_reward_source(self.reward_model),
                          prompts=self.prompt_rows)


__all__ = ["SeedGRPOTrainer", "SeedFlowRLTrainer", "SeedTPOTrainer"]
