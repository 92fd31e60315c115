"""Preference records -> token batches for reward training, and held-out evaluation.

Which records a step trains on is the one rule every trainer uses (`data.sampling.stream_indices`
at the positions `runtime.vocab.step_positions` gives each process and micro-batch): a pure
function of (seed, step), so resuming needs only the step counter and 2 processes see exactly
what 1 process with the same batch_size sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..data.preferences import PairwiseRecord, PreferenceRecord, RatingRecord
from ..errors import DataError
from ..model.reward import RewardModel, pack_prompt_response
from ..rl.reward_losses import (
    binned_rating_loss,
    bradley_terry_loss,
    pairwise_metrics,
    rating_metrics,
    rating_mse_loss,
)
from ..ops import eval_mode


@dataclass(frozen=True)
class EncodedPairs:
    """Token ids of pairwise records (lists of 1-D long tensors) and margins (N,)."""

    prompts: list[Tensor]
    chosen: list[Tensor]
    rejected: list[Tensor]
    margins: Tensor

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class EncodedRatings:
    prompts: list[Tensor]
    responses: list[Tensor]
    ratings: Tensor

    def __len__(self) -> int:
        return len(self.prompts)


def record_kind(records: Sequence[PreferenceRecord], source: str = "data") -> str:
    """'pairwise' or 'rating'; a file mixing both is an error (one objective per run)."""
    kinds = {"pairwise" if isinstance(r, PairwiseRecord) else "rating" for r in records}
    if len(kinds) != 1:
        raise DataError(f"{source} mixes pairwise and rating records; train on one kind per run "
                        f"(split the file by record type)")
    return kinds.pop()


def encode_records(records: Sequence[PreferenceRecord], tokenizer) -> EncodedPairs | EncodedRatings:
    def ids(text: str) -> Tensor:
        return torch.tensor(tokenizer.encode(text), dtype=torch.long)

    if record_kind(records) == "pairwise":
        return EncodedPairs([ids(r.prompt) for r in records], [ids(r.chosen) for r in records],
                            [ids(r.rejected) for r in records],
                            torch.tensor([float(r.margin) for r in records]))
    return EncodedRatings([ids(r.prompt) for r in records], [ids(r.response) for r in records],
                          torch.tensor([float(r.rating) for r in records]))


def make_batch(data: EncodedPairs | EncodedRatings, indices: Sequence[int], max_len: int) -> dict[str, Tensor]:
    """Pairwise: chosen rows then rejected rows, one (2b, n) batch (one forward pass for both)."""
    if isinstance(data, EncodedPairs):
        prompts = [data.prompts[i] for i in indices]
        responses = [data.chosen[i] for i in indices] + [data.rejected[i] for i in indices]
        x, mask, plens = pack_prompt_response(prompts + prompts, responses, max_len=max_len)
        return {"x": x, "mask": mask, "prompt_lengths": plens, "margins": data.margins[list(indices)]}
    x, mask, plens = pack_prompt_response([data.prompts[i] for i in indices], [data.responses[i] for i in indices],
                                          max_len=max_len)
    return {"x": x, "mask": mask, "prompt_lengths": plens, "ratings": data.ratings[list(indices)]}


def reward_loss(model: RewardModel, batch: dict[str, Tensor], use_margin: bool = True) -> tuple[Tensor, dict]:
    """The training loss of one batch and its rewards (for logging)."""
    # under bf16/fp16 autocast the head's output is low precision; the losses are computed in fp32
    out = model.head(batch["x"], mask=batch["mask"], prompt_lengths=batch["prompt_lengths"]).float()
    if "margins" in batch:
        b = batch["margins"].shape[0]
        rc, rr = out[:b], out[b:]  # (b,) each
        loss = bradley_terry_loss(rc, rr, batch["margins"] if use_margin else None)
        return loss, {"chosen": rc.detach(), "rejected": rr.detach()}
    if model.binned_output:
        return binned_rating_loss(out, batch["ratings"]), {"pred": model.expected_rating(out.detach())}
    return rating_mse_loss(out, batch["ratings"]), {"pred": out.detach()}


@torch.no_grad()
def evaluate(model: RewardModel, data: EncodedPairs | EncodedRatings, batch_size: int, max_len: int,
             device) -> dict[str, float]:
    """Pairwise: accuracy + mean margin; ratings: accuracy (rounded prediction == rating) + MAE; plus loss."""
    with eval_mode(model):
        losses, first, second = [], [], []
        for start in range(0, len(data), batch_size):
            idx = list(range(start, min(start + batch_size, len(data))))
            batch = {k: v.to(device) for k, v in make_batch(data, idx, max_len).items()}
            loss, out = reward_loss(model, batch)
            losses.append(loss.float() * len(idx))
            if isinstance(data, EncodedPairs):
                first.append(out["chosen"])
                second.append(out["rejected"])
            else:
                first.append(out["pred"])
                second.append(batch["ratings"])
        metrics = (pairwise_metrics if isinstance(data, EncodedPairs) else rating_metrics)(
            torch.cat(first), torch.cat(second))
        metrics["loss"] = (torch.stack(losses).sum() / len(data)).item()
        return metrics


__all__ = ["EncodedPairs", "EncodedRatings", "record_kind", "encode_records", "make_batch", "reward_loss",
           "evaluate"]
