"""`feedback serve --generator URL`: pairs sampled by a running `palm-rlhf serve` instead of a
model loaded by the feedback app."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import sys

import httpx
import pytest
import torch
from feedback_testing import ROOT, write_raters
from tests.helpers.processes import launch

from palm_rlhf.cli.main import main
from palm_rlhf.errors import ConfigError
from palm_rlhf.feedback.pairs import ModelPairSource, ServedModel
from palm_rlhf.generation import SamplingConfig
from palm_rlhf.model import PaLM

KEY = "generator-key-0123456789"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    """`palm-rlhf serve` of a tiny random model with an API key; yields its base URL (…/v1)."""
    torch.manual_seed(0)
    model = tmp_path_factory.mktemp("generator") / "tiny"
    PaLM(num_tokens=256, dim=32, depth=1, heads=2, dim_head=16).save_pretrained(model)
    proc, lines = launch([sys.executable, "-m", "palm_rlhf", "serve", str(model), "--port", "0", "--threads", "1",
                          "--api-key", KEY], "serving ", timeout=120, cwd=ROOT, env=ENV)
    try:
        yield re.search(r"http://[\d.]+:\d+/v1", "".join(lines)).group(0)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_a_served_model_samples_n_completions_reproducibly(generator):
    served = ServedModel(generator, api_key=KEY)
    assert served.identity == f"tiny@{generator}"
    assert ServedModel(generator.removesuffix("/v1"), api_key=KEY).url == generator  # /v1 is added
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=0.9)
    first = served.sample("Once upon", 2, sampling, seed=5)
    assert len(first) == 2 and all(isinstance(t, str) for t in first) and first[0] != first[1]
    assert served.sample("Once upon", 2, sampling, seed=5) == first
    draft = ModelPairSource([served], sampling, seed=1).make_pair("Once upon")
    assert draft.checkpoint_a == draft.checkpoint_b == served.identity
    assert ModelPairSource([served], sampling, seed=1).make_pair("Once upon") == draft


def test_generator_errors_say_what_to_do(generator):
    with pytest.raises(ConfigError, match="401 .*pass its key with --generator-api-key"):
        ServedModel(generator, api_key="wrong")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match="cannot reach it .*start `palm-rlhf serve MODEL` there first"):
        ServedModel(f"http://127.0.0.1:{port}/v1")
    served = ServedModel(generator, api_key=KEY)
    with pytest.raises(ConfigError, match="400 .*max_tokens"):
        served.sample("hi", 1, SamplingConfig(max_new_tokens=100_000), seed=0)


def test_feedback_serve_needs_one_or_two_models(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("hi\n")
    assert main(["feedback", "serve", "--prompts", str(tmp_path / "p.txt")]) == 2
    assert "give one or two models to sample from (--checkpoint DIR and/or --generator URL), got 0" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_feedback_serve_with_a_generator_end_to_end(generator, tmp_path):
    (tmp_path / "prompts.txt").write_text("Once upon a time\nThe answer is\n")
    tokens = write_raters(tmp_path / "raters.txt", ["alice"])
    db = tmp_path / "f.sqlite"
    cmd = [sys.executable, "-m", "palm_rlhf", "feedback", "serve", "--port", "0", "--generator", generator,
           "--generator-api-key", KEY, "--prompts", str(tmp_path / "prompts.txt"), "--raters",
           str(tmp_path / "raters.txt"), "--db", str(db), "--max-new-tokens", "8", "--queue-size", "2", "--seed", "0"]
    proc, lines = launch(cmd, "feedback app on http://", timeout=120, cwd=ROOT, env=ENV)
    try:
        url = re.search(r"http://[\d.]+:\d+", "".join(lines)).group(0)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens['alice']}"}, timeout=60) as c:
            pair = c.get("/api/next", params={"wait": 60}).json()["pair"]
            assert pair is not None and pair["prompt"] in ("Once upon a time", "The answer is"), "".join(lines)
            r = c.post("/api/judge", json={"pair_id": pair["pair_id"], "choice": "a"})
            assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM), "".join(lines)
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT checkpoint_a, checkpoint_b, sampling FROM judgements").fetchall()
    assert rows and all(a == b == f"tiny@{generator}" and '"max_new_tokens": 8' in s for a, b, s in rows)
