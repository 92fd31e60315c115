"""Stop strings over token boundaries, chat templates, and a chat session within its context."""

from __future__ import annotations

import pytest
import torch

from palm_rlhf.data.tokenizer import ByteTokenizer
from palm_rlhf.errors import CheckpointError
from palm_rlhf.model import PaLM
from palm_rlhf.serving import ChatTemplate, Engine
from palm_rlhf.serving.chat import ChatSession
from palm_rlhf.serving.text import TextStream

TOK = ByteTokenizer()


def feed(stream: TextStream, text: str) -> list[str]:
    return [stream.push(t) for t in TOK.encode(text)]


def test_stop_string_split_over_tokens_is_held_back_and_cut():
    s = TextStream(TOK, max_tokens=50, stops=("END", "\n\n"))
    deltas = feed(s, "abEN")  # "EN" might start "END": held back
    assert deltas == ["a", "b", "", ""] and not s.finished
    deltas = feed(s, "x E")  # "ENx" is not a stop: released
    assert deltas == ["ENx", " ", ""]
    assert feed(s, "ND") == ["", ""]  # the stop completes: cut before it
    assert s.finish_reason == "stop" and s.text == "abENx " and s.generated == 9


def test_length_eos_and_partial_utf8():
    s = TextStream(TOK, max_tokens=3, stops=("zz",))
    assert feed(s, "abz") == ["a", "b", "z"] and s.finish_reason == "length"  # nothing held at the end
    e = TextStream(TOK, max_tokens=10, eos_id=0)
    snowman = TOK.encode("\u2603")  # 3 bytes: nothing shown until the character is whole
    assert [e.push(t) for t in snowman] == ["", "", "\u2603"]
    assert e.push(0) == "" and e.finish_reason == "stop" and e.generated == 4


def test_template_render_save_load(tmp_path):
    t = ChatTemplate()
    msgs = [{"role": "system", "content": "Be {brief}."}, {"role": "user", "content": "Hi"}]
    assert t.render(msgs) == "System: Be {brief}.\nUser: Hi\nAssistant:"
    custom = ChatTemplate(user="<u>{content}</u>", assistant="<a>{content}</a>", generation_prompt="<a>",
                          stop=("</a>",))
    custom.save(tmp_path)
    assert ChatTemplate.load(tmp_path) == custom
    assert ChatTemplate.load(tmp_path / "nothing-here") == ChatTemplate()
    (tmp_path / "chat_template.json").write_text('{"user": "no placeholder"}')
    with pytest.raises(CheckpointError, match="must contain"):
        ChatTemplate.load(tmp_path)


def test_chat_session_drops_oldest_turns_to_fit():
    torch.manual_seed(0)
    model = PaLM(dim=32, num_tokens=256, depth=1, heads=2, dim_head=16).eval()
    engine = Engine(model, TOK, context=96, max_batch=1, gather_s=0.0).start()
    try:
        session = ChatSession(engine, TOK, ChatTemplate(), system="S", max_tokens=8, temperature=0)
        for i in range(6):
            reply = "".join(session.ask(f"message number {i}"))
            prompt = session._prompt(session.history[:-1])
            assert len(prompt) + 8 <= 96 + len(TOK.encode(reply))  # the prompt left room for the reply
        assert session.dropped > 0 and session.history[0]["content"] != "message number 0"
        assert session.history[-2] == {"role": "user", "content": "message number 5"}
        session.reset()
        assert session.history == []
    finally:
        engine.stop()
