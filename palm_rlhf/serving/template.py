"""Chat templates: how a list of messages becomes the text the model continues.

A model directory may hold `chat_template.json`; without one the plain default is used:

    {"system": "System: {content}\\n",
     "user": "User: {content}\\n",
     "assistant": "Assistant: {content}\\n",
     "generation_prompt": "Assistant:",
     "stop": ["\\nUser:", "\\nSystem:"]}

Each role's entry wraps one message (`{content}` is replaced literally, so braces in a message
are safe); `generation_prompt` is appended to ask for the assistant's turn; `stop` strings end
the reply (the EOS token always does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError

TEMPLATE_FILE = "chat_template.json"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    system: str = "System: {content}\n"
    user: str = "User: {content}\n"
    assistant: str = "Assistant: {content}\n"
    generation_prompt: str = "Assistant:"
    stop: tuple[str, ...] = field(default=("\nUser:", "\nSystem:"))

    def render_message(self, role: str, content: str) -> str:
        return getattr(self, role).replace("{content}", content)

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        """messages: [{"role": ..., "content": ...}, ...] (already validated) -> prompt text."""
        text = "".join(self.render_message(m["role"], m["content"]) for m in messages)
        return text + (self.generation_prompt if add_generation_prompt else "")

    def save(self, directory) -> Path:
        path = Path(directory) / TEMPLATE_FILE
        data = {role: getattr(self, role) for role in ROLES}
        data.update(generation_prompt=self.generation_prompt, stop=list(self.stop))
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory) -> "ChatTemplate":
        """The template saved in a model directory, or the default when there is none."""
        path = Path(directory) / TEMPLATE_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable chat template ({e}); fix the JSON or delete the file "
                                  f"to use the default") from e
        known = set(ROLES) | {"generation_prompt", "stop"}
        if not isinstance(data, dict) or not set(data) <= known:
            raise CheckpointError(f"{path}: a chat template is a JSON object with keys {sorted(known)}")
        for role in ROLES:
            if role in data and "{content}" not in str(data[role]):
                raise CheckpointError(f"{path}: the {role!r} entry must contain {{content}}")
        if "stop" in data:
            data["stop"] = tuple(str(s) for s in data["stop"])
        return cls(**data)
