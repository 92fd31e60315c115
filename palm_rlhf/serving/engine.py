"""The serving engine: one thread owns the model and decodes every request in one batch.

    engine = Engine(model, tokenizer, context=1024, max_batch=16).start()
    request = engine.submit(prompt_ids, Params(max_tokens=32, temperature=0.8, seed=1), n=2, sink=events.put)
    ...  # sink receives Delta(index, text, ...) events; each choice ends with a finish_reason
    request.cancel()   # e.g. the client went away: its rows leave the batch before the next step
    engine.stop()

Scheduling, between two decode steps: cancelled and finished rows leave; waiting requests are
admitted while their rows fit in `max_batch` (all n choices of a request together). The
admitted prompts are prefilled together, packed into one forward without padding (at most
`prefill_tokens` prompt tokens per forward); each row samples its first token from its prompt's
last logits and joins the running batch (see `batch.DecodeBatch`). When the batch is empty the
engine waits `gather_s` after the first arrival so that a burst of requests starts together.

Events (`Delta`, `Failure`) are handed over once per step: to `sink(event)` of each request, or,
when a consumer set `engine.dispatch`, as one `dispatch([(sink, event), ...])` call (the HTTP
app passes a step's tokens to its event loop in one wake-up instead of one per token).

Each row samples with its own parameters and its own `torch.Generator` (seeded from the
request's seed, choice i using seed + i), drawing one uniform number per token (see
`palm_rlhf.generation.sampling.sample`), so a seeded request gives the same tokens whether it
runs alone or next to others, up to floating-point rounding of the batched products (see
docs/serving.md).
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, InputError
from ..generation import SamplingConfig, process_logits, sample
from .batch import DecodeBatch
from .text import TextStream

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=256)
def _config(temperature: float, top_k: int, top_p: float) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)


class QueueFull(RuntimeError):
    """More rows are waiting than the engine accepts (`max_queue`)."""


@dataclass(frozen=True)
class Params:
    """One request's decoding parameters (validated by the HTTP layer)."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None   # also return the log-probs of this many alternatives per token
    stop_at_eos: bool = True


@dataclass
class Delta:
    """New text of choice `index`; `finish_reason` ("stop" | "length") is set on its last delta.
    `logprobs`: (token text, log-prob, {alternative: log-prob}) per token, when requested."""
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)
    completion_tokens: int = 0


@dataclass
class Failure:
    """The engine failed while this request was running; `message` says why."""
    message: str


def check_fits(prompt: list[int], params: Params, context: int) -> None:
    if not prompt or len(prompt) + params.max_tokens > context:
        raise InputError(f"{len(prompt)} prompt tokens + max_tokens {params.max_tokens} do not fit the "
                         f"context of {context} tokens (and a prompt needs at least one token)")


def check_queue(queued: int, n: int, max_queue: int) -> None:
    if queued + n > max_queue:
        raise QueueFull(f"{queued} rows are waiting (the limit is {max_queue}); retry later")


class Request:
    def __init__(self, prompt: list[int], params: Params, n: int, sink):
        self.prompt, self.params, self.n, self.sink = prompt, params, n, sink
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Row:
    def __init__(self, request: Request, index: int, text: TextStream, uniforms):
        self.request, self.index, self.text, self.uniforms = request, index, text, uniforms
        self.last = 0  # the token fed at the next decode step

    @property
    def done(self) -> bool:
        return self.text.finished or self.request.cancelled


class Engine:
    def __init__(self, model, tokenizer, *, context: int, max_batch: int = 16, max_queue: int = 256,
                 gather_s: float = 0.01, prefill_tokens: int = 1024, finetune_scope=None):
        self.model, self.tokenizer, self.context = model.eval(), tokenizer, context
        window = getattr(model, "sliding_window", None)
        if window is not None and context > window:
            raise ConfigError(f"--context {context} is longer than the model's sliding window ({window}); palm-rlhf "
                              f"runs sliding-window models within the window: use --context {window} or less")
        self.max_batch, self.max_queue, self.gather_s, self.scope = max_batch, max_queue, gather_s, finetune_scope
        self.prefill_tokens = prefill_tokens  # most prompt tokens prefilled in one forward
        self.batch = DecodeBatch(model, context, max_batch, finetune_scope)
        self.waiting: deque[Request] = deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.running = False
        self.steps = 0  # decode steps run (for /health)
        self.outbox: list[tuple[Request, object]] = []  # events of the current step, see `_flush`
        # dispatch(list of (sink, event)): set by a consumer that hands events to another thread
        # (the HTTP app's event loop) to receive a step's events in one call; None: sink(event) each
        self.dispatch = None

    # ------------------------------------------------------------------ public

    def start(self) -> "Engine":
        self.running = True
        self.thread = threading.Thread(target=self._run, name="palm-rlhf-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.running = False
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def submit(self, prompt: list[int], params: Params, n: int = 1, sink=None) -> Request:
        """Queue a request; `sink(event)` is called from the engine thread with each Delta (or a Failure)."""
        check_fits(prompt, params, self.context)
        request = Request(list(prompt), params, n, sink)
        with self.cond:
            check_queue(self.queued_rows(), n, self.max_queue)
            self.waiting.append(request)
            self.cond.notify_all()
        return request

    def queued_rows(self) -> int:
        return sum(r.n for r in self.waiting)

    @property
    def active_rows(self) -> int:
        return len(self.batch)

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        with torch.inference_mode():
            while self.running:
                try:
                    self._admit()
                    self._flush()  # first tokens go out before the next decode step
                    if len(self.batch):
                        self._decode()
                except Exception as e:  # noqa: BLE001 - report to every client, keep serving
                    log.exception("engine step failed")
                    self._fail_all(f"generation failed: {type(e).__name__}: {e}")
                self._flush()

    def _admit(self) -> None:
        with self.cond:
            if not len(self.batch):
                while self.running and not self.waiting:
                    self.cond.wait(0.5)
                deadline = time.monotonic() + self.gather_s
                while self.running and self.queued_rows() < self.max_batch and time.monotonic() < deadline:
                    self.cond.wait(max(deadline - time.monotonic(), 0.0))
            admitted = []
            while self.waiting and len(self.batch) + sum(r.n for r in admitted) + self.waiting[0].n <= self.max_batch:
                request = self.waiting.popleft()
                if not request.cancelled:
                    admitted.append(request)
        for pack in self._packs(admitted):
            try:
                self._prefill(pack)
            except Exception as e:  # noqa: BLE001 - these requests fail alone; the batch goes on
                log.exception("prefill failed")
                for request in pack:
                    self._send(request, Failure(f"generation failed: {type(e).__name__}: {e}"))
                    request.cancel()

    def _packs(self, requests: list[Request]):
        """The requests in groups of at most `prefill_tokens` prompt tokens (a longer prompt alone)."""
        pack, size = [], 0
        for request in requests:
            if pack and size + len(request.prompt) > self.prefill_tokens:
                yield pack
                pack, size = [], 0
            pack.append(request)
            size += len(request.prompt)
        if pack:
            yield pack

    def _prefill(self, requests: list[Request]) -> None:
        """Prefill these prompts in one forward (packed, no padding), sample each row's first
        token from its prompt's last logits, and let the rows join the batch."""
        logits, packed = self.batch.prefill([r.prompt for r in requests])  # (requests, V)
        rows, source = [], []
        for i, request in enumerate(requests):
            p = request.params
            eos = getattr(self.tokenizer, "eos_ids", (self.tokenizer.eos_id,)) if p.stop_at_eos else None
            for c in range(request.n):
                uniforms = None
                if p.temperature > 0:
                    seed = p.seed + c if p.seed is not None else random.getrandbits(63)
                    gen = torch.Generator().manual_seed(seed)
                    uniforms = torch.rand(p.max_tokens, generator=gen, dtype=torch.float64).tolist()
                rows.append(_Row(request, c, TextStream(self.tokenizer, p.max_tokens, p.stop, eos), uniforms))
                source.append(i)
        self._sample(logits[source], rows)
        for row, i in zip(rows, source):
            if not row.done:
                self.batch.join(row, *packed.prompt(i))

    def _decode(self) -> None:
        live = self.batch.live
        tokens = torch.zeros(len(self.batch.rows), dtype=torch.long)
        tokens[[slot for slot, _ in live]] = torch.tensor([row.last for _, row in live], dtype=torch.long)
        logits = self.batch.step(tokens.to(self.batch.cache.k.device))  # (cap, V)
        self.steps += 1
        live = [(slot, row) for slot, row in live if not row.request.cancelled]
        if live:
            slots = [slot for slot, _ in live]
            self._sample(logits if slots == list(range(len(logits))) else logits[slots], [row for _, row in live])
        self.batch.leave([row for _, row in self.batch.live if row.done])

    def _sample(self, logits, rows: list[_Row]) -> None:
        """Sample one token for each row from its logits (len(rows), V) and deliver its text.
        Rows with the same filters are sampled together, each with its own pre-drawn uniform."""
        groups: dict[tuple, list[int]] = {}
        for j, row in enumerate(rows):
            p = row.request.params
            groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(j)
        tokens = torch.zeros(len(rows), dtype=torch.long, device=logits.device)
        for (temperature, top_k, top_p), members in groups.items():
            config = _config(temperature, top_k, top_p)
            processed = process_logits(logits if len(members) == len(rows) else logits[members], config)
            uniform = None
            if not config.greedy:
                uniform = torch.tensor([rows[j].uniforms[rows[j].text.generated] for j in members],
                                       dtype=torch.float64)
            drawn = sample(processed, config.greedy, uniform=uniform)
            if len(members) == len(rows):
                tokens = drawn
            else:
                tokens[members] = drawn
        logprobs = self._logprobs(logits, tokens, rows)
        for row, token, entry in zip(rows, tokens.tolist(), logprobs):
            self._deliver(row, token, entry)

    def _logprobs(self, logits, tokens, rows: list[_Row]) -> list:
        """Per row: [] or, where its request asked for log-probs, [(token text, log-prob,
        {alternative text: log-prob})] for the sampled token, all rows in one pass."""
        out = [[] for _ in rows]
        want = [j for j, row in enumerate(rows) if row.request.params.logprobs is not None]
        if not want:
            return out
        every = len(want) == len(rows)  # then no copy of the rows
        # one fused pass (torch's logsumexp is several: 0.64 against 0.28 ms for 16 rows of 32,000 on the dev CPU)
        log_probs = (logits if every else logits[want]).float().log_softmax(-1)  # (w, V)
        chosen = tokens if every else tokens[want]
        values = log_probs.gather(1, chosen[:, None]).squeeze(1).tolist()
        k_max = max(rows[j].request.params.logprobs for j in want)
        top_values = top_ids = None
        if k_max:
            top = log_probs.topk(k_max)
            top_values, top_ids = top.values.tolist(), top.indices.tolist()
        decode = self.tokenizer.decode
        for w, (j, token) in enumerate(zip(want, chosen.tolist())):
            k = rows[j].request.params.logprobs
            alternatives = {decode([t]): lp for t, lp in zip(top_ids[w][:k], top_values[w][:k])} if k else {}
            out[j] = [(decode([token]), values[w], alternatives)]
        return out

    def _deliver(self, row: _Row, token: int, logprobs: list) -> None:
        text = row.text.push(token)
        row.last = token
        finished = row.text.finish_reason
        if text or finished or logprobs:
            self._send(row.request, Delta(row.index, text, finished, logprobs,
                                          row.text.generated if finished else 0))

    def _send(self, request: Request, event) -> None:
        """Queue an event for the request's sink; `_flush` hands over every queued event at once."""
        if request.sink is not None and not request.cancelled:
            self.outbox.append((request, event))

    def _flush(self) -> None:
        """Deliver this step's events: in one `dispatch` call when set (one hand-over to another
        thread per step, not one per token), else one sink call each."""
        events, self.outbox = self.outbox, []
        if self.dispatch is not None:  # also without events: a consumer may hold some back until a deadline
            self.dispatch([(request.sink, event) for request, event in events])
            return
        for request, event in events:
            try:
                request.sink(event)
            except Exception:  # noqa: BLE001 - a broken consumer must not stop the batch
                log.exception("a request's sink failed; cancelling it")
                request.cancel()

    def _fail_all(self, message: str) -> None:
        requests = {id(row.request): row.request for _, row in self.batch.live}
        self.batch.leave([row for _, row in self.batch.live])
        for request in requests.values():
            self._send(request, Failure(message))
            request.cancel()
