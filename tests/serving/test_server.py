"""`palm-rlhf serve` as a subprocess, driven by the official `openai` client (and httpx for raw HTTP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")


ROOT = Path(__file__).resolve().parents[2]
KEY = "test-key-0123456789"


def start(model_dir: Path, *extra: str):
    """Start `palm-rlhf serve` on a free loopback port; returns (base url, process)."""
    args = [sys.executable, "-m", "palm_rlhf", "serve", str(model_dir), "--port", "0", "--threads", "1", *extra]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("serving "):
            url = line.split(" on ")[1].split()[0]
            threading.Thread(target=lambda: [lines.append(l) for l in proc.stdout], daemon=True).start()
            return url, proc, lines
    proc.wait()
    raise RuntimeError("palm-rlhf serve did not start:\n" + "".join(lines))


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(model_dir):
    url, proc, lines = start(model_dir, "--api-key", KEY, "--max-batch", "8", "--context", "256",
                             "--max-body-bytes", "4096")
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=60)


def complete(client, prompt="The meaning of", **kw):
    kw.setdefault("max_tokens", 12)
    return client.completions.create(model="tiny", prompt=prompt, **kw)


def test_completion_usage_and_reproducible_seeds(client):
    a = complete(client, seed=7)
    assert a.object == "text_completion" and a.choices[0].finish_reason == "length"
    assert a.usage.prompt_tokens == len("The meaning of".encode()) and a.usage.completion_tokens == 12
    assert complete(client, seed=7).choices[0].text == a.choices[0].text
    assert complete(client, seed=8).choices[0].text != a.choices[0].text
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_n_choices_and_logprobs(client):
    many = complete(client, n=3, seed=3, logprobs=2)
    assert [c.index for c in many.choices] == [0, 1, 2] and many.usage.completion_tokens == 36
    assert len({c.text for c in many.choices}) == 3
    # choice i of seed s is choice 0 of seed s + i
    assert complete(client, seed=5).choices[0].text == many.choices[2].text
    lp = many.choices[0].logprobs
    assert len(lp.tokens) == 12 and len(lp.token_logprobs) == 12 and all(len(t) <= 2 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)


def test_stop_sequence_cuts_the_text(client):
    full = complete(client, seed=11, max_tokens=30).choices[0].text
    stop_char = next(c for c in full[3:] if c.isprintable() and c != "\ufffd")
    cut = complete(client, seed=11, max_tokens=30, stop=[stop_char])
    assert cut.choices[0].text == full[: full.index(stop_char)]
    assert cut.choices[0].finish_reason == "stop"


def test_streaming_equals_the_plain_reply(client):
    plain = complete(client, seed=4, max_tokens=20, n=2)
    chunks = list(complete(client, seed=4, max_tokens=20, n=2, stream=True, stream_options={"include_usage": True}))
    texts = ["", ""]
    reasons = [None, None]
    for chunk in chunks[:-1]:
        for c in chunk.choices:
            texts[c.index] += c.text
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert texts == [c.text for c in plain.choices] and reasons == ["length", "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40


def test_chat_plain_and_streamed(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, seed=2)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    prompt = "System: Be brief.\nUser: Hello!\nAssistant:"  # the documented default template
    assert reply.usage.prompt_tokens == len(prompt.encode())
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, seed=2, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == reply.choices[0].message.content


def test_error_codes(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, max_tokens=300)  # context 256
    assert e.value.status_code == 400 and e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        complete(client, temperature=-0.5)
    with pytest.raises(openai.BadRequestError, match="seed"):
        complete(client, seed=2**70)
    with pytest.raises(openai.BadRequestError, match="n: 9 must be <= 8"):
        complete(client, n=9)
    assert complete(client, extra_body={"some_future_field": 1}, seed=1).choices  # unknown fields ignored
    wrong = openai.OpenAI(base_url=server, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        complete(wrong)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    big = httpx.post(server + "/completions", headers={"authorization": f"Bearer {KEY}"},
                     content=json.dumps({"prompt": "x" * 5000}))
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    bad = httpx.post(server + "/completions", headers={"authorization": f"Bearer {KEY}"}, content=b"{not json")
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(server.removesuffix("/v1") + "/health").json()["status"] == "ok"  # no key needed


def test_16_concurrent_seeded_requests_match_one_at_a_time(client):
    requests = [dict(prompt="x" * (1 + 3 * i), max_tokens=4 + 2 * i, seed=100 + i, temperature=0.5 + i / 16,
                     top_p=(1.0, 0.8)[i % 2]) for i in range(16)]
    alone = [complete(client, **r).choices[0].text for r in requests]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda r: complete(client, **r).choices[0].text, requests))
    assert together == alone


def test_disconnect_mid_stream_frees_the_row(server, client):
    health = server.removesuffix("/v1") + "/health"
    steps_before = httpx.get(health).json()["decode_steps"]
    body = {"prompt": "Once", "max_tokens": 240, "stream": True, "seed": 0}
    with httpx.stream("POST", server + "/completions", json=body, headers={"authorization": f"Bearer {KEY}"},
                      timeout=30) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    # the client is gone; another client is served, and the abandoned row stops decoding
    assert complete(client, seed=1, max_tokens=5).choices[0].finish_reason == "length"
    for _ in range(100):
        state = httpx.get(health).json()
        if state["active_rows"] == 0:
            break
        threading.Event().wait(0.05)
    assert state["active_rows"] == 0
    assert state["decode_steps"] - steps_before < 240


def test_queue_full_gives_503(model_dir):
    url, proc, _ = start(model_dir, "--max-batch", "1", "--max-queue", "1", "--context", "1024")
    try:
        c = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(complete, c, max_tokens=500, seed=i) for i in range(4)]
            outcomes = []
            for f in futures:
                try:
                    outcomes.append(f.result().choices[0].finish_reason)
                except openai.APIStatusError as e:
                    outcomes.append((e.status_code, e.body["code"]))
        assert (503, "queue_full") in outcomes and any(o in ("stop", "length") for o in outcomes)
    finally:
        stop(proc)


def test_non_loopback_host_without_key_warns(model_dir):
    url, proc, lines = start(model_dir, "--host", "0.0.0.0")
    stop(proc)
    assert any("without --api-key" in line for line in lines)


def test_workers_give_the_same_texts_as_one_engine(model_dir, client):
    """`--workers 2`: two engine processes behind one API; seeded requests sent together are
    spread over both and give the texts the one-engine server gives."""
    requests = [dict(prompt="y" * (1 + 2 * i), max_tokens=3 + i, seed=300 + i, temperature=0.9) for i in range(8)]
    one_engine = [complete(client, **r).choices[0].text for r in requests]
    url, proc, _ = start(model_dir, "--workers", "2", "--max-batch", "8", "--context", "256")
    try:
        c = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(lambda r: complete(c, **r).choices[0].text, requests)) == one_engine
        health = httpx.get(url.removesuffix("/v1") + "/health").json()
        assert health["active_rows"] == 0 and health["decode_steps"] > 0
    finally:
        stop(proc)
    assert proc.returncode is not None


def test_workers_must_be_positive(model_dir):
    out = subprocess.run([sys.executable, "-m", "palm_rlhf", "serve", str(model_dir), "--workers", "0"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "--workers must be at least 1, got 0" in out.stderr


def test_workers_stop_when_the_port_is_taken(model_dir):
    """The engine processes have loaded when the port turns out to be taken: the command still
    ends at once with one error line (the replicas are stopped, not left behind), and what the
    processes logged about the model appears once."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "palm_rlhf", "serve", str(model_dir), "--workers", "2",
                              "--port", str(port)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and lines[-1].startswith("error: cannot listen") and str(port) in lines[-1]
    assert "Traceback" not in out.stderr
    # the model's warnings once, from the first replica, not once per process
    assert sum("has no tokenizer_config.json" in line for line in lines) == 1
