"""Chat templates: how a list of messages becomes the text (and the token ids) a model continues.

Two kinds, one interface (`render`, `stop`, `add_special_tokens`, `eos_after_reply`):

- `JinjaChatTemplate`: a Hugging Face checkpoint's Jinja template (`chat_template.jinja`, or
  `chat_template` in its tokenizer_config.json), rendered in a sandboxed jinja2 environment with
  the helpers transformers gives templates (`raise_exception`, `strftime_now`, `tojson`,
  `namespace`, `{% generation %}`). The rendered text is tokenized without adding special tokens
  (the template writes BOS itself), so `prompt_ids` gives exactly the ids of transformers'
  `apply_chat_template(messages, add_generation_prompt=True)`.
- `ChatTemplate`: our own plain format for models trained here. A model directory may hold
  `chat_template.json`; without one the default is used:

    {"system": "System: {content}\\n",
     "user": "User: {content}\\n",
     "assistant": "Assistant: {content}\\n",
     "generation_prompt": "Assistant:",
     "stop": ["\\nUser:", "\\nSystem:"]}

  Each role's entry wraps one message (`{content}` is replaced literally, so braces in a message
  are safe); `generation_prompt` is appended to ask for the assistant's turn; `stop` strings end
  the reply (the EOS token always does). Its text is tokenized like any prompt (with BOS, for a
  tokenizer that adds one), and in training each assistant turn is followed by EOS (the model
  learns to stop; the format itself has no end-of-turn token).

`template_for(tokenizer, model_dir)` picks: the tokenizer's Jinja template, else the model
directory's chat_template.json, else the default. Token-level helpers:

    prompt_ids(template, tokenizer, messages)              # a generation prompt
    encode_conversation(template, tokenizer, messages)     # (ids, trained) for SFT: assistant turns only
    encode_reply(template, tokenizer, prompt, reply)       # (prompt ids, reply ids) for DPO pairs
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

from ..errors import CheckpointError, DataError
from .tokenizer import encode_continuation

__all__ = ["ChatTemplate", "JinjaChatTemplate", "template_for", "prompt_ids", "encode_conversation",
           "encode_reply", "check_messages", "TEMPLATE_FILE", "ROLES"]

TEMPLATE_FILE = "chat_template.json"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    system: str = "System: {content}\n"
    user: str = "User: {content}\n"
    assistant: str = "Assistant: {content}\n"
    generation_prompt: str = "Assistant:"
    stop: tuple[str, ...] = field(default=("\nUser:", "\nSystem:"))
    add_special_tokens: ClassVar[bool] = True   # its text is a plain prompt: the tokenizer adds BOS if it does
    eos_after_reply: ClassVar[bool] = True      # training appends EOS to each assistant turn

    def render_message(self, role: str, content: str) -> str:
        if role not in ROLES:
            raise DataError(f"role {role!r}: the plain chat template knows {', '.join(ROLES)}")
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


# ---------------------------------------------------------------------- Jinja templates


@lru_cache(maxsize=8)
def _compile(source: str):
    """A template compiled in jinja2's immutable sandbox with transformers' helpers (not imported)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; templates expect plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class Namespace(jinja2.utils.Namespace):
        # underscore names are refused: no reaching CPython internals through a namespace
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    class TemplateDict:
        # dict() for templates, with no function attributes to reach through
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace,
                       dict=TemplateDict())
    return env.from_string(source)


class JinjaChatTemplate:
    """A Hugging Face chat template; `where` names its file in error messages."""

    stop: tuple[str, ...] = ()      # the tokenizer's stop ids end a reply
    add_special_tokens = False      # the template writes BOS itself
    eos_after_reply = False         # its end-of-turn token is part of each rendered assistant turn

    def __init__(self, source: str, special_tokens: dict | None = None, where: str = "the chat template"):
        import jinja2

        self.source, self.where = source, where
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _compile(source)
        except jinja2.TemplateSyntaxError as e:
            raise DataError(f"{where}: the chat template does not parse (line {e.lineno}: {e.message}); fix it "
                            f"there, or delete it to use the plain template") from e

    def render(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        import jinja2

        plain = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        try:
            return self._template.render(messages=plain, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **kwargs})
        except jinja2.TemplateError as e:  # raise_exception(...) and errors inside the template
            raise DataError(f"{self.where}: {e.message or type(e).__name__}") from e
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:  # e.g. str + None in a template
            raise DataError(f"{self.where} failed on these messages: {type(e).__name__}: {e}") from e

    def __eq__(self, other):
        return isinstance(other, JinjaChatTemplate) and (self.source, self.special_tokens) == \
            (other.source, other.special_tokens)

    def __repr__(self):
        return f"JinjaChatTemplate({self.where!r})"


def template_for(tokenizer, model_dir=None):
    """The tokenizer's Jinja template, else `model_dir`'s chat_template.json, else the default ChatTemplate."""
    source = getattr(tokenizer, "chat_template", None)
    if source:
        directory = getattr(tokenizer, "directory", None)
        where = f"{directory}'s chat template" if directory is not None else "the chat template"
        return JinjaChatTemplate(source, getattr(tokenizer, "special_tokens", {}), where)
    return ChatTemplate.load(model_dir) if model_dir is not None else ChatTemplate()


# ---------------------------------------------------------------------- messages and token ids


def check_messages(messages, where: str = "messages", *, roles=None) -> list[dict]:
    """A non-empty list of {"role": str, "content": str} objects (other keys kept), else DataError."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}[{i}]: expected {{\"role\": str, \"content\": str}}")
        if roles is not None and m["role"] not in roles:
            raise DataError(f"{where}[{i}]: role {m['role']!r}; expected one of {', '.join(roles)}")
    return messages


def prompt_ids(template, tokenizer, messages) -> list[int]:
    """The ids a model continues to answer `messages` (transformers' apply_chat_template with
    add_generation_prompt=True, for a Jinja template)."""
    return _encode(tokenizer, template.render(messages, add_generation_prompt=True), template.add_special_tokens)


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return tokenizer.encode(text) if add_special_tokens else encode_continuation(tokenizer, text)


def _encode_spans(tokenizer, text: str, spans, add_special_tokens: bool) -> tuple[list[int], list[bool]]:
    """ids of `text` and, per id, whether it lies inside one of the [start, end) character spans.

    The pieces between span edges are tokenized one by one; when their concatenation is not the
    tokenization of the whole text (a token crossing an edge), the whole text is tokenized and
    each token goes with the span its first character is in (tokenizers' offsets).
    """
    edges = sorted({0, len(text), *[p for span in spans for p in span]})
    ids, flags = [], []
    for k, (a, b) in enumerate(zip(edges, edges[1:])):
        piece = _encode(tokenizer, text[a:b], add_special_tokens and k == 0)
        inside = any(s <= a and b <= e for s, e in spans)
        ids += piece
        flags += [inside] * len(piece)
    if not hasattr(tokenizer, "encode_with_offsets"):
        return ids, flags
    whole, offsets = tokenizer.encode_with_offsets(text, add_special_tokens)
    if whole == ids:
        return ids, flags
    return whole, [b > a and any(s <= a < e for s, e in spans) for a, b in offsets]


def _assistant_spans(template, messages, where: str) -> list[tuple[int, int]]:
    """[start, end) in the rendered conversation of each assistant message as the template renders it:
    what rendering it adds after the generation prompt (its content and end-of-turn marker)."""
    full = template.render(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise DataError(f"{where}: the conversation starts with an assistant message; start it with a system "
                            f"or user message")
        before = template.render(messages[:i], add_generation_prompt=True)
        upto = template.render(messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DataError(f"{where}: the chat template renders earlier turns differently once later ones follow "
                            f"(e.g. it drops reasoning from past turns), so assistant turns cannot be located for "
                            f"the loss mask; train on one assistant reply per record (prompt messages + reply)")
        spans.append((len(before), len(upto)))
    if not spans:
        raise DataError(f"{where}: no assistant message; SFT learns the assistant's turns")
    return spans


def encode_conversation(template, tokenizer, messages, where: str = "messages") -> tuple[list[int], list[bool]]:
    """(ids, trained): the whole conversation's ids as the template renders it, and per id whether it
    belongs to an assistant turn (its rendered text including the end-of-turn token, plus EOS for
    our plain template). SFT trains on exactly the ids marked True."""
    messages = check_messages(messages, where)
    spans = _assistant_spans(template, messages, where)
    text = template.render(messages, add_generation_prompt=False)
    ids, trained = _encode_spans(tokenizer, text, spans, template.add_special_tokens)
    if template.eos_after_reply:  # EOS after the last token of each assistant run
        out_ids, out_trained = [], []
        for k, (i, t) in enumerate(zip(ids, trained)):
            out_ids.append(i)
            out_trained.append(t)
            if t and (k + 1 == len(ids) or not trained[k + 1]):
                out_ids.append(tokenizer.eos_id)
                out_trained.append(True)
        ids, trained = out_ids, out_trained
    return ids, trained


def encode_reply(template, tokenizer, prompt, reply, where: str = "record") -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) for a prompt message list and a reply (a string: the assistant's
    content, or a list of messages). The prompt ids are `prompt_ids(...)`; the reply ids are what
    the template adds for the reply (with its end-of-turn token; EOS for our plain template)."""
    prompt = check_messages(list(prompt), f"{where}: prompt")
    if isinstance(reply, str):
        reply = [{"role": "assistant", "content": reply}]
    reply = check_messages(list(reply), f"{where}: reply")
    before = template.render(prompt, add_generation_prompt=True)
    full = template.render(prompt + reply, add_generation_prompt=False)
    if not full.startswith(before):
        raise DataError(f"{where}: the chat template renders the prompt differently once a reply follows; "
                        f"the reply's tokens cannot be separated from the prompt's")
    ids, flags = _encode_spans(tokenizer, full, [(len(before), len(full))], template.add_special_tokens)
    n_prompt = flags.index(True) if True in flags else len(ids)
    if any(not f for f in flags[n_prompt:]):
        raise DataError(f"{where}: the reply's tokens are not one run after the prompt's")
    reply_ids = ids[n_prompt:] + ([tokenizer.eos_id] if template.eos_after_reply else [])
    return ids[:n_prompt], reply_ids
