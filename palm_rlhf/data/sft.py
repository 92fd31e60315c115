"""Supervised finetuning data: JSONL lines of one of two kinds (they may be mixed).

    {"prompt": str, "response": str}
    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}

A prompt/response example is `prompt tokens + response tokens + EOS` (the prompt as the tokenizer
encodes a text, BOS included for a tokenizer that adds one); the loss covers the response tokens
and the EOS (the model learns to stop), never the prompt.

A chat example is the conversation rendered with the model's chat template (`data.chat`: the
checkpoint's Jinja template, else ours) and trains on the assistant turns only: exactly the
tokens of each assistant message as the template renders it, its end-of-turn token included
(with our plain template, which has none, an EOS after each assistant turn). System and user
turns, and the template's headers, are context.

Batches are right-padded to their longest row with `pad_id` and carry an explicit loss mask, so
padding never needs a reserved token or an ignore_index.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError
from .chat import ChatTemplate, check_messages, encode_conversation, prompt_ids
from .jsonl import iter_jsonl
from .tokenizer import encode_continuation

log = logging.getLogger(__name__)

__all__ = ["SFTRecord", "ChatRecord", "read_sft", "encode_sft", "sft_batch", "sample_prompt"]


@dataclass(frozen=True)
class SFTRecord:
    prompt: str
    response: str


@dataclass(frozen=True)
class ChatRecord:
    """A conversation: a tuple of {"role", "content"} dicts with at least one assistant message."""
    messages: tuple

    def __hash__(self):  # the messages are dicts: hash their JSON
        return hash(json.dumps(self.messages, sort_keys=True))


def read_sft(path) -> list[SFTRecord]:
    """Parse a JSONL file; any malformed line raises DataError naming the line and the field."""
    path = Path(path)
    records = []
    for where, obj in iter_jsonl(
            path, missing="no such SFT data file; pass JSONL lines of {\"prompt\": ..., \"response\": ...}"):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with \"prompt\" and \"response\" (or \"messages\")")
        if "messages" in obj:
            messages = check_messages(obj["messages"], f"{where}: messages")
            if not any(m["role"] == "assistant" for m in messages):
                raise DataError(f"{where}: messages has no assistant message; there is nothing to learn from this line")
            records.append(ChatRecord(tuple(messages)))
            continue
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


def encode_sft(records: list, tokenizer, max_len: int, template=None) -> list[tuple[list[int], object]]:
    """Per record, at most max_len + 1 tokens: (ids, n_prompt) for a prompt/response record, ids =
    prompt + response + EOS; (ids, trained) for a chat record, `trained[i]` saying whether ids[i] is
    a target the loss covers. `template`: the chat template (None: the plain default).

    Too-long prompt/response examples keep the end of the prompt (at most half of max_len when the
    response needs the room) and the start of the response, so every example trains on >= 1 token.
    Too-long chats keep their start; one left with no assistant token is dropped with a warning.
    """
    out, truncated, dropped = [], 0, 0
    budget = max_len + 1
    template = template if template is not None else ChatTemplate()
    for r in records:
        if isinstance(r, ChatRecord):
            ids, trained = encode_conversation(template, tokenizer, list(r.messages))
            if len(ids) > budget:
                truncated += 1
                ids, trained = ids[:budget], trained[:budget]
            if not any(trained[1:]):
                dropped += 1
                continue
            out.append((ids, trained))
            continue
        p = tokenizer.encode(r.prompt)
        resp = encode_continuation(tokenizer, r.response) + [tokenizer.eos_id]
        if len(p) + len(resp) > budget:
            truncated += 1
            keep_p = min(len(p), max(budget - len(resp), budget // 2))
            p = p[len(p) - keep_p:]
            resp = resp[: budget - len(p)]
        out.append((p + resp, len(p)))
    if truncated:
        log.warning("%d of %d SFT examples were longer than seq_len + 1 = %d tokens and were truncated",
                    truncated, len(records), budget)
    if dropped:
        log.warning("%d of %d chat examples had no assistant token within seq_len + 1 = %d tokens and were "
                    "dropped; raise seq_len to keep them", dropped, len(records), budget)
        if not out:
            raise DataError(f"no SFT example has an assistant token within seq_len + 1 = {budget} tokens; "
                            f"raise seq_len")
    return out


def sample_prompt(record, tokenizer, template=None) -> tuple[list[int], str]:
    """(ids, text shown) of the prompt of a record, for a sample during training: a chat record's
    messages up to its first assistant turn, rendered with the generation prompt."""
    if isinstance(record, ChatRecord):
        first = next(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
        head = list(record.messages[:first])
        return prompt_ids(template or ChatTemplate(), tokenizer, head), head[-1]["content"]
    return tokenizer.encode(record.prompt), record.prompt


def sft_batch(examples: list[tuple[list[int], object]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens (b, n + 1) and the loss mask (b, n) over targets tokens[:, 1:].

    Target j (= tokens[:, j + 1]) counts when it is a response/EOS token: j + 1 >= n_prompt, or,
    for a chat example (ids, trained), when trained[j + 1].
    """
    width = max(len(ids) for ids, _ in examples)
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), width - 1, dtype=torch.bool)
    for row, (ids, n_prompt) in enumerate(examples):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        if not isinstance(n_prompt, int):  # a chat example: the per-token trained flags
            mask[row, : len(ids) - 1] = torch.tensor(list(n_prompt[1:]), dtype=torch.bool)
            continue
        # targets at positions n_prompt .. len(ids) - 1 are the response + EOS
        mask[row, max(n_prompt, 1) - 1: len(ids) - 1] = True
    return tokens, mask
