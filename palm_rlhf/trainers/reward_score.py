"""Score a JSONL file with a trained reward model (`palm-rlhf reward score`).

Input lines are JSON objects with a string ``prompt`` and either a string ``response``
(a rating record, the rating optional) or strings ``chosen`` and ``rejected`` (a pairwise
record). Each output line is the input object plus ``reward`` (or ``chosen_reward`` and
``rejected_reward``); other fields pass through untouched, so the file keeps its provenance.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.jsonl import iter_jsonl
from ..data.preferences import PairwiseRecord
from ..data.tokenizer import encode_continuation
from ..errors import DataError
from ..files import atomic_write_bytes
from ..model.reward import RewardModel
from ..rl.reward_losses import pairwise_metrics


def read_score_requests(path) -> list[dict]:
    """Read the lines to score, strictly: DataError with file, line and field."""
    path = Path(path)
    rows = []
    for where, obj in iter_jsonl(path, missing="file not found; pass a JSONL file of prompt/response records"):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        fields = ("prompt", "chosen", "rejected") if ("chosen" in obj or "rejected" in obj) else ("prompt", "response")
        for name in fields:
            if not isinstance(obj.get(name), str):
                problem = "missing" if name not in obj else f"not a string ({type(obj[name]).__name__})"
                raise DataError(f"{where}: field '{name}' is {problem}")
        rows.append(obj)
    if not rows:
        raise DataError(f"{path}: no records to score; the file is empty")
    return rows


def score_file(model: RewardModel, tokenizer, data, out, batch_size: int = 32, max_len: int | None = None) -> dict:
    """Score every line of `data`, write `out` atomically, return a summary
    ({"records": n} plus pairwise accuracy and mean margin when the file is pairwise)."""
    rows = read_score_requests(data)
    def ids(text: str, prompt: bool = True) -> torch.Tensor:  # a response continues its prompt: no BOS
        return torch.tensor(tokenizer.encode(text) if prompt else encode_continuation(tokenizer, text),
                            dtype=torch.long)

    prompts, responses, slots = [], [], []  # slots: (row index, output key)
    for i, row in enumerate(rows):
        keys = ("chosen", "rejected") if "chosen" in row else ("response",)
        for key in keys:
            prompts.append(ids(row["prompt"]))
            responses.append(ids(row[key], False))
            slots.append((i, "reward" if key == "response" else f"{key}_reward"))
    rewards = model.score(prompts, responses, batch_size=batch_size, max_len=max_len).tolist()
    for (i, key), value in zip(slots, rewards):
        rows[i][key] = value
    atomic_write_bytes(Path(out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))

    summary: dict = {"records": len(rows)}
    pairs = [r for r in rows if "chosen_reward" in r]
    if pairs:
        summary.update(pairwise_metrics(torch.tensor([r["chosen_reward"] for r in pairs]),
                                        torch.tensor([r["rejected_reward"] for r in pairs])))
        summary["pairs"] = len(pairs)
    return summary


def score_records(model: RewardModel, tokenizer, records: list[PairwiseRecord], batch_size: int = 32,
                  max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_rewards, rejected_rewards) for pairwise records, each (N,)."""
    def ids(text: str, prompt: bool = True) -> torch.Tensor:  # a response continues its prompt: no BOS
        return torch.tensor(tokenizer.encode(text) if prompt else encode_continuation(tokenizer, text),
                            dtype=torch.long)

    prompts = [ids(r.prompt) for r in records]
    responses = [ids(r.chosen, False) for r in records] + [ids(r.rejected, False) for r in records]
    rewards = model.score(prompts + prompts, responses, batch_size=batch_size, max_len=max_len)
    return rewards[: len(records)], rewards[len(records):]


__all__ = ["read_score_requests", "score_file", "score_records"]
