"""Pair sources and the background queue: a tiny real PaLM, a fake, a failing source; prompt files."""

from __future__ import annotations

import time

import pytest
import torch
from feedback_testing import FakePairSource

from palm_rlhf.errors import DataError
from palm_rlhf.feedback.pairs import (ModelPairSource, PairQueue, checkpoint_identity, load_checkpoint,
                                      read_prompts)
from palm_rlhf.feedback.store import FeedbackStore
from palm_rlhf.generation import SamplingConfig
from palm_rlhf.model import PaLM


def tiny(path, seed):
    torch.manual_seed(seed)
    return PaLM(num_tokens=256, dim=32, depth=1, heads=2, dim_head=16).save_pretrained(path)


def test_one_checkpoint_gives_two_samples_of_the_same_model(tmp_path):
    ckpt = load_checkpoint(tiny(tmp_path / "m", 0))
    assert ckpt.identity == checkpoint_identity(tmp_path / "m") and ckpt.identity.startswith("m@")
    source = ModelPairSource([ckpt], SamplingConfig(max_new_tokens=6, eos_token=0), seed=0)
    draft = source.make_pair("Hello")
    assert draft.checkpoint_a == draft.checkpoint_b == ckpt.identity
    assert draft.sampling["max_new_tokens"] == 6 and draft.sampling["stop_sequences"] == []
    # 6 new byte tokens decode to at most 6 replacement characters or bytes each; no EOS text
    assert all(isinstance(t, str) and "\x00" not in t for t in (draft.completion_a, draft.completion_b))
    again = ModelPairSource([ckpt], SamplingConfig(max_new_tokens=6, eos_token=0), seed=0).make_pair("Hello")
    assert again == draft                         # seeded: a rerun samples the same pair


def test_saved_tokenizer_is_used_and_an_unreadable_one_raises(tmp_path):
    from palm_rlhf.data.tokenizer import ByteTokenizer

    path = tiny(tmp_path / "m", 0)
    assert load_checkpoint(path).tokenizer == ByteTokenizer()      # none saved: bytes
    (path / "tokenizer_config.json").write_text('{"type": "wordpiece"}')
    with pytest.raises(DataError, match="unknown tokenizer type"):   # saved but unreadable: no fallback
        load_checkpoint(path)


def test_two_checkpoints_one_side_each_in_shuffled_order(tmp_path):
    a, b = load_checkpoint(tiny(tmp_path / "a", 0)), load_checkpoint(tiny(tmp_path / "b", 1))
    assert a.identity != b.identity
    source = ModelPairSource([a, b], SamplingConfig(max_new_tokens=2), seed=0)
    sides = [source.make_pair("x").checkpoint_a for _ in range(12)]
    assert set(sides) == {a.identity, b.identity}  # P(all 12 on one side) = 2 / 4096 per seed; seed 0 mixes


def test_queue_prepares_pairs_ahead_and_resumes_prompt_order(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    queue = PairQueue(store, FakePairSource(), ["p0", "p1", "p2"], size=4)
    queue.start()
    try:
        assert queue.wait_ready(10)
        deadline = time.monotonic() + 10
        while store.ready_count() < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        queue.stop()
    assert store.ready_count() == 4 and store.item_count() == 4
    assert [store.next_pair(f"r{i}").prompt for i in range(4)] == ["p0", "p1", "p2", "p0"]
    # a restarted queue continues with the next prompt in the cycle
    queue = PairQueue(store, FakePairSource(), ["p0", "p1", "p2"], size=1)
    queue.start()
    try:
        assert queue.wait_ready(10)
    finally:
        queue.stop()
    assert store.next_pair("r9").prompt == "p1"


def test_a_failing_source_is_reported_not_fatal(tmp_path):
    class Broken:
        def make_pair(self, prompt):
            raise RuntimeError("out of memory")

    store = FeedbackStore(tmp_path / "f.sqlite")
    queue = PairQueue(store, Broken(), ["p"], size=2)
    queue.start()
    try:
        assert not queue.wait_ready(1.0)
    finally:
        queue.stop()
    assert queue.last_error == "RuntimeError: out of memory" and store.item_count() == 0


def test_read_prompts(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\n  \nline one\\nline two\n")
    assert read_prompts(txt) == ["first", "line one\nline two"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a <b>"}\n\n{"prompt": "c", "id": 3}\n')
    assert read_prompts(jsonl) == ["a <b>", "c"]
    for text, needle in [('{"prompt": 1}\n', ":1: expected"), ('{"prompt": "a"}\nnope\n', ":2: not valid JSON")]:
        jsonl.write_text(text)
        with pytest.raises(DataError, match=needle):
            read_prompts(jsonl)
    with pytest.raises(DataError, match="cannot read"):
        read_prompts(tmp_path / "missing.txt")


def test_identity_takes_the_run_name(tmp_path):
    """The CLI passes the run directory's name: `ppo@...`, not `final@...`."""
    tiny(tmp_path / "ppo" / "final", 0)
    ckpt = load_checkpoint(tmp_path / "ppo" / "final", name="ppo")
    digest = checkpoint_identity(tmp_path / "ppo" / "final").split("@")[1]
    assert ckpt.identity == f"ppo@{digest}"
