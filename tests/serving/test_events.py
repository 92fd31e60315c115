"""How events travel from the engine to a stream: one hand-over per decode step, several tokens per chunk."""

from __future__ import annotations

import queue
import threading

import pytest

from palm_rlhf.data.tokenizer import ByteTokenizer
from palm_rlhf.serving import Delta, Engine, Params
from palm_rlhf.serving.app import merged

TOK = ByteTokenizer()


def collect(engine, requests):
    """Submit (prompt, Params, n) all at once with per-request sinks; returns each request's texts."""
    done = threading.Semaphore(0)
    texts = [[""] * n for _, _, n in requests]
    left = [n for _, _, n in requests]

    def sink_for(r):
        def sink(event):
            texts[r][event.index] += event.text
            if event.finish_reason:
                left[r] -= 1
                if not left[r]:
                    done.release()
        return sink

    for r, (prompt, params, n) in enumerate(requests):
        engine.submit(prompt, params, n, sink_for(r))
    for _ in requests:
        assert done.acquire(timeout=60)
    return texts


def test_dispatch_hands_over_a_step_at_once_and_changes_no_text(model):
    """With `engine.dispatch` set, each call carries the events of one prefill or decode step
    (at most one per choice, all requests together) and the texts equal those of plain sinks."""
    requests = [(TOK.encode(f"prompt number {i}"), Params(max_tokens=6 + i, temperature=1.0, seed=i, logprobs=1,
                                                          stop_at_eos=False), 1 + i % 2) for i in range(3)]
    # max_batch = all 4 rows and a long gather window: the engine starts once all are queued
    engine = Engine(model, TOK, context=64, max_batch=4, gather_s=30.0).start()
    try:
        plain = collect(engine, requests)
        calls = []

        def dispatch(items):
            calls.append([(id(sink), event.index) for sink, event in items])
            for sink, event in items:
                sink(event)

        engine.dispatch = dispatch
        batched = collect(engine, requests)
    finally:
        engine.stop()
    assert batched == plain
    calls = [call for call in calls if call]  # it is also called after steps without events
    assert all(len(set(call)) == len(call) for call in calls)  # one event per choice per call
    assert len(calls[0]) == 4  # the prefill's first tokens: every choice of the 3 requests in one hand-over
    assert len(calls) == 1 + 7  # then one per decode step (the longest request: 8 tokens, 7 steps)


def test_merged_joins_each_choices_tokens_in_order():
    a = [("x", -0.5, {}), ]
    events = [(0, Delta(0, "he", None, a)), (1, Delta(1, "A", None, a)), (0, Delta(0, "llo", "length", a, 7)),
              (1, Delta(1, "", None, []))]
    out = merged(events)
    assert list(out) == [0, 1]
    assert out[0] == Delta(0, "hello", "length", a + a, 7)
    assert out[1] == Delta(1, "A", None, a, 0)


def test_sinks_still_receive_events_without_dispatch(model):
    q = queue.Queue()
    engine = Engine(model, TOK, context=64).start()
    try:
        engine.submit(TOK.encode("hi"), Params(max_tokens=3, temperature=0, stop_at_eos=False, logprobs=0), 1, q.put)
        events = [q.get(timeout=30) for _ in range(3)]
    finally:
        engine.stop()
    assert [e.finish_reason for e in events] == [None, None, "length"]  # with logprobs, every token is an event
    assert events[-1].completion_tokens == 3


class FakeLoop:
    def __init__(self):
        self.wakeups = []

    def call_soon_threadsafe(self, callback):
        self.wakeups.append(callback)

    def run(self):
        callbacks, self.wakeups = self.wakeups, []
        for callback in callbacks:
            callback()
        return len(callbacks)


class Recorder:
    def __init__(self):
        self.started, self.got = False, []

    def put(self, event):
        self.got.append(event.text)


@pytest.mark.parametrize("interval", [0.0, 3600.0])
def test_mailbox_wakes_the_loop_once_per_burst_and_holds_tokens_for_the_interval(interval):
    """A first token, a finish and a failure wake the loop at once; with an interval, the tokens
    between them wait (for the interval, or the next urgent event) and arrive together."""
    from palm_rlhf.serving.app import _Mailbox

    loop, a, b = FakeLoop(), Recorder(), Recorder()
    box = _Mailbox(loop, interval)
    box.post([(a, Delta(0, "a1")), (b, Delta(0, "b1"))])  # first tokens: wake
    box.post([(a, Delta(0, "a2")), (b, Delta(0, "b2"))])  # the loop has not run yet: no second wake-up
    assert loop.run() == 1 and a.got == ["a1", "a2"] and b.got == ["b1", "b2"]
    box.post([(a, Delta(0, "a3")), (b, Delta(0, "b3"))])
    box.post([])  # a step without events
    assert loop.run() == (1 if interval == 0 else 0)
    box.post([(a, Delta(0, "a4", "length"))])  # a finish: wake
    assert loop.run() == 1
    assert a.got == ["a1", "a2", "a3", "a4"] and b.got == ["b1", "b2", "b3"]
