"""The `Rollout` container: a batch of sampled responses and every tensor learning needs about them.

The model forward that fills its log-probs and values is `palm_rlhf.generation.scoring.Scorer`
(the row layout is described there); the maths in `palm_rlhf.rl` only reads these tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor


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
    sampler_probs: Tensor | None = None  # (b, T, V) the sampler's distribution (GRPO's score centring only)
    prompt_embeddings: Tensor | None = None  # (b, d) mean final embedding of each prompt (FlowRL's log Z(x))
    normalized_scores: Tensor | None = None  # (b,) scores z-scored within each group (FlowRL)
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
                if value.ndim >= 2 and f.name not in ("prompts", "prompt_embeddings"):
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
            if values[0].ndim >= 2:
                width = max(v.shape[1] for v in values)
                tail = (0, 0) * (values[0].ndim - 2)
                values = [torch.nn.functional.pad(v, (*tail, 0, width - v.shape[1])) for v in values]
            out[f.name] = torch.cat(values)
        else:
            out[f.name] = [x for v in values for x in v]
    return Rollout(**out)


__all__ = ["Rollout", "concat_rollouts"]
