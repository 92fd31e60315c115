"""Collecting rollouts: batched KV-cached sampling, scoring, and the per-token
log-probs learning needs (policy, reference, values), all computed once.

The policy that learning optimises is softmax(logits / temperature) of the actor,
with no top-k/top-p/min-p/repetition filter. When the sampling config has none of
those filters, the generation engine's log-probs *are* that policy's log-probs and
are stored as the rollout's old log-probs. With a filter active, sampling is
off-policy for that distribution, so old log-probs are recomputed under it with
one forward pass (the ratio then starts at exactly 1, and the filtered sampler acts
as a behaviour policy, as in TRL).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..generation import SamplingConfig, generate
from ..generation.scoring import PackedSequences, Scorer, pack_sequences
from .rewards import RewardSource
from .rollout import Rollout


def sampling_is_plain(config: SamplingConfig) -> bool:
    """True when sampling draws from softmax(logits / temperature) with no filter."""
    return (config.temperature > 0 and config.top_k == 0 and config.top_p >= 1.0 and config.min_p == 0.0
            and config.repetition_penalty == 1.0)


def policy_temperature(config: SamplingConfig) -> float:
    return config.temperature if config.temperature > 0 else 1.0


def strip_eos(tokens: Tensor, reason: str) -> Tensor:
    """The completion's content: its tokens without the final EOS."""
    return tokens[:-1] if reason == "eos" and tokens.numel() else tokens


def right_pad(prompts: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """List of 1-D prompts -> (b, n) right-padded with 0, lengths (b,)."""
    lengths = torch.tensor([p.numel() for p in prompts], dtype=torch.long)
    out = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
    for i, p in enumerate(prompts):
        out[i, : p.numel()] = p
    return out, lengths


@torch.no_grad()
def collect_rollout(scorer: Scorer, prompts: Sequence[Tensor], sampling: SamplingConfig, reward: RewardSource, *,
                    generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Rollout:
    """Sample one response per prompt (repeat prompts for groups) from `scorer`'s policy and fill a
    `Rollout`.

    Scores come from `reward`; old and reference log-probs and (with a critic, PPO) values from
    `scorer` (its temperature is the policy's: `policy_temperature(sampling)`). Nothing
    vocabulary-sized is kept.
    """
    model = scorer.model
    device = model.token_emb.weight.device
    prompts = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
    out = generate(model, prompts, sampling, finetune_scope=scorer.scope, generator=generator)
    # generate() returns ordinary tensors (cloned outside inference mode): usable in autograd graphs
    tokens, mask, gen_log_probs = out.tokens, out.mask, out.log_probs
    prompt_ids, prompt_lengths = right_pad(prompts)
    prompt_ids, prompt_lengths = prompt_ids.to(device), prompt_lengths.to(device)
    assert mask.shape[1] > 0, "generation always produces at least one token"
    packed = pack_sequences(prompt_ids, prompt_lengths, tokens, mask)
    old_log_probs, ref_log_probs, values = scorer.rollout(packed, gen_log_probs if sampling_is_plain(sampling)
                                                          else None)
    completions = [strip_eos(row[:n].cpu(), r) for row, n, r in
                   zip(tokens, out.lengths.tolist(), out.stop_reasons)]
    scores = reward([p.cpu() for p in prompts], completions, out.stop_reasons).to(device)
    return Rollout(prompts=prompt_ids, prompt_lengths=prompt_lengths, responses=tokens, mask=mask,
                   old_log_probs=old_log_probs.float(), ref_log_probs=ref_log_probs.float(), scores=scores,
                   values=values, stop_reasons=list(out.stop_reasons))


def rollout_packed(rollout: Rollout) -> PackedSequences:
    """The model inputs of a rollout (or a minibatch of one)."""
    return pack_sequences(rollout.prompts, rollout.prompt_lengths, rollout.responses, rollout.mask)


__all__ = ["collect_rollout", "rollout_packed", "sampling_is_plain", "policy_temperature", "strip_eos", "right_pad"]
