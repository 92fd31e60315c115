"""Engines in processes of their own: the replicas of `palm-rlhf serve --workers N`.

    pool = EnginePool([EngineProcess(Source("runs/ppo", threads=1), context=1024) for _ in range(2)]).start()
    request = pool.submit(prompt_ids, Params(max_tokens=32), n=1, sink=events.put)
    request.cancel()
    pool.stop()

Both have the `Engine` interface (`submit`, `dispatch`, `steps`, `active_rows`, `queued_rows`,
`start`, `stop`). An `EngineProcess` runs an `Engine` in a child process (started with "spawn")
that loads the model itself; an `EnginePool` sends each request to the replica with the fewest
rows, then the fewest tokens left to decode. Why replicas: under the HTTP server, a decode step with
two torch threads waits at every op for the slower thread, and the HTTP side and the clients preempt
one of them now and then; two replicas of one thread each have nothing to wait for. On the 2-core
development CPU, 16 streaming clients of a config-S Llama get 2.11x the tokens/s of HF's pipeline
from two replicas and 2.09x from one 2-thread engine (benchmarks/README.md "Model families"): since
the engine's own step got cheaper, the replicas' gain is within noise there.

Messages: the parent sends ("submit", id, prompt, params, n), ("cancel", id) and ("stop",);
the child sends ("ready",) or ("error", class name, message) once, then once per decode step
("step", steps, active_rows, [(id, event), ...]). A request counts as queued from `submit`
until its first event (its prefill). If a child dies, each of its open requests gets a
`Failure` naming the exit code, and so does every later one sent to it.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, ConfigError, DataError, InputError
from .engine import Engine, Failure, Params, QueueFull, check_fits, check_queue

log = logging.getLogger(__name__)

_ERRORS = {cls.__name__: cls for cls in (ConfigError, CheckpointError, DataError, InputError)}


@dataclass(frozen=True)
class Source:
    """What the child loads (see `loading.load_for_inference`), how many torch threads it uses, and
    the level it logs at (the CLI's format; a pool's later replicas log errors only, so that a
    warning about the model shows once)."""
    model: Path
    adapter: Path | None = None
    tokenizer: str | None = None
    threads: int = 0
    log_level: int = logging.WARNING
    dtype: str | None = None


@dataclass
class _Open:
    """A request the engine process has not finished (the parent's view)."""
    sink: object
    n: int
    max_tokens: int
    left: int             # choices not finished
    queued: bool = True   # until its first event (its prefill)


class RemoteRequest:
    def __init__(self, owner: "EngineProcess", rid: int):
        self.owner, self.rid, self.cancelled = owner, rid, False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.owner._cancel(self.rid)


class EngineProcess:
    def __init__(self, source: Source, *, context: int, max_batch: int = 16, max_queue: int = 256,
                 gather_s: float = 0.01):
        self.source, self.context, self.max_batch, self.max_queue = source, context, max_batch, max_queue
        self.options = dict(context=context, max_batch=max_batch, max_queue=max_queue, gather_s=gather_s)
        self.thread: threading.Thread | None = None  # reads the child's messages
        self.process = self.commands = self.events = None
        self.dispatch = None  # as Engine.dispatch; None: each sink(event)
        self.steps = self.active_rows = 0
        self.lock = threading.Lock()
        self.open: dict[int, _Open] = {}   # id -> a request the child has not finished
        self.ids = itertools.count()
        self.exit_message: str | None = None  # set when the child has gone

    def start(self) -> "EngineProcess":
        """Start the child and wait until its model is loaded; a load error is raised here, as the
        same error class with the same message as a load in this process."""
        return self.launch().wait_ready()

    def launch(self) -> "EngineProcess":
        """Start the child (it loads the model while this process goes on; see `wait_ready`)."""
        ctx = multiprocessing.get_context("spawn")
        child_commands, self.commands = ctx.Pipe(duplex=False)
        self.events, child_events = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_child, args=(child_commands, child_events, self.source, self.options),
                                   name="palm-rlhf-engine", daemon=True)
        self.process.start()
        child_commands.close()
        child_events.close()
        return self

    def wait_ready(self) -> "EngineProcess":
        try:
            reply = self.events.recv()
        except EOFError:
            self.process.join(5)
            raise ConfigError(f"the engine process exited while loading {self.source.model} (exit code "
                              f"{self.process.exitcode}); its error is printed above") from None
        if reply[0] == "error":
            self.process.join(5)
            raise _ERRORS.get(reply[1], ConfigError)(reply[2])
        self.thread = threading.Thread(target=self._read, name="palm-rlhf-engine-reader", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            with self.lock:
                self.commands.send(("stop",))
        except (OSError, ValueError):
            pass  # already gone
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.thread is not None:
            self.thread.join(5)

    def submit(self, prompt: list[int], params: Params, n: int = 1, sink=None) -> RemoteRequest:
        check_fits(prompt, params, self.context)
        with self.lock:
            check_queue(self.queued_rows(), n, self.max_queue)
            request = RemoteRequest(self, next(self.ids))
            if self.exit_message is None and self._send(("submit", request.rid, list(prompt), params, n)):
                self.open[request.rid] = _Open(sink, n, params.max_tokens, left=n)
                return request
            message = self.exit_message or "the engine process has gone; restart the server"
        self._deliver([(sink, Failure(message))])
        return request

    def queued_rows(self) -> int:
        return sum(o.n for o in list(self.open.values()) if o.queued)  # list(): the reader thread edits

    @property
    def outstanding(self) -> int:
        """Tokens the open choices may still take (the pool's measure of load)."""
        return sum(o.left * o.max_tokens for o in list(self.open.values()))

    # ------------------------------------------------------------------ internals

    def _send(self, message) -> bool:
        """Send to the child (the lock held); False when it has gone."""
        try:
            self.commands.send(message)
            return True
        except (OSError, ValueError):
            return False

    def _cancel(self, rid: int) -> None:
        with self.lock:
            if self.open.pop(rid, None) is not None:
                self._send(("cancel", rid))

    def _read(self) -> None:
        while True:
            try:
                _, steps, active, events = self.events.recv()
            except (EOFError, OSError):
                break
            self.steps, self.active_rows = steps, active
            items = []
            with self.lock:
                for rid, event in events:
                    request = self.open.get(rid)
                    if request is None:
                        continue  # cancelled while the event was on its way
                    items.append((request.sink, event))
                    request.queued, request.left = False, _left_after(request.left, event)
                    if not request.left:
                        del self.open[rid]
            self._deliver(items)
        self._gone()

    def _gone(self) -> None:
        """The child has exited: fail every open request, and every later one."""
        self.process.join(5)
        code = self.process.exitcode
        with self.lock:
            self.exit_message = ("the engine process stopped" if code == 0 else
                                 f"the engine process exited unexpectedly (exit code {code}); restart the server")
            open_sinks = [request.sink for request in self.open.values()]
            self.open, self.active_rows = {}, 0
        if code != 0:
            log.error(self.exit_message)
        self._deliver([(sink, Failure(self.exit_message)) for sink in open_sinks])

    def _deliver(self, items: list) -> None:
        if self.dispatch is not None:
            self.dispatch(items)
            return
        for sink, event in items:
            if sink is not None:
                sink(event)


class EnginePool:
    """`EngineProcess` replicas behind the `Engine` interface: each request goes to the live
    replica with the fewest rows (queued + decoding), among those to the one with the fewest
    tokens still to decode (`max_tokens` of its open choices); a replica that died gets no more.
    Equal rows keep the steps cheap (a step costs about the same per row for few rows); equal
    tokens let a burst's replicas finish together."""

    def __init__(self, engines: list[EngineProcess]):
        self.engines = engines
        self.context, self.max_batch = engines[0].context, engines[0].max_batch
        self.thread = None

    def start(self) -> "EnginePool":
        try:
            for engine in self.engines:  # all load at once
                engine.launch()
            for engine in self.engines:
                engine.wait_ready()
        except BaseException:
            self.stop()
            raise
        self.thread = self.engines[0].thread
        return self

    def stop(self) -> None:
        for engine in self.engines:
            engine.stop()

    @property
    def dispatch(self):
        return self.engines[0].dispatch

    @dispatch.setter
    def dispatch(self, value) -> None:
        for engine in self.engines:
            engine.dispatch = value

    def submit(self, prompt: list[int], params: Params, n: int = 1, sink=None) -> RemoteRequest:
        alive = [e for e in self.engines if e.exit_message is None] or self.engines  # none: each fails
        engine = min(alive, key=lambda e: (e.queued_rows() + e.active_rows, e.outstanding))
        return engine.submit(prompt, params, n, sink)

    def queued_rows(self) -> int:
        return sum(e.queued_rows() for e in self.engines)

    @property
    def active_rows(self) -> int:
        return sum(e.active_rows for e in self.engines)

    @property
    def steps(self) -> int:
        return sum(e.steps for e in self.engines)


def _left_after(left: int, event) -> int:
    """Choices of a request still open after this event (a Failure ends them all)."""
    return 0 if isinstance(event, Failure) else left - (event.finish_reason is not None)


class _Tag:
    """The child's sink of one request: its events go back under the parent's id."""

    def __init__(self, rid: int, n: int):
        self.rid, self.left, self.request = rid, n, None


def _child(commands, events, source: Source, options: dict) -> None:
    """The engine process: load, report ready (or the error), then serve commands until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent stops us
    logging.basicConfig(level=source.log_level, format="%(levelname)s %(name)s: %(message)s")
    from .loading import load_for_inference, set_threads

    try:
        set_threads(source.threads)
        loaded = load_for_inference(source.model, source.adapter, source.tokenizer, dtype=source.dtype)
    except (ConfigError, CheckpointError, DataError, InputError) as e:
        events.send(("error", type(e).__name__, str(e)))
        return
    engine = Engine(loaded.model, loaded.tokenizer, finetune_scope=loaded.finetune_scope, **options)
    open_tags: dict[int, _Tag] = {}  # for "cancel"; a tag leaves when its request has finished
    send_lock = threading.Lock()     # the engine thread and this one both send

    def send(items: list) -> None:
        for tag, event in items:
            tag.left = _left_after(tag.left, event)
            if not tag.left:
                open_tags.pop(tag.rid, None)
        with send_lock:
            events.send(("step", engine.steps, engine.active_rows, [(tag.rid, event) for tag, event in items]))

    engine.dispatch = send
    events.send(("ready",))
    engine.start()
    try:
        while True:
            try:
                message = commands.recv()
            except EOFError:  # the parent has gone
                break
            if message[0] == "submit":
                _, rid, prompt, params, n = message
                tag = open_tags[rid] = _Tag(rid, n)
                try:
                    tag.request = engine.submit(prompt, params, n, tag)
                except (InputError, QueueFull) as e:  # the parent checks both first; a race at most
                    send([(tag, Failure(str(e)))])
            elif message[0] == "cancel":
                tag = open_tags.pop(message[1], None)
                if tag is not None and tag.request is not None:
                    tag.request.cancel()
            elif message[0] == "stop":
                break
    finally:
        engine.stop()
