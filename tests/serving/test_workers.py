"""Engines in processes of their own (`serve --workers N`): the same texts as the in-process
engine, requests spread over the replicas, cancels, load errors and a dead replica."""

from __future__ import annotations

import threading
import time

import pytest

from palm_rlhf.errors import CheckpointError, ConfigError
from palm_rlhf.serving import Delta, Engine, EnginePool, EngineProcess, Failure, Params, Source, load_for_inference


class Collect:
    """A sink: the text of each choice, and an event set when `choices` have ended."""

    def __init__(self, choices: int = 1):
        self.texts, self.left, self.done, self.failures = {}, choices, threading.Event(), []

    def __call__(self, event) -> None:
        if isinstance(event, Failure):
            self.failures.append(event.message)
            self.done.set()
            return
        self.texts[event.index] = self.texts.get(event.index, "") + event.text
        if event.finish_reason is not None:
            self.left -= 1
            if not self.left:
                self.done.set()


def run_all(engine, requests) -> list[dict]:
    sinks = [Collect(n) for _, _, n in requests]
    for (prompt, params, n), sink in zip(requests, sinks):
        engine.submit(prompt, params, n, sink)
    for sink in sinks:
        assert sink.done.wait(60) and not sink.failures, sink.failures
    return [sink.texts for sink in sinks]


def requests(count: int) -> list:
    return [(list(f"prompt number {i} says".encode()), Params(max_tokens=8 + i % 5, temperature=1.0, seed=100 + i), 1 + i % 2)
            for i in range(count)]


def until(condition, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_replicas_give_the_texts_of_the_in_process_engine(model_dir):
    """And the load is spread by tokens left to decode: both replicas get work, all of it ends."""
    loaded = load_for_inference(model_dir)
    local = Engine(loaded.model, loaded.tokenizer, context=128, max_batch=4).start()
    try:
        expected = run_all(local, requests(10))
    finally:
        local.stop()
    pool = EnginePool([EngineProcess(Source(model_dir, threads=1), context=128, max_batch=4) for _ in range(2)]).start()
    try:
        assert run_all(pool, requests(10)) == expected
        assert all(engine.steps > 0 for engine in pool.engines)  # both replicas decoded
        assert until(lambda: pool.active_rows == 0) and pool.queued_rows() == 0
        assert [engine.outstanding for engine in pool.engines] == [0, 0]
    finally:
        pool.stop()
    assert all(not engine.process.is_alive() for engine in pool.engines)


def test_cancel_frees_the_row_and_the_others_go_on(model_dir):
    engine = EngineProcess(Source(model_dir, threads=1), context=512, max_batch=4).start()
    try:
        long = Collect()
        request = engine.submit(list(b"a long one"), Params(max_tokens=400, temperature=1.0, seed=1), 1, long)
        assert until(lambda: engine.active_rows == 1)
        assert engine.outstanding == 400
        request.cancel()
        assert until(lambda: engine.active_rows == 0) and engine.outstanding == 0
        assert not long.done.is_set()  # a cancelled request gets no finish
        assert run_all(engine, requests(3))
    finally:
        engine.stop()


def test_a_load_error_is_raised_here_as_the_same_error(tmp_path):
    with pytest.raises((ConfigError, CheckpointError)) as here:
        load_for_inference(tmp_path / "missing")
    with pytest.raises(type(here.value)) as there:
        EngineProcess(Source(tmp_path / "missing"), context=64).start()
    assert str(there.value) == str(here.value)


def test_a_dead_replica_fails_its_requests_and_later_ones(model_dir):
    engine = EngineProcess(Source(model_dir, threads=1), context=512, max_batch=4).start()
    try:
        sink = Collect()
        engine.submit(list(b"going on"), Params(max_tokens=400, temperature=1.0, seed=1), 1, sink)
        assert until(lambda: engine.active_rows == 1)
        engine.process.kill()
        assert sink.done.wait(30) and "exited unexpectedly" in sink.failures[0]
        later = Collect()
        engine.submit(list(b"after"), Params(max_tokens=4), 1, later)
        assert later.done.is_set() and "exited unexpectedly" in later.failures[0]
    finally:
        engine.stop()


def test_the_queue_limit_holds_across_the_process(model_dir):
    from palm_rlhf.serving import QueueFull

    engine = EngineProcess(Source(model_dir, threads=1), context=512, max_batch=1, max_queue=2).start()
    try:
        running = Collect()
        engine.submit(list(b"a long one"), Params(max_tokens=400, temperature=1.0, seed=1), 1, running)
        assert until(lambda: engine.active_rows == 1)
        for _ in range(2):  # no room in a batch of one: they wait for their prefill
            engine.submit(list(b"waits"), Params(max_tokens=4), 1, Collect())
        assert engine.queued_rows() == 2
        with pytest.raises(QueueFull, match="2 rows are waiting .the limit is 2."):
            engine.submit(list(b"x"), Params(max_tokens=4), 1, Collect())
    finally:
        engine.stop()


def test_events_are_deltas_in_order(model_dir):
    events = []
    engine = EngineProcess(Source(model_dir, threads=1), context=128).start()
    try:
        done = threading.Event()
        engine.submit(list(b"abc"), Params(max_tokens=6, temperature=0.0), 1,
                      lambda e: (events.append(e), e.finish_reason and done.set()))
        assert done.wait(30)
    finally:
        engine.stop()
    assert all(isinstance(e, Delta) for e in events) and events[-1].finish_reason == "length"
    assert events[-1].completion_tokens == 6 and [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)


def test_a_pool_routes_around_a_dead_replica(model_dir):
    pool = EnginePool([EngineProcess(Source(model_dir, threads=1), context=128, max_batch=4) for _ in range(2)]).start()
    try:
        pool.engines[0].process.kill()
        assert until(lambda: pool.engines[0].exit_message is not None)
        assert run_all(pool, requests(4))  # all on the live one, none failed
        assert pool.engines[1].steps > 0 and pool.engines[0].steps == 0
    finally:
        pool.stop()
