"""A chat conversation over the engine, kept within the context window (`palm-rlhf chat`).

    session = ChatSession(engine, loaded.tokenizer, loaded.template, system="Be brief.")
    for piece in session.ask("Hello"):
        print(piece, end="", flush=True)
    session.dropped  # turns removed from the front of the history by the last `ask`

Each turn renders the whole history with the chat template (a checkpoint's Jinja template, or
ours: `data.chat.template_for`); when the prompt plus room for
`max_tokens` of reply would not fit the context, the oldest user/assistant turns are dropped
(the system prompt stays).
"""

from __future__ import annotations

import queue

from ..errors import DataError, InputError
from .engine import Failure, Params
from .template import prompt_ids


class ChatSession:
    def __init__(self, engine, tokenizer, template, *, system: str | None = None, max_tokens: int = 256,
                 temperature: float = 0.8, top_p: float = 0.95, seed: int | None = None):
        self.engine, self.tokenizer, self.template, self.system = engine, tokenizer, template, system
        self.max_tokens, self.temperature, self.top_p, self.seed = max_tokens, temperature, top_p, seed
        self.history: list[dict] = []   # user and assistant messages, oldest first
        self.dropped = 0
        self.request = None

    def reset(self) -> None:
        self.history.clear()

    def _prompt(self, turns: list[dict]) -> list[int]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        try:
            return prompt_ids(self.template, self.tokenizer, head + turns)
        except DataError as e:  # the template refused the conversation (raise_exception)
            raise InputError(str(e)) from None

    def _fit(self, user: dict) -> list[int]:
        """Drop the oldest turns until the prompt leaves room for a reply; returns its token ids."""
        self.dropped = 0
        room = min(self.max_tokens, self.engine.context // 2)
        while True:
            ids = self._prompt(self.history + [user])
            if len(ids) + room <= self.engine.context or not self.history:
                break
            # a turn is a user message and the assistant's reply
            cut = 2 if len(self.history) >= 2 and self.history[1]["role"] == "assistant" else 1
            del self.history[:cut]
            self.dropped += 1
        if len(ids) >= self.engine.context:
            raise InputError(f"this message alone takes {len(ids)} of the {self.engine.context} tokens of context; "
                             f"send a shorter one")
        return ids

    def ask(self, text: str):
        """Yield the reply's text as it is generated; the turn is kept in the history at the end."""
        user = {"role": "user", "content": text}
        ids = self._fit(user)
        params = Params(max_tokens=min(self.max_tokens, self.engine.context - len(ids)),
                        temperature=self.temperature, top_p=self.top_p, stop=self.template.stop,
                        seed=None if self.seed is None else self.seed + len(self.history))
        events: queue.Queue = queue.Queue()
        self.request = self.engine.submit(ids, params, 1, events.put)
        reply = ""
        try:
            while True:
                event = events.get()
                if isinstance(event, Failure):
                    raise InputError(event.message)
                reply += event.text
                if event.text:
                    yield event.text
                if event.finish_reason:
                    break
        finally:
            self.request.cancel()  # no-op when finished; frees the row on Ctrl-C
        self.history += [user, {"role": "assistant", "content": reply.strip()}]
