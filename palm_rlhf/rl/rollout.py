"""The `Rollout` container and the one function that turns (prompt, response)
pairs into per-token log-probs under a model.

Layout used everywhere in RL: a row is its prompt immediately followed by its
response, right-padded (so with causal attention no real token ever sees
padding, and positions match the KV-cached generation exactly). Response token
j of row i sits at position p_i + j (p_i = prompt length); the logits that
predict it come from position p_i + j - 1. Only the response positions are
projected to the vocabulary, and only the gathered per-token log-probs are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor

from ..errors import InputError
from ..ops import entropy_from_logits, log_probs_of


@dataclass
class Rollout:
    """A batch of sampled responses and everything learning needs about them.

    prompts (b, n) right-padded prompt ids; prompt_lengths (b,);
    responses (b, T) right-padded response ids (a final EOS included); mask (b, T) bool,
    True on real response tokens: computed once at collection and reused by every loss;
    old_log_probs (b, T): log-probs of the responses under the policy that sampled them;
    ref_log_probs (b, T): under the reference policy; scores (b,): the reward source's
    sequence scores; values (b, T) critic values (PPO only); rewards, advantages,
    returns (b, T): filled in by the algorithm. Every (b, T) tensor is 0 on padding.
    """

    prompts: Tensor
    prompt_lengths: Tensor
    responses: Tensor
    mask: Tensor
    old_log_probs: Tensor
    ref_log_probs: Tensor
    scores: Tensor
    values: Tensor | None = None
    rewards: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    stop_reasons: list = field(default_factory=list)

    def __len__(self) -> int:
        return self.responses.shape[0]

    @property
    def lengths(self) -> Tensor:
        return self.mask.long().sum(-1)

    def select(self, index: Tensor) -> "Rollout":
        """Rows `index` (a minibatch), trimmed to the longest selected response."""
        index = torch.as_tensor(index, dtype=torch.long)
        T = max(int(self.lengths[index].max()) if len(index) else 0, 1)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value[index.to(value.device)]
                if value.ndim == 2 and f.name not in ("prompts",):
                    value = value[:, :T]
            elif isinstance(value, list) and value:
                value = [value[i] for i in index.tolist()]
            out[f.name] = value
        return replace(self, **out)

    def to(self, device) -> "Rollout":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})


def concat_rollouts(parts: list[Rollout]) -> Rollout:
    """Stack rollouts collected in chunks (padding (b, T) tensors to the widest chunk with 0)."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for f in fields(Rollout):
        values = [getattr(p, f.name) for p in parts]
        if all(v is None for v in values):
            out[f.name] = None
        elif isinstance(values[0], Tensor):
            if values[0].ndim == 2:
                width = max(v.shape[1] for v in values)
                values = [torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in values]
            out[f.name] = torch.cat(values)
        else:
            out[f.name] = [x for v in values for x in v]
    return Rollout(**out)


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


__all__ = ["Rollout", "concat_rollouts", "PackedSequences", "pack_sequences", "response_log_probs"]
