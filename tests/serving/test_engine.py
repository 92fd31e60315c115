"""The serving engine in-process: continuous batching gives what `generate` gives one prompt at a time."""

from __future__ import annotations

import queue
import time

import pytest
import torch

from palm_rlhf.data.tokenizer import ByteTokenizer
from palm_rlhf.generation import SamplingConfig, generate
from palm_rlhf.model import PaLM
from palm_rlhf.serving import Delta, Engine, Params
from palm_rlhf.serving.batch import DecodeBatch, _bucket

TOK = ByteTokenizer()


def run_all(engine, requests):
    """Submit every (prompt ids, Params, n) at once; returns per request (texts, reasons, tokens)."""
    queues = []
    for prompt, params, n in requests:
        q = queue.Queue()
        engine.submit(prompt, params, n, q.put)
        queues.append((q, n))
    results = []
    for q, n in queues:
        texts, reasons, used = [""] * n, [None] * n, [0] * n
        while None in reasons:
            event = q.get(timeout=60)
            assert isinstance(event, Delta), event
            texts[event.index] += event.text
            if event.finish_reason:
                reasons[event.index], used[event.index] = event.finish_reason, event.completion_tokens
        results.append((texts, reasons, used))
    return results


def greedy_reference(model, prompt, max_tokens):
    out = generate(model, [torch.tensor(prompt)], SamplingConfig(max_new_tokens=max_tokens, temperature=0))
    return TOK.decode(out.sequences()[0])


@pytest.mark.parametrize("which", ["model", "family_model"], ids=["palm", "qwen2"])
@pytest.mark.parametrize("context", [256, 40])
@pytest.mark.parametrize("backend", ["auto", "plain"])
def test_greedy_rows_joining_and_leaving_match_generate_alone(request, which, context, backend):
    """Prompts of 1-30 tokens with 3-9 new tokens, all submitted at once to a batch of 4: rows
    join a running batch, leave early, the bucket grows and shrinks; with context 40 the shared
    slot counter also has to be compacted and shifted. Each row's greedy text equals `generate`
    on its prompt alone, for PaLM and for a Qwen2-family model (grouped-query KV cache), with the
    CPU backend and with the plain one (the model's own forward, what a GPU runs)."""
    model = request.getfixturevalue(which)
    prompts = [TOK.encode("abcdefghijklmnopqrstuvwxyz0123"[: 1 + (7 * i) % 30]) for i in range(12)]
    max_tokens = [3 + (5 * i) % 7 for i in range(12)]
    model.backend = backend
    engine = Engine(model, TOK, context=context, max_batch=4, gather_s=0.0).start()
    try:
        got = run_all(engine, [(p, Params(max_tokens=m, temperature=0, stop_at_eos=False), 1)
                               for p, m in zip(prompts, max_tokens)])
    finally:
        engine.stop()
        model.backend = "auto"
    for (texts, reasons, used), p, m in zip(got, prompts, max_tokens):
        assert texts[0] == greedy_reference(model, p, m)
        assert reasons == ["length"] and used == [m]


def test_seeded_rows_are_the_same_alone_and_batched(model):
    """16 seeded sampling requests (some n=2, varied temperature/top-p) give the same texts one at a
    time and all at once; choice i of seed s is choice 0 of seed s + i."""
    reqs = [(TOK.encode(f"prompt {i} " * (1 + i % 4)),
             Params(max_tokens=4 + 3 * i, temperature=(0.7, 1.0, 1.3)[i % 3], top_p=(1.0, 0.9)[i % 2], seed=i,
                    stop_at_eos=False), 1 + i % 2) for i in range(16)]
    engine = Engine(model, TOK, context=256, max_batch=16).start()
    try:
        alone = [run_all(engine, [r])[0] for r in reqs]
        together = run_all(engine, reqs)
        shifted = run_all(engine, [(reqs[1][0], Params(**{**reqs[1][1].__dict__, "seed": 2}), 1)])[0]
    finally:
        engine.stop()
    assert together == alone
    assert len({t for texts, _, _ in alone for t in texts}) == sum(n for _, _, n in reqs)  # all differ
    assert shifted[0][0] == alone[1][0][1]  # seed 1 choice 1 == seed 2 choice 0


def test_eos_and_cancel_free_rows(model):
    engine = Engine(model, TOK, context=256, max_batch=4).start()
    try:
        # the greedy continuation is known: make its first new token id (after k others) the EOS
        prompt = TOK.encode("hello")
        first = generate(model, [torch.tensor(prompt)], SamplingConfig(max_new_tokens=30, temperature=0)).sequences()[0]
        k = next(i for i, t in enumerate(first) if t not in first[:i] and i > 0)
        eos_engine = Engine(model, type("T", (ByteTokenizer,), {"eos_id": first[k]})(), context=256).start()
        try:
            (texts, reasons, used), = run_all(eos_engine, [(prompt, Params(max_tokens=50, temperature=0), 1)])
        finally:
            eos_engine.stop()
        assert texts == [TOK.decode(first[:k])] and reasons == ["stop"] and used == [k + 1]

        q = queue.Queue()
        request = engine.submit(prompt, Params(max_tokens=200, temperature=1.0, seed=0, stop_at_eos=False), 1, q.put)
        q.get(timeout=30)
        request.cancel()
        (texts, reasons, _), = run_all(engine, [(prompt, Params(max_tokens=5, temperature=0, stop_at_eos=False), 1)])
        assert reasons == ["length"] and texts[0] == greedy_reference(model, prompt, 5)
        for _ in range(200):  # the last row leaves right after its final token is delivered
            if engine.active_rows == 0:
                break
            time.sleep(0.01)
        assert engine.active_rows == 0 and engine.steps < 200  # the cancelled row did not run to the end
    finally:
        engine.stop()


def test_buckets_and_batch_bookkeeping(model):
    assert [_bucket(n, 12) for n in (1, 2, 3, 5, 9, 12)] == [1, 2, 4, 8, 12, 12]
    batch = DecodeBatch(model, max_len=16, max_batch=8)
    prefill = model.new_kv_cache(1, 16)
    with torch.inference_mode():
        for name, n in (("a", 3), ("b", 5), ("c", 2)):
            prefill.reset()
            model.forward_cached(torch.arange(1, n + 1)[None], prefill)
            batch.join(name, prefill.k[:, 0, :n], prefill.v[:, 0, :n])
        assert len(batch.rows) == 4 and batch.length == 5  # "b" shifted everything right by 2
        assert batch.cache.pad[:3].tolist() == [2, 0, 3]
        batch.leave(["b", "a"])
        assert batch.rows == ["c"] and batch.cache.pad.tolist() == [3]  # shrunk to the 1-row bucket
        more = [object() for _ in range(4)]  # rows are told apart by identity
        for row in more:
            batch.join(row, prefill.k[:, 0, :2], prefill.v[:, 0, :2])
        batch.leave(["c", *more])  # all at once: no shrink on the way down
        assert len(batch.rows) == 8 and len(batch) == 0
        batch.join("h", prefill.k[:, 0, :2], prefill.v[:, 0, :2])
        assert batch.rows == ["h"]  # a lone newcomer decodes in the 1-row bucket


def test_load_for_inference_applies_the_adapter(model, tmp_path):
    """A LoRA adapter file given to load_for_inference changes the text exactly as the scope does in
    `generate` (the decode folds it into its weights)."""
    from palm_rlhf.model.checkpoint import save_adapter
    from palm_rlhf.serving import load_for_inference

    model.save_pretrained(tmp_path / "m")
    tuned = PaLM.from_pretrained(tmp_path / "m")
    tuned.add_finetune_params("actor", lora_r=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in tuned.finetune_parameters("actor"):
            p.normal_(0, 0.5)
    save_adapter(tuned, "actor", tmp_path / "adapter.safetensors")
    loaded = load_for_inference(tmp_path / "m", tmp_path / "adapter.safetensors")
    prompt = TOK.encode("adapted")
    engine = Engine(loaded.model, loaded.tokenizer, context=64, finetune_scope=loaded.finetune_scope).start()
    try:
        (texts, _, _), = run_all(engine, [(prompt, Params(max_tokens=12, temperature=0, stop_at_eos=False), 1)])
    finally:
        engine.stop()
    with_scope = generate(tuned, [torch.tensor(prompt)], SamplingConfig(max_new_tokens=12, temperature=0),
                          finetune_scope="actor")
    assert texts[0] == TOK.decode(with_scope.sequences()[0]) != greedy_reference(model, prompt, 12)


def test_load_for_inference_resolves_run_directories(model, tmp_path):
    """A run directory serves its final/ under the run's name; an adapter already merged there is refused."""
    from palm_rlhf.errors import ConfigError
    from palm_rlhf.model.checkpoint import save_adapter
    from palm_rlhf.serving import load_for_inference

    final = tmp_path / "ppo" / "final"
    model.save_pretrained(final)
    loaded = load_for_inference(tmp_path / "ppo")
    assert loaded.name == "ppo" and loaded.finetune_scope is None
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()))
    tuned = PaLM.from_pretrained(final)
    tuned.add_finetune_params("actor", lora_r=2)
    save_adapter(tuned, "actor", final / "adapter.safetensors")
    with pytest.raises(ConfigError, match="already has this adapter merged"):
        load_for_inference(tmp_path / "ppo", tmp_path / "ppo")


def test_logprobs_are_the_models_log_softmax(model):
    """Greedy, logprobs=3: each token's log-prob and its 3 alternatives equal log_softmax of the
    model's own logits at that position (the engine forms them as logit - logsumexp)."""
    prompt = TOK.encode("The quick brown")
    q = queue.Queue()
    engine = Engine(model, TOK, context=64, gather_s=0.0).start()
    try:
        engine.submit(prompt, Params(max_tokens=5, temperature=0, stop_at_eos=False, logprobs=3), 1, q.put)
        events = [q.get(timeout=30) for _ in range(5)]
    finally:
        engine.stop()
    entries = [entry for event in events for entry in event.logprobs]
    tokens = [TOK.encode(text)[0] for text, _, _ in entries]
    with torch.no_grad():
        expected = model(torch.tensor([prompt + tokens[:-1]])).float().log_softmax(-1)[0, len(prompt) - 1:]
    for (text, value, alternatives), token, row in zip(entries, tokens, expected):
        assert value == pytest.approx(row[token].item(), abs=1e-4) and value == pytest.approx(row.max().item(), abs=1e-4)
        top = row.topk(3)
        assert list(alternatives.values()) == pytest.approx(top.values.tolist(), abs=1e-4)
        assert list(alternatives) == [TOK.decode([i]) for i in top.indices.tolist()]
