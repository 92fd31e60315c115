"""Implicit process reward model (Yuan et al. 2024, "Free Process Rewards without Process Labels",
https://arxiv.org/abs/2412.01981).

A language model trained only on *outcome* labels (was the whole response good?) with the
reward parameterised as a log-likelihood ratio, ``r(y) = beta * log pi(y) / pi_ref(y)``, gives
per-token *process* rewards for free: ``beta * (log pi(y_t | y_<t) - log pi_ref(y_t | y_<t))``.

The reference is either a frozen copy of the model (the seed's behaviour) or, with
``finetune_scope=...``, the same PaLM with that LoRA scope disabled, so no second copy of the
weights is made; only the scope's LoRA parameters are then trained.

Differences from palm_rlhf_pytorch 0.8 (documented in docs/reward.md):
* the seed returns ``mean(l * log sigma(r_t) + (1 - l) * log sigma(-r_t))``, a log-likelihood that
  gradient descent *minimises*, i.e. the sign is flipped; ours is the negated value, a loss.
* the paper's cross-entropy (eq. 5) applies sigma to the *sequence* reward ``sum_t r_t``; the seed
  applied it to each token separately. Ours follows the paper.
"""

from __future__ import annotations

from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from ..ops import log_probs_of


def implicit_prm_loss(implicit_rewards: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """Outcome cross-entropy of the summed implicit reward (paper eq. 5), mean over the batch.

    implicit_rewards (b, n) per-token rewards, labels (b,) in [0, 1] (1 = correct outcome),
    mask (b, n) True on the tokens that belong to the response.
    ``loss = -[l * log sigma(R) + (1 - l) * log sigma(-R)]`` with ``R = sum_t mask_t * r_t``.
    """
    if mask is not None:
        implicit_rewards = implicit_rewards.masked_fill(~mask.bool(), 0.0)
    seq_reward = implicit_rewards.float().sum(dim=-1)  # (b,)
    labels = labels.to(seq_reward.dtype)
    # 1 - sigma(x) == sigma(-x); logsigmoid stays finite for large |R|
    loglik = labels * F.logsigmoid(seq_reward) + (1.0 - labels) * F.logsigmoid(-seq_reward)
    return -loglik.mean()


class ImplicitPRM(nn.Module):
    """Seed-compatible: ``ImplicitPRM(model, ref_model=None, beta=0.1)``; ``forward(seq, labels=None)``.

    seq (b, n) token ids; ids < 0 are padding (the seed's convention) and `mask` (b, n) may mark
    the response tokens explicitly (True = score this token). Without labels returns the dense
    rewards (b, n - 1) for predicting seq[:, 1:], zero at padding; with labels (b,) returns the loss.
    """

    def __init__(self, model: nn.Module, ref_model: nn.Module | None = None, beta: float = 0.1, *,
                 finetune_scope: str | None = None):
        super().__init__()
        if not float(beta) > 0:
            raise ConfigError(f"ImplicitPRM(beta={beta!r}): beta must be > 0")
        self.model = model
        self.beta = float(beta)
        self.finetune_scope = finetune_scope
        if finetune_scope is not None:
            if ref_model is not None:
                raise ConfigError("ImplicitPRM: pass either ref_model or finetune_scope, not both "
                                  "(with a scope the reference is the model with that scope disabled)")
            if not hasattr(model, "finetune_modules"):
                raise ConfigError("ImplicitPRM(finetune_scope=...) needs a PaLM with LoRA finetune scopes")
            if finetune_scope not in model.finetune_modules:
                model.add_finetune_params(finetune_scope)
            self.ref_model = None
        else:
            if ref_model is None:
                ref_model = deepcopy(model)
            ref_model.requires_grad_(False)
            self.ref_model = ref_model

    def parameters(self, recurse: bool = True):
        """Only the trained weights: the policy (or just its LoRA scope), never the reference."""
        if self.finetune_scope is not None:
            return self.model.finetune_parameters(self.finetune_scope)
        return self.model.parameters(recurse)

    def _logits(self, x: Tensor, reference: bool) -> Tensor:
        if self.finetune_scope is not None:
            return self.model(x, finetune_scope=self.finetune_scope, disable_lora=reference)
        return (self.ref_model if reference else self.model)(x)

    def implicit_rewards(self, seq: Tensor, mask: Tensor | None = None) -> Tensor:
        """Per-token rewards beta * (log pi - log pi_ref) of seq[:, 1:], (b, n - 1), 0 where masked."""
        if seq.ndim != 2 or seq.shape[1] < 2:
            raise InputError(f"seq must have shape (batch, seq_len >= 2), got {tuple(seq.shape)}")
        source, target = seq[:, :-1], seq[:, 1:]
        token_mask = target >= 0  # (b, n-1)
        if mask is not None:
            if mask.shape != seq.shape:
                raise InputError(f"mask {tuple(mask.shape)} must match seq {tuple(seq.shape)}")
            token_mask = token_mask & mask[:, 1:].bool()
        # padding ids are negative; any real id keeps the model happy and is masked out below
        source, target = source.clamp(min=0), target.clamp(min=0)
        log_prob = log_probs_of(self._logits(source, reference=False), target)
        with torch.no_grad():
            ref_log_prob = log_probs_of(self._logits(source, reference=True), target)
        rewards = self.beta * (log_prob - ref_log_prob)
        return rewards.masked_fill(~token_mask, 0.0)

    def forward(self, seq: Tensor, labels: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        rewards = self.implicit_rewards(seq, mask)
        if labels is None:
            return rewards
        return implicit_prm_loss(rewards, labels)


__all__ = ["ImplicitPRM", "implicit_prm_loss"]
