"""The one model forward of RL and preference learning: per-token log-probs of given responses
under the policy or the reference, and per-token values, projected at the response positions only.

Layout used everywhere: a row is its prompt immediately followed by its response, right-padded
(so with causal attention no real token ever sees padding, and positions match the KV-cached
generation exactly). Response token j of row i sits at position p_i + j (p_i = prompt length);
the logits that predict it come from position p_i + j - 1. `PaLM.hidden_states(x, positions=...)`
runs the last block only at those positions, and only the gathered per-token log-probs are kept:
nothing vocabulary-sized outlives one call (except `Scorer.policy_distribution`, which GRPO's
score-centring loss asks for by name).

`Scorer` binds the policy (model, LoRA scope, temperature), the reference and the critic of a run;
every trainer (PPO, GRPO, RLOO, REINFORCE++, DPO) and rollout collection score through it, and the
losses in `palm_rlhf.rl` take the tensors it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError
from ..ops import entropy_from_logits, eval_mode, log_probs_of


@dataclass
class PackedSequences:
    """Model inputs for a batch of (prompt, response) rows.

    inputs (b, L - 1): prompt + response right-padded, without the final column (no
    logits are needed after the last token); index (b, T): the input position whose
    logits predict each response token; responses (b, T); mask (b, T).
    """

    inputs: Tensor
    index: Tensor
    responses: Tensor
    mask: Tensor


def pack_sequences(prompts: Tensor, prompt_lengths: Tensor, responses: Tensor, mask: Tensor) -> PackedSequences:
    """Concatenate each row's real prompt and response; see the module docstring for the layout."""
    b, T = responses.shape
    if T == 0:
        raise InputError("every response is empty; nothing to score (max_new_tokens must be >= 1)")
    plens = prompt_lengths.to(responses.device).long()
    rlens = mask.long().sum(-1)
    if bool((plens < 1).any()):
        raise InputError("every prompt needs at least one token (its last token predicts the first response token)")
    L = int((plens + rlens).max())
    L = max(L, int(plens.max()) + 1)
    cols = torch.arange(L, device=responses.device)[None, :]  # (1, L)
    n = prompts.shape[1]
    prompt_ids = torch.zeros(b, L, dtype=torch.long, device=responses.device)
    prompt_ids[:, : min(n, L)] = prompts[:, :L].to(responses.device)
    # column c of row i holds response token c - plens[i] when that is a real token
    j_of_col = cols - plens[:, None]  # (b, L)
    in_response = (j_of_col >= 0) & (j_of_col < rlens[:, None])
    response_ids = responses.gather(1, j_of_col.clamp(0, T - 1))
    x = torch.where(cols < plens[:, None], prompt_ids, torch.where(in_response, response_ids, 0))
    j = torch.arange(T, device=x.device)[None, :]
    index = (plens[:, None] + j - 1).clamp(max=L - 2)  # (b, T) logits position of each response token
    return PackedSequences(inputs=x[:, :-1], index=index, responses=responses, mask=mask.bool())


def response_log_probs(model, packed: PackedSequences, *, finetune_scope: str | None = None,
                       disable_lora: bool = False, temperature: float = 1.0, with_entropy: bool = False
                       ) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs (b, T) of the responses under log_softmax(logits / temperature),
    and optionally the per-token entropy of that distribution (b, T); both 0 on padding.

    Gradients flow when called with grad enabled. The vocabulary projection is applied
    to the response positions only.
    """
    hidden = model.hidden_states(packed.inputs, packed.index, finetune_scope, disable_lora=disable_lora)  # (b, T, d)
    logits = model.to_logits(hidden)  # (b, T, V)
    if temperature != 1.0:
        logits = logits / temperature
    logp = log_probs_of(logits, packed.responses).masked_fill(~packed.mask, 0.0)
    entropy = None
    if with_entropy:
        entropy = entropy_from_logits(logits).masked_fill(~packed.mask, 0.0)
    return logp, entropy


def response_log_softmax(model, packed: PackedSequences, *, finetune_scope: str | None = None,
                         temperature: float = 1.0) -> Tensor:
    """The whole distribution: log_softmax(logits / temperature) over the vocabulary at each response
    position (b, T, V), 0 on padding. Vocabulary-sized: only GRPO's score-centring loss asks for it."""
    hidden = model.hidden_states(packed.inputs, packed.index, finetune_scope)
    logits = model.to_logits(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.log_softmax(-1).masked_fill(~packed.mask[..., None], 0.0)


def response_values(model, value_head, packed: PackedSequences, finetune_scope: str | None = None) -> Tensor:
    """Per-token values (b, T), 0 on padding: the value of the state before response token j is read
    from the hidden state that predicts j."""
    hidden = model.hidden_states(packed.inputs, packed.index, finetune_scope)  # (b, T, d)
    v = value_head(hidden).squeeze(-1).float()  # (b, T)
    return v.masked_fill(~packed.mask, 0.0)


class Scorer:
    """Scores (prompt, response) rows for one run.

    model, scope: the policy (its LoRA scope, None for full weights); temperature: the policy is
    softmax(logits / temperature). reference: an object with `model`, `scope`, `disable_lora`
    (`palm_rlhf.rl.reference.Reference`), or None. critic: an object with `critic`,
    `critic_lora_scope`, `value_head` (`palm_rlhf.rl.actor_critic.ActorCritic`), or None.
    """

    def __init__(self, model, scope: str | None = None, *, temperature: float = 1.0, reference=None, critic=None):
        self.model, self.scope, self.temperature = model, scope, temperature
        self.reference, self.critic = reference, critic

    def policy(self, packed: PackedSequences, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        """Log-probs (b, T) (and entropy) under the policy; differentiable when grad is enabled."""
        return response_log_probs(self.model, packed, finetune_scope=self.scope, temperature=self.temperature,
                                  with_entropy=with_entropy)

    def policy_distribution(self, packed: PackedSequences) -> Tensor:
        """The policy's log-softmax over the vocabulary (b, T, V); differentiable when grad is enabled."""
        return response_log_softmax(self.model, packed, finetune_scope=self.scope, temperature=self.temperature)

    def values(self, packed: PackedSequences) -> Tensor:
        """Per-token values (b, T) under the critic; differentiable when grad is enabled."""
        if self.critic is None:
            raise InputError("this scorer has no critic (values are PPO's); build it with critic=")
        return response_values(self.critic.critic, self.critic.value_head, packed, self.critic.critic_lora_scope)

    @torch.no_grad()
    def reference_log_probs(self, packed: PackedSequences) -> Tensor:
        """Log-probs (b, T) under the frozen reference, in eval mode, at the policy's temperature."""
        if self.reference is None:
            raise InputError("this scorer has no reference policy; build it with reference=")
        ref = self.reference
        with eval_mode(ref.model):
            logp, _ = response_log_probs(ref.model, packed, finetune_scope=ref.scope, disable_lora=ref.disable_lora,
                                         temperature=self.temperature)
        return logp

    @torch.no_grad()
    def rollout(self, packed: PackedSequences, old_log_probs: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor | None]:
        """What a rollout stores, in eval mode: (old log-probs, reference log-probs, values or None).
        `old_log_probs` given (the sampler's, when they are the policy's): used as they are."""
        with eval_mode(self.model):
            if old_log_probs is None:
                old_log_probs, _ = self.policy(packed)
            old_log_probs = old_log_probs.masked_fill(~packed.mask, 0.0)
            ref = self.reference_log_probs(packed)
            values = self.values(packed) if self.critic is not None else None
        return old_log_probs, ref, values


__all__ = ["PackedSequences", "pack_sequences", "response_log_probs", "response_log_softmax", "response_values",
           "Scorer"]
