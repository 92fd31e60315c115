"""Supervised finetuning data: JSONL lines `{"prompt": str, "response": str}`.

Each example is `prompt tokens + response tokens + EOS`; the loss covers the response tokens
and the EOS (the model learns to stop), never the prompt. Batches are right-padded to their
longest row with `pad_id` and carry an explicit loss mask, so padding never needs a reserved
token or an ignore_index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError
from .jsonl import iter_jsonl

log = logging.getLogger(__name__)

__all__ = ["SFTRecord", "read_sft", "encode_sft", "sft_batch"]


@dataclass(frozen=True)
class SFTRecord:
    prompt: str
    response: str


def read_sft(path) -> list[SFTRecord]:
    """Parse a JSONL file; any malformed line raises DataError naming the line and the field."""
    path = Path(path)
    records = []
    for where, obj in iter_jsonl(
            path, missing="no such SFT data file; pass JSONL lines of {\"prompt\": ..., \"response\": ...}"):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with \"prompt\" and \"response\"")
        for name in ("prompt", "response"):
            if name not in obj:
                raise DataError(f"{where}: missing field {name!r}")
            if not isinstance(obj[name], str):
                raise DataError(f"{where}: field {name!r} must be a string, got {type(obj[name]).__name__}")
        if not obj["response"]:
            raise DataError(f"{where}: field 'response' is empty; there is nothing to learn from this line")
        records.append(SFTRecord(obj["prompt"], obj["response"]))
    if not records:
        raise DataError(f"{path}: no records; the file is empty")
    return records


def encode_sft(records: list[SFTRecord], tokenizer, max_len: int) -> list[tuple[list[int], int]]:
    """(ids, n_prompt) per record: ids = prompt + response + EOS, at most max_len + 1 tokens.

    Too-long examples keep the end of the prompt (at most half of max_len when the response
    needs the room) and the start of the response, so every example trains on >= 1 token.
    """
    out, truncated = [], 0
    budget = max_len + 1
    for r in records:
        p = tokenizer.encode(r.prompt)
        resp = tokenizer.encode(r.response) + [tokenizer.eos_id]
        if len(p) + len(resp) > budget:
            truncated += 1
            keep_p = min(len(p), max(budget - len(resp), budget // 2))
            p = p[len(p) - keep_p:]
            resp = resp[: budget - len(p)]
        out.append((p + resp, len(p)))
    if truncated:
        log.warning("%d of %d SFT examples were longer than seq_len + 1 = %d tokens and were truncated",
                    truncated, len(records), budget)
    return out


def sft_batch(examples: list[tuple[list[int], int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens (b, n + 1) and the loss mask (b, n) over targets tokens[:, 1:].

    Target j (= tokens[:, j + 1]) counts when it is a response/EOS token: j + 1 >= n_prompt.
    """
    width = max(len(ids) for ids, _ in examples)
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), width - 1, dtype=torch.bool)
    for row, (ids, n_prompt) in enumerate(examples):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        # targets at positions n_prompt .. len(ids) - 1 are the response + EOS
        mask[row, max(n_prompt, 1) - 1: len(ids) - 1] = True
    return tokens, mask
