"""Seed-compatible `RLHFTrainer`: the palm_rlhf_pytorch constructor, `.train(...)` and
best-of-n `.generate(...)`, routed to the PPO machinery of this package.

What changes under the same names (see docs/rl.md): `kl_div_loss_weight` is the
coefficient of a KL penalty to the *reference* policy (the seed compared old and new
rollout policies); rollouts are generated in batches of `max_batch_size` with a KV
cache; advantages use GAE over per-token values; gradient clipping (`max_norm`) works;
the entropy bonus (`beta_s`) raises entropy. HL-Gauss value bins are replaced by a
scalar value head trained with the clipped value loss.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from ..errors import ConfigError, InputError
from ..generation import SamplingConfig, generate
from ..model.palm import PaLM
from ..model.reward import RewardModel
from ..rl.actor_critic import ActorCritic
from ..rl.collect import strip_eos
from ..rl.rewards import as_reward_source
from ..runtime.optim import OptimConfig
from ..runtime.vocab import LoraConfig
from .ppo import PPOConfig, PPOTrainer

log = logging.getLogger(__name__)


def _prompt_rows(prompts, prompts_path, prompt_token_ids, tokenizer, pad_value) -> list[Tensor]:
    given = sum(x is not None for x in (prompts, prompts_path, prompt_token_ids))
    if given != 1:
        raise ConfigError("RLHFTrainer needs exactly one of prompts=, prompts_path= or prompt_token_ids=")
    if prompts_path is not None:
        prompts = [line for line in Path(prompts_path).read_text().split("\n") if line]
    if prompts is not None:
        if not prompts:
            raise ConfigError("RLHFTrainer(prompts=[]): no prompts")
        if tokenizer is None:
            raise ConfigError("text prompts need tokenizer= (a callable list[str] -> ids, or an object with .encode)")
        if hasattr(tokenizer, "encode"):
            return [torch.tensor(tokenizer.encode(p) or [tokenizer.eos_id], dtype=torch.long) for p in prompts]
        prompt_token_ids = torch.as_tensor(tokenizer(prompts))
    ids = torch.as_tensor(prompt_token_ids, dtype=torch.long)
    if ids.ndim == 1:
        ids = ids[None]
    rows = [row[row != int(pad_value)] for row in ids]  # the seed strips padding from each prompt
    if any(r.numel() == 0 for r in rows):
        raise InputError("a prompt is all padding (pad_value); every prompt needs a token")
    return rows


def seed_schedule(name: str, prompt_rows: list[Tensor], num_episodes: int, max_timesteps: int,
                  update_timesteps: int, max_seq_len: int) -> tuple[int, int]:
    """The seed trainers' `train(...)` schedule: (updates, max_new_tokens). num_episodes * max_timesteps
    rollouts in all, one update per `update_timesteps` (a leftover is not learned from, as in the seed; 0
    updates is logged); `max_seq_len` counts the longest prompt."""
    total = num_episodes * max_timesteps
    updates = total // update_timesteps
    longest = max(r.numel() for r in prompt_rows)
    max_new = max_seq_len - longest
    if max_new < 1:
        raise ConfigError(f"max_seq_len={max_seq_len} leaves no room to generate after a {longest}-token "
                          f"prompt; raise max_seq_len")
    if updates == 0:
        log.warning("%s.train: %d timesteps < update_timesteps=%d: nothing to learn from", name, total,
                    update_timesteps)
    return updates, max_new


class RLHFTrainer:
    def __init__(self, *, prompts: list[str] | None = None, prompts_path: str | None = None,
                 prompt_token_ids: Tensor | None = None, tokenizer=None, palm: PaLM, reward_model: RewardModel,
                 critic: PaLM | None = None, actor_critic: ActorCritic | None = None, actor_lr: float = 1e-4,
                 critic_lr: float = 1e-4, actor_wd: float = 0.0, critic_wd: float = 0.0, actor_lora: bool = True,
                 critic_lora: bool = True, actor_lora_r: int = 8, critic_lora_r: int = 8,
                 critic_pooled_values: bool | None = None, actor_dropout: float = 0.0, critic_dropout: float = 0.0,
                 betas=(0.9, 0.999), max_norm: float | None = None, eps_clip: float = 0.2, value_clip: float = 0.4,
                 beta_s: float = 0.01, pad_value: float = 0.0, minibatch_size: int = 16, epochs: int = 1,
                 kl_div_loss_weight: float = 0.1, accelerate_kwargs: dict | None = None,
                 critic_num_pred_bins: int = 6, hl_gauss_loss_kwargs: dict | None = None,
                 out_dir: str | None = None, seed: int = 0):
        if accelerate_kwargs:
            log.warning("RLHFTrainer(accelerate_kwargs=...) is ignored: use torchrun for several processes")
        self.palm = palm
        self.prompt_rows = _prompt_rows(prompts, prompts_path, prompt_token_ids, tokenizer, pad_value)
        self.num_prompts = len(self.prompt_rows)
        self.reward_model = reward_model.eval()
        if actor_critic is None:
            # the seed defaults critic_pooled_values to True; ActorCritic warns only when a caller asks for it
            actor_critic = ActorCritic(palm, critic=critic, pooled_values=critic_pooled_values is True,
                                       actor_lora=actor_lora, critic_lora=critic_lora, actor_lora_r=actor_lora_r,
                                       critic_lora_r=critic_lora_r, actor_dropout=actor_dropout,
                                       critic_dropout=critic_dropout, critic_dim_out=critic_num_pred_bins)
        self.actor_critic = actor_critic
        self.settings = dict(lr=actor_lr, critic_lr=critic_lr, weight_decay=actor_wd, max_grad_norm=max_norm,
                             betas=tuple(betas),
                             clip_eps=eps_clip, value_clip=value_clip, ent_coef=beta_s, minibatch_size=minibatch_size,
                             epochs=epochs, kl_coef=kl_div_loss_weight, seed=seed)
        self.out_dir = out_dir
        self.history: list[dict] = []

    @property
    def device(self) -> torch.device:
        return self.palm.device

    def save(self, filepath="./checkpoint.pt") -> None:
        torch.save(self.actor_critic.state_dict(), filepath)

    def load(self, filepath="./checkpoint.pt") -> None:
        """Load what `save` wrote, through the one safe reader (a file that would run code is refused)."""
        from ..model.checkpoint import load_into
        from ..files import load_state_dict_file

        load_into(self.actor_critic, load_state_dict_file(Path(filepath), map_location=self.device),
                  source=str(filepath))

    def train(self, num_episodes: int = 50000, max_timesteps: int = 500, update_timesteps: int = 5000,
              max_batch_size: int = 16, max_seq_len: int = 2048, eos_token: int | None = None,
              temperature: float = 1.0) -> list[dict]:
        """The seed's schedule: num_episodes * max_timesteps rollouts in all, one PPO update per
        `update_timesteps` rollouts (a leftover smaller than that is not learned from, as in the seed).
        Rollouts are generated `max_batch_size` at a time; sequences end at `max_seq_len` tokens
        including the prompt."""
        updates, max_new = seed_schedule("RLHFTrainer", self.prompt_rows, num_episodes, max_timesteps,
                                         update_timesteps, max_seq_len)
        if updates == 0:
            return self.history
        s = self.settings
        config = PPOConfig(out_dir=self.out_dir or tempfile.mkdtemp(prefix="rlhf-"), max_steps=updates,
                           prompts_per_step=update_timesteps, rollout_batch_size=max_batch_size,
                           batch_size=min(s["minibatch_size"], update_timesteps), epochs=s["epochs"],
                           max_new_tokens=max_new, temperature=temperature, eos_token=eos_token,
                           critic_lr=s["critic_lr"], clip_eps=s["clip_eps"], value_clip=s["value_clip"],
                           ent_coef=s["ent_coef"], kl_coef=s["kl_coef"], seed=s["seed"], sample_every=0,
                           optim=OptimConfig(lr=s["lr"], weight_decay=s["weight_decay"], betas=s["betas"],
                                             max_grad_norm=s["max_grad_norm"], warmup=0, schedule="constant"),
                           lora=LoraConfig(r=self.actor_critic.actor_palm.lora_r, scope="actor"))
        trainer = PPOTrainer(config, actor_critic=self.actor_critic, model=self.palm,
                             reward=as_reward_source(self.reward_model), prompts=self.prompt_rows)
        try:
            trainer.setup()
            self.history.extend(trainer.train())
        finally:
            trainer.cleanup()
        log.info("rlhf training complete")
        return self.history

    @torch.no_grad()
    def generate(self, max_seq_len: int, *args, prompt: Tensor, num_samples: int = 4, eos_token: int | None = None,
                 temperature: float = 1.0, **kwargs) -> Tensor:
        """Best-of-n: sample `num_samples` continuations of one prompt, return the prompt + the
        completion the reward model scores highest (1-D; padding after EOS dropped)."""
        if args or kwargs:
            log.warning("RLHFTrainer.generate: extra arguments %s are ignored", sorted(kwargs) or args)
        prompt = torch.as_tensor(prompt, dtype=torch.long)
        if prompt.ndim != 1:
            raise InputError(f"prompt must be one 1-D sequence of ids (got shape {tuple(prompt.shape)}); "
                             f"only one prompt at a time")
        max_new = max_seq_len - prompt.numel()
        if max_new < 1:
            raise ConfigError(f"max_seq_len={max_seq_len} leaves no room after a {prompt.numel()}-token prompt")
        sampling = SamplingConfig(max_new_tokens=max_new, temperature=temperature, eos_token=eos_token)
        out = generate(self.palm, [prompt] * num_samples, sampling, finetune_scope=self.actor_critic.actor_lora_scope)
        completions = [strip_eos(row[:n], r) for row, n, r in zip(out.tokens, out.lengths.tolist(),
                                                                  out.stop_reasons)]
        scores = as_reward_source(self.reward_model)([prompt.cpu()] * num_samples,
                                                     [c.cpu() for c in completions], out.stop_reasons)
        best = int(scores.argmax())
        return torch.cat([prompt.to(out.tokens.device), out.tokens[best, : int(out.lengths[best])]])


__all__ = ["RLHFTrainer"]
