"""`ActorCritic`: the policy (actor LoRA scope) and the value function (critic LoRA
scope + a scalar value head) on one PaLM, with the seed's constructor.

Unlike the seed, the critic shares the actor's frozen base weights when both use
LoRA (the seed deep-copied the whole PaLM), and values are per token: the value of
the state before response token j is read from the hidden state that predicts j
(`palm_rlhf.generation.scoring.Scorer(..., critic=actor_critic).values`).
"""

from __future__ import annotations

import copy
import logging
import math
from collections import namedtuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from ..generation import SamplingConfig, generate
from ..model.palm import PaLM
from ..model.adapters import adapter_on_frozen_base
from ..ops import eval_mode, top_k

log = logging.getLogger(__name__)

PPOActionCriticReturn = namedtuple("PPOActionCriticReturn",
                                   ["actions", "sequence", "mask", "prompt_mask", "action_logits", "values"])


class ActorCritic(nn.Module):
    def __init__(self, palm: PaLM, critic: PaLM | None = None, pooled_values: bool = False, actor_lora: bool = True,
                 critic_lora: bool = True, actor_lora_r: int = 8, critic_lora_r: int = 8,
                 actor_lora_scope: str = "actor", critic_lora_scope: str = "critic", actor_dropout: float = 0.0,
                 critic_dropout: float = 0.0, critic_dim_out: int = 6, *, lora_alpha: float | None = None,
                 lora_options: dict | None = None):
        super().__init__()
        if not isinstance(palm, PaLM):
            raise ConfigError(f"ActorCritic(palm=...) needs a palm_rlhf PaLM, got {type(palm).__name__}")
        if critic is not None and not isinstance(critic, PaLM):
            raise ConfigError(f"ActorCritic(critic=...) must be a PaLM or None, got {type(critic).__name__} "
                              f"(an ImplicitPRM critic is not supported by the PPO trainer)")
        if pooled_values:
            log.warning("ActorCritic(pooled_values=True): values are per token here (GAE needs them); "
                        "the flag is accepted for compatibility and has no effect")
        if critic_dim_out != 6 and critic_dim_out != 1:
            log.warning("ActorCritic(critic_dim_out=%s): the value head is a scalar regressor trained with the "
                        "clipped value loss; critic_dim_out is accepted for compatibility only", critic_dim_out)
        if actor_dropout or critic_dropout:
            log.warning("dropout during RL makes the PPO ratio differ from 1 on unchanged weights; "
                        "actor_dropout/critic_dropout = 0 is recommended")
        self.actor_palm = palm
        self.actor_lora, self.critic_lora = bool(actor_lora), bool(critic_lora)
        self.actor_lora_scope = actor_lora_scope if actor_lora else None
        self.critic_lora_scope = critic_lora_scope if critic_lora else None
        if critic is None:
            # LoRA critic: share the base (frozen under LoRA); a fully trained critic needs its own copy
            critic = palm if critic_lora and actor_lora else copy.deepcopy(palm)
        self.critic = critic
        self.critic_shares_base = critic is palm
        palm.set_dropout(actor_dropout)
        if not self.critic_shares_base:
            critic.set_dropout(critic_dropout)
        # LoRA trains only the adapters: a frozen base skips its weight gradients in backward
        if self.actor_lora:
            adapter_on_frozen_base(palm, actor_lora_scope, r=actor_lora_r, alpha=lora_alpha, **(lora_options or {}))
        if self.critic_lora:
            adapter_on_frozen_base(critic, critic_lora_scope, r=critic_lora_r, alpha=lora_alpha,
                                   **(lora_options or {}))
        self.value_head = nn.Linear(palm.dim, 1)
        # small initial values: the critic starts predicting ~0 and learns the scale of the returns
        nn.init.normal_(self.value_head.weight, std=1e-3)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(palm.token_emb.weight.device)

    # ------------------------------------------------------------------ parameters (seed names)

    def actor_parameters(self) -> list[nn.Parameter]:
        if not self.actor_lora:
            return list(self.actor_palm.palm_parameters())
        return list(self.actor_palm.finetune_parameters(self.actor_lora_scope))

    def critic_parameters(self) -> list[nn.Parameter]:
        head = list(self.value_head.parameters())
        if not self.critic_lora:
            return list(self.critic.palm_parameters()) + head
        return list(self.critic.finetune_parameters(self.critic_lora_scope)) + head

    def trainable_state(self) -> dict[str, Tensor]:
        """Only what PPO changes: the actor and critic adapters (or full weights) and the value head."""
        state = {f"value_head.{k}": v for k, v in self.value_head.state_dict().items()}
        for prefix, model, scope in (("actor", self.actor_palm, self.actor_lora_scope),
                                     ("critic", self.critic, self.critic_lora_scope)):
            if scope is not None:
                sub = model.finetune_modules[scope].state_dict()
            elif prefix == "critic" and self.critic_shares_base:
                continue
            else:
                sub = model.state_dict()
            state.update({f"{prefix}.{k}": v for k, v in sub.items()})
        return state

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        self.value_head.load_state_dict({k[len("value_head."):]: v for k, v in state.items()
                                         if k.startswith("value_head.")})
        for prefix, model, scope in (("actor", self.actor_palm, self.actor_lora_scope),
                                     ("critic", self.critic, self.critic_lora_scope)):
            sub = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
            if not sub:
                continue
            target = model.finetune_modules[scope] if scope is not None else model
            target.load_state_dict(sub)

    # ------------------------------------------------------------------ seed surface

    @torch.no_grad()
    def generate(self, state: Tensor, max_seq_len: int, eos_token: int | None = None, return_values: bool = False,
                 temperature: float = 1.0, filter_logits_fn=top_k, filter_thres: float = 0.9,
                 pad_value: int = 0, use_tqdm: bool = False, **kwargs) -> PPOActionCriticReturn:
        """The seed's rollout call: sample from the actor until each sequence is `max_seq_len` tokens
        long including the prompt, then run the actor (and critic) over the whole sequence.

        state (b, n) prompt ids (one length). Returns the seed's named tuple: actions (b, T) new tokens
        padded with `pad_value` after each row's EOS; sequence (b, n + T); mask (b, n + T) True up to and
        including the first generated EOS (None without `eos_token`); prompt_mask (b, n + T);
        action_logits (b, n + T, V); values (b, n + T) or None.

        Sampling runs on the batched KV-cached engine (`palm_rlhf.generation`) when the filter is the
        seed's default `top_k` (its fraction becomes a count) or None; any other `filter_logits_fn`
        goes through `PaLM.generate`, which applies the callable as given.
        """
        if kwargs:
            log.warning("ActorCritic.generate: extra arguments %s are ignored", sorted(kwargs))
        state = torch.as_tensor(state, dtype=torch.long)
        if state.ndim == 1:
            state = state[None]
        if state.ndim != 2 or state.shape[1] == 0:
            raise InputError(f"state must be (batch, n) prompt ids with n >= 1, got shape {tuple(state.shape)}")
        b, n = state.shape
        max_new = max(1, max_seq_len - n)  # the seed samples at least one token
        with eval_mode(self):
            if filter_logits_fn is None or filter_logits_fn is top_k:
                vocab = self.actor_palm.num_tokens
                k = 0 if filter_logits_fn is None else math.ceil((1 - filter_thres) * vocab)
                sampling = SamplingConfig(max_new_tokens=max_new, temperature=temperature, eos_token=eos_token,
                                          top_k=k if k < vocab else 0)
                out = generate(self.actor_palm, state, sampling, lengths=torch.full((b,), n),
                               finetune_scope=self.actor_lora_scope)
                actions = out.tokens.masked_fill(~out.mask, pad_value)
            else:
                actions = self.actor_palm.generate(max_seq_len, prompt=state, temperature=temperature,
                                                   filter_logits_fn=filter_logits_fn, filter_thres=filter_thres,
                                                   pad_value=pad_value, eos_token=eos_token, use_tqdm=use_tqdm,
                                                   finetune_scope=self.actor_lora_scope)
            sequence = torch.cat([state.to(actions.device), actions], dim=-1)  # (b, n + T)
            prompt_mask = (torch.arange(sequence.shape[-1], device=sequence.device) < n).expand(b, -1)
            mask = None
            if eos_token is not None:
                # True through the first generated EOS; the prompt is always kept
                is_eos = sequence.eq(eos_token) & ~prompt_mask
                before = is_eos.long().cumsum(-1) - is_eos.long()  # EOS strictly before each position
                mask = before.eq(0)
            action_logits, values = self.forward(sequence, return_values=return_values)
        return PPOActionCriticReturn(actions, sequence, mask, prompt_mask, action_logits, values)

    def forward(self, x: Tensor, mask: Tensor | None = None, return_values: bool = True):
        """Seed-compatible: action logits (b, n, V) and per-position values (b, n) (or None)."""
        logits = self.actor_palm(x, finetune_scope=self.actor_lora_scope)
        if not return_values:
            return logits, None
        embeds = self.critic.embed(x, finetune_scope=self.critic_lora_scope)
        return logits, self.value_head(embeds).squeeze(-1)


__all__ = ["ActorCritic", "PPOActionCriticReturn"]
