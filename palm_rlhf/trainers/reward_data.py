"""Preference records -> token batches for reward training, and held-out evaluation.

Batches are a pure function of (seed, step): sample ``i`` of the endless stream is position
``i mod N`` of epoch ``i // N``'s permutation (``torch.randperm`` seeded with ``seed + epoch``).
So resuming needs only the step counter, and with W processes rank r takes rows r, r + W, ...
of the same global batch, so 2 processes see exactly what 1 process with the same global
batch sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..data.preferences import PairwiseRecord, PreferenceRecord, RatingRecord
from ..data.tokenizer import encode_continuation
from ..errors import DataError
from ..model.reward import RewardModel, pack_prompt_response
from ..rl.reward_losses import (
    binned_rating_loss,
    bradley_terry_loss,
    pairwise_metrics,
    rating_metrics,
    rating_mse_loss,
)


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
    def ids(text: str, prompt: bool = True) -> Tensor:  # a response continues its prompt: no BOS
        return torch.tensor(tokenizer.encode(text) if prompt else encode_continuation(tokenizer, text),
                            dtype=torch.long)

    if record_kind(records) == "pairwise":
        if any(r.is_chat for r in records):
            raise DataError("conversational preference records (message-list prompts) are read by dpo; reward "
                            "training takes text prompt/chosen/rejected records")
        return EncodedPairs([ids(r.prompt) for r in records], [ids(r.chosen, False) for r in records],
                            [ids(r.rejected, False) for r in records],
                            torch.tensor([float(r.margin) for r in records]))
    return EncodedRatings([ids(r.prompt) for r in records], [ids(r.response, False) for r in records],
                          torch.tensor([float(r.rating) for r in records]))


def split_validation(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic shuffle, then the last `fraction` of records (at least 1) are held out."""
    if fraction <= 0:
        return records, []
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(len(records) * fraction)))
    if n_val >= len(records):
        raise DataError(f"{len(records)} record(s) leave nothing to train on after holding out "
                        f"{fraction:.0%} for validation; add records or lower val_fraction")
    return [records[i] for i in order[:-n_val]], [records[i] for i in order[-n_val:]]


def batch_indices(step: int, micro: int, batch_size: int, grad_accum: int, n: int, seed: int,
                  rank: int = 0, world_size: int = 1) -> list[int]:
    """Dataset indices of micro-batch `micro` of optimizer step `step` on `rank`.

    A global step consumes batch_size * grad_accum * world_size samples; each micro-batch is a
    contiguous block of batch_size * world_size of them, split across ranks by stride.
    """
    per_micro = batch_size * world_size
    start = (step * grad_accum + micro) * per_micro
    positions = range(start + rank, start + per_micro, world_size)
    out, cache = [], {}
    for pos in positions:
        epoch, i = divmod(pos, n)
        if epoch not in cache:
            cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out.append(cache[epoch][i])
    return out


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
    was_training = model.training
    model.eval()
    try:
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
    finally:
        model.train(was_training)


__all__ = ["EncodedPairs", "EncodedRatings", "record_kind", "encode_records", "split_validation",
           "batch_indices", "make_batch", "reward_loss", "evaluate"]
