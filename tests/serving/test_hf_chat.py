"""Serving and `palm-rlhf chat` on a model directory holding a Hugging Face tokenizer and Jinja chat
template (a PaLM with the tokenizer's vocabulary saved beside tokenizer.json): the prompt ids are
transformers' apply_chat_template ids, and generation stops at every generation_config.json EOS id."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.hf_tokenizers import chatml, reference

from palm_rlhf.data.chat import JinjaChatTemplate, prompt_ids  # noqa: E402
from palm_rlhf.data.hf_tokenizer import HFTokenizer  # noqa: E402
from palm_rlhf.data.tokenizer import load_tokenizer  # noqa: E402
from palm_rlhf.generation import SamplingConfig, generate  # noqa: E402
from palm_rlhf.model import PaLM  # noqa: E402
from palm_rlhf.serving import Engine, load_for_inference  # noqa: E402
from palm_rlhf.serving.chat import ChatSession  # noqa: E402

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
CHAT = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = chatml(tmp_path_factory.mktemp("hf") / "model")
    torch.manual_seed(0)
    PaLM(dim=32, num_tokens=load_tokenizer(directory).vocab_size, depth=2, heads=2,
         dim_head=16).save_pretrained(directory)
    return directory


def greedy(model, ids, n):
    out = generate(model, [torch.tensor(ids)], SamplingConfig(max_new_tokens=n, temperature=0))
    return out.sequences()[0]


def test_loading_picks_the_hf_tokenizer_and_its_template(hf_dir):
    loaded = load_for_inference(hf_dir)
    assert isinstance(loaded.tokenizer, HFTokenizer) and isinstance(loaded.template, JinjaChatTemplate)
    want = reference(hf_dir).apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert prompt_ids(loaded.template, loaded.tokenizer, CHAT) == want


def test_generation_stops_at_every_eos_id(hf_dir, tmp_path):
    """The greedy reply's third token, named an EOS in generation_config.json, ends the reply there."""
    loaded = load_for_inference(hf_dir)
    ids = prompt_ids(loaded.template, loaded.tokenizer, CHAT)
    free = greedy(loaded.model, ids, 6)
    assert len(free) == 6 and loaded.tokenizer.eos_id not in free  # the model never says <|im_end|> here
    stop = free[2]
    assert stop not in free[:2]
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [loaded.tokenizer.eos_id, stop]}))
    try:
        tok = load_tokenizer(hf_dir)
        assert tok.eos_ids == (loaded.tokenizer.eos_id, stop)
        out = generate(loaded.model, [torch.tensor(ids)],
                       SamplingConfig(max_new_tokens=6, temperature=0, eos_token=list(tok.eos_ids)))
        assert out.sequences()[0] == free[:3] and out.stop_reasons == ["eos"]
        # the server's engine, through /v1/chat/completions
        from fastapi.testclient import TestClient

        from palm_rlhf.serving.app import create_app

        engine = Engine(loaded.model, tok, context=128, max_batch=2, gather_s=0.0).start()
        try:
            with TestClient(create_app(engine, tok, model_name="m", template=loaded.template)) as client:
                body = {"model": "m", "messages": CHAT, "max_tokens": 6, "temperature": 0}
                reply = client.post("/v1/chat/completions", json=body).json()
                assert reply["choices"][0]["finish_reason"] == "stop"
                assert reply["choices"][0]["message"]["content"] == tok.decode(free[:2])
                assert reply["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 3,
                                          "total_tokens": len(ids) + 3}
                body["messages"] = [{"role": "assistant", "content": "Hi"}]
                refused = client.post("/v1/chat/completions", json=body)
                assert refused.status_code == 400
                assert "Conversations must start with a system or user message" in refused.json()["error"]["message"]
        finally:
            engine.stop()
        # the chat session: the same prompt ids, the same reply
        engine = Engine(loaded.model, tok, context=128, max_batch=1, gather_s=0.0).start()
        try:
            session = ChatSession(engine, tok, loaded.template, system="Be kind.", max_tokens=6, temperature=0)
            assert "".join(session.ask("Hello there")) == tok.decode(free[:2])
            assert session._prompt(session.history[:1]) == ids
        finally:
            engine.stop()
    finally:
        (hf_dir / "generation_config.json").unlink()


def test_chat_cli_on_a_jinja_template(hf_dir):
    done = subprocess.run([sys.executable, "-m", "palm_rlhf", "chat", str(hf_dir), "--threads", "1",
                           "--temperature", "0", "--max-tokens", "4", "--system", "Be kind."],
                          input="Hello there\n", capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = load_for_inference(hf_dir)
    free = greedy(loaded.model, prompt_ids(loaded.template, loaded.tokenizer, CHAT), 4)
    assert done.stdout == loaded.tokenizer.decode(free).strip() + "\n"
