"""OpenAI's request and response shapes: validate a JSON body into engine `Params`, build replies.

Unknown fields are ignored (as OpenAI's API does); a known field with a bad value is an
`ApiError` (HTTP 400, OpenAI's error JSON naming the `param`).
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass

from .engine import Params

MAX_LOGPROBS = 5


class ApiError(Exception):
    """An HTTP error in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


def _number(body: dict, name: str, default, lo=None, hi=None, integer=False, lo_open=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise _bad(name, f"{value!r} is not {'an integer' if integer else 'a number'}")
    if not math.isfinite(value):
        raise _bad(name, f"{value!r} is not a finite number")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise _bad(name, f"{value} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise _bad(name, f"{value} must be <= {hi}")
    return int(value) if integer else float(value)


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise _bad("stop", "must be a string or a list of at most 4 strings")
    return tuple(s for s in stop if s)


@dataclass
class Job:
    """A validated request: prompts (token ids) to run, each with n choices."""
    prompts: list[list[int]]
    params: Params
    n: int
    stream: bool
    include_usage: bool


def parse_sampling(body: dict, prompts: list[list[int]], *, context: int, max_n: int, default_max_tokens,
                   extra_stops=(), logprobs: int | None = None) -> Job:
    """The fields common to completions and chat. `default_max_tokens` may be None: the rest of the context."""
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens, but the prompt has "
                            f"{longest} tokens; shorten it", param="prompt", code="context_length_exceeded")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = context - longest if default_max_tokens is None else min(default_max_tokens, context - longest)
    else:
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, lo=1, integer=True)
        if longest + max_tokens > context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the "
                                f"completion); reduce max_tokens or the prompt", param="max_tokens",
                           code="context_length_exceeded")
    n = _number(body, "n", 1, lo=1, hi=max_n, integer=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63):
        raise _bad("seed", f"{seed!r} is not a 64-bit integer")
    stream_options = body.get("stream_options") or {}
    params = Params(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, lo=0.0, hi=2.0),
        top_p=_number(body, "top_p", 1.0, lo=0.0, hi=1.0, lo_open=True),
        top_k=_number(body, "top_k", 0, lo=0, integer=True),
        stop=_stops(body) + tuple(extra_stops),
        seed=seed,
        logprobs=logprobs,
        stop_at_eos=not body.get("ignore_eos", False),  # vLLM's extension: benchmarks ask for exact lengths
    )
    return Job(prompts, params, n, bool(body.get("stream", False)),
               bool(isinstance(stream_options, dict) and stream_options.get("include_usage")))


def parse_prompts(body: dict, tokenizer) -> list[list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt):
        raise ApiError(400, "prompt: must be a string or a non-empty list of strings", param="prompt",
                       code="invalid_value")
    ids = [tokenizer.encode(p) for p in prompt]
    if any(not p for p in ids):
        raise ApiError(400, "prompt: an empty prompt cannot be continued; give at least one character",
                       param="prompt", code="invalid_value")
    return ids


def parse_logprobs(body: dict) -> int | None:
    value = body.get("logprobs")
    if value is None:
        return None
    return _number(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS, integer=True)


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: must be a non-empty list of {role, content} objects", param="messages",
                       code="invalid_value")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages[{i}]: role must be system, user or assistant", param="messages",
                           code="invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content: must be a string", param="messages", code="invalid_value")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


# ---------------------------------------------------------------------- replies


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprobs_block(entries, offset: int) -> dict:
    """OpenAI's legacy completions logprobs object for (token, logprob, top) entries."""
    tokens, text_offset = [], []
    for token, _, _ in entries:
        text_offset.append(offset)
        tokens.append(token)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [top for _, _, top in entries], "text_offset": text_offset}


def envelope(kind: str, rid: str, model: str, choices: list, **extra) -> dict:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}
