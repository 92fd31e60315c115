"""Prompt files, read one way everywhere (the feedback app, PPO and GRPO).

    prompts.txt     one prompt per line; `\\n` inside a line is a line break; blank lines are skipped
    prompts.jsonl   one JSON object per line with a string "prompt" field (other fields ignored), or,
                    for PPO and GRPO, a chat prompt: {"messages": [{"role": ..., "content": ...}, ...]}
                    (or "prompt" as such a list), rendered with the model's chat template and its
                    generation prompt (`data.chat.prompt_ids`)
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError
from .chat import check_messages

__all__ = ["read_prompts"]


def read_prompts(path, key: str = "--prompts", messages: bool = False) -> list:
    """The prompts in `path`; DataError naming `key` (the flag or config key that gave it) otherwise.
    `messages=True`: a .jsonl line may be a chat prompt, returned as its list of messages."""
    path = Path(path)
    where = f"{key}{path}" if key.endswith("=") else f"{key} {path}"
    if not str(path) or not path.is_file():
        raise DataError(f"{where}: cannot read (no such file); give a .txt file (one prompt per line) "
                        f"or .jsonl with a \"prompt\" field")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: cannot read ({getattr(e, 'strerror', None) or e})") from e
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from e
            chat = record.get("messages", record.get("prompt")) if isinstance(record, dict) else None
            if isinstance(chat, list):
                if not messages:
                    raise DataError(f"{path}:{number}: a chat prompt (a message list); {key} takes text prompts "
                                    f"here (PPO and GRPO read chat prompts)")
                prompts.append(check_messages(chat, f"{path}:{number}: messages"))
                continue
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise DataError(f'{path}:{number}: expected an object with a string "prompt" field '
                                f'(or "messages": a list of chat messages)')
            prompts.append(record["prompt"])
        else:
            prompts.append(line.replace("\\n", "\n"))
    if not prompts:
        raise DataError(f"{where}: no prompts found (one per line, or JSONL with \"prompt\")")
    return prompts
