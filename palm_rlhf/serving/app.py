"""The OpenAI-compatible HTTP API over an `Engine`.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health.
Streaming replies are Server-Sent Events in OpenAI's chunk format ending with `data: [DONE]`.
Each route hands its choices to the engine; the engine thread posts each decode step's events
to a mailbox that wakes the event loop once per step, and a stream sends what arrived for a
request since its last write as one write, one chunk per choice (several tokens in a chunk when
the client fell behind). When the client goes away its rows are cancelled and leave the batch
at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import DataError
from .engine import Delta, Failure, QueueFull
from .protocol import (ApiError, envelope, logprobs_block, new_id, parse_logprobs, parse_messages, parse_prompts,
                       parse_sampling, usage)
from .template import prompt_ids

log = logging.getLogger(__name__)


class _Mailbox:
    """Engine events into the event loop: posts from the engine thread pile up in a list, and
    the loop is woken once to take all that arrived before it ran (`Engine.dispatch` posts a
    whole decode step at once). Waking it per token costs a hand-over of the GIL per token.

    `interval` (seconds): after a wake-up, further tokens wait up to this long and go out
    together, one chunk per stream; a request's first token, a finish and a failure wake the
    loop at once. 0 wakes it for every step.
    """

    def __init__(self, loop, interval: float = 0.0):
        self.loop, self.interval, self.lock = loop, interval, threading.Lock()
        self.items: list = []
        self.woken = False
        self.last = float("-inf")  # when the loop was last woken

    def post(self, items) -> None:
        """Any thread: (sink, event) pairs to deliver in the loop with `sink.put(event)`; an
        empty list only checks whether waiting tokens are due."""
        now = time.monotonic()
        urgent = False
        with self.lock:
            for sink, event in items:
                urgent = urgent or not sink.started or not isinstance(event, Delta) or event.finish_reason is not None
                sink.started = True
            self.items.extend(items)
            if self.woken or not self.items or (not urgent and now - self.last < self.interval):
                return
            self.woken, self.last = True, now
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.items, self.woken = self.items, [], False
        for sink, event in items:
            sink.put(event)


class _Sink:
    """Where the engine sends the events of one engine request (choices `base + index`)."""

    def __init__(self, run: "_Run", mailbox: _Mailbox, base: int):
        self.run, self.mailbox, self.base = run, mailbox, base
        self.started = False  # set by the mailbox at the first event

    def __call__(self, event) -> None:  # any thread (an engine that does not use `dispatch`)
        self.mailbox.post([(self, event)])

    def put(self, event) -> None:  # in the loop
        self.run.receive(self.base, event)


class _Run:
    """The engine requests of one HTTP request, and the events that arrived for them."""

    def __init__(self, engine, job, mailbox: _Mailbox):
        self.engine, self.job = engine, job
        self.inbox: list = []     # (choice index, event) not yet taken by `batches`
        self.waiter = None        # the future `batches` waits on while the inbox is empty
        self.requests = []
        try:
            for p, prompt in enumerate(job.prompts):
                self.requests.append(engine.submit(prompt, job.params, job.n, _Sink(self, mailbox, p * job.n)))
        except QueueFull as e:
            self.cancel()
            raise ApiError(503, f"the server is busy: {e}", code="queue_full", kind="server_error") from e
        self.choices = len(job.prompts) * job.n
        self.prompt_tokens = sum(len(p) for p in job.prompts)
        self.completion_tokens = 0

    def receive(self, base: int, event) -> None:
        self.inbox.append((base, event))
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    async def batches(self, request: Request):
        """Lists of (choice index, Delta): every event that arrived since the last list (several
        tokens of a choice when the client fell behind), until every choice has finished;
        stops early if the client leaves."""
        left = self.choices
        loop = asyncio.get_running_loop()
        checked = loop.time()
        while left:
            if not self.inbox:
                self.waiter = loop.create_future()
                timer = loop.call_later(1.0, lambda w=self.waiter: w.done() or w.set_result(None))
                await self.waiter
                timer.cancel()
            if loop.time() - checked >= 0.5:  # twice a second, also while tokens keep coming
                checked = loop.time()
                if await request.is_disconnected():
                    return
            items, self.inbox = self.inbox, []
            out = []
            for base, event in items:
                if isinstance(event, Failure):
                    raise ApiError(500, event.message, code="engine_error", kind="server_error")
                assert isinstance(event, Delta)
                if event.finish_reason:
                    left -= 1
                    self.completion_tokens += event.completion_tokens
                out.append((base + event.index, event))
            if out:
                yield out


def merged(events) -> dict:
    """(choice index, Delta) events -> {index: Delta} with each choice's texts and log-probs
    joined in order (one streamed chunk per choice; OpenAI's chunks may carry several tokens)."""
    out: dict = {}
    for index, event in events:
        seen = out.get(index)
        out[index] = event if seen is None else Delta(
            index, seen.text + event.text, event.finish_reason or seen.finish_reason,
            seen.logprobs + event.logprobs, seen.completion_tokens + event.completion_tokens)
    return out


def create_app(engine, tokenizer, *, model_name: str, template, api_key: str | None = None,
               max_body_bytes: int = 1 << 20, stream_interval_s: float = 0.0):
    context = engine.context

    mailbox = None

    @asynccontextmanager
    async def lifespan(app):
        nonlocal mailbox
        mailbox = _Mailbox(asyncio.get_running_loop(), stream_interval_s)
        engine.dispatch = mailbox.post  # a decode step's events reach the loop in one wake-up
        if engine.thread is None:
            engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="palm-rlhf serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        headers = {"www-authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "Incorrect API key provided; send Authorization: Bearer KEY (the --api-key "
                                "the server was started with)", code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        check_key(request)
        too_big = ApiError(413, f"request body over {max_body_bytes} bytes", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise too_big
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > max_body_bytes:
                raise too_big
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})", code="invalid_json") from e
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        return body

    async def respond(request: Request, job, chat: bool):
        run = _Run(engine, job, mailbox)
        rid = new_id("chatcmpl" if chat else "cmpl")
        kind = "chat.completion" if chat else "text_completion"
        if job.stream:
            return StreamingResponse(_stream(request, run, rid, kind + (".chunk" if chat else ""), chat),
                                     media_type="text/event-stream", headers={"cache-control": "no-cache"})
        texts = [""] * run.choices
        reasons = [None] * run.choices
        logprobs = [[] for _ in range(run.choices)]
        try:
            async for events in run.batches(request):
                for index, event in events:
                    texts[index] += event.text
                    logprobs[index] += event.logprobs
                    reasons[index] = event.finish_reason or reasons[index]
        finally:
            run.cancel()  # no-op for finished rows; frees the rows of a client that left
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                        "finish_reason": reasons[i]} for i in range(run.choices)]
        else:
            choices = [{"index": i, "text": texts[i], "finish_reason": reasons[i],
                        "logprobs": logprobs_block(logprobs[i], 0) if job.params.logprobs is not None else None}
                       for i in range(run.choices)]
        return envelope(kind, rid, model_name, choices, usage=usage(run.prompt_tokens, run.completion_tokens))

    async def _stream(request, run, rid, kind, chat):
        def chunk(choices, **extra) -> str:
            return f"data: {json.dumps(envelope(kind, rid, model_name, choices, **extra))}\n\n"

        offsets = [0] * run.choices
        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(run.choices)])
            async for events in run.batches(request):
                chunks = []
                for index, event in merged(events).items():
                    if chat:
                        delta = {"content": event.text} if event.text else {}
                        chunks.append(chunk([{"index": index, "delta": delta, "logprobs": None,
                                              "finish_reason": event.finish_reason}]))
                    else:
                        lp = (logprobs_block(event.logprobs, offsets[index]) if run.job.params.logprobs is not None
                              else None)
                        offsets[index] += len(event.text)
                        chunks.append(chunk([{"index": index, "text": event.text, "logprobs": lp,
                                              "finish_reason": event.finish_reason}]))
                yield "".join(chunks)  # one write for all the chunks that are ready
            if run.job.include_usage:
                yield chunk([], usage=usage(run.prompt_tokens, run.completion_tokens))
            yield "data: [DONE]\n\n"
        except ApiError as e:  # the status line is gone already: report in-band, as OpenAI does
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            run.cancel()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompts = parse_prompts(body, tokenizer)
        job = parse_sampling(body, prompts, context=context, max_n=engine.max_batch, default_max_tokens=16,
                             logprobs=parse_logprobs(body))
        return await respond(request, job, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        try:
            ids = prompt_ids(template, tokenizer, parse_messages(body))
        except DataError as e:  # the template refused these messages (raise_exception)
            raise ApiError(400, f"messages: {e}", param="messages", code="invalid_value") from None
        job = parse_sampling(body, [ids], context=context, max_n=engine.max_batch,
                             default_max_tokens=None, extra_stops=template.stop)
        return await respond(request, job, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "palm-rlhf", "context_length": context}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "active_rows": engine.active_rows,
                "queued_rows": engine.queued_rows(), "decode_steps": engine.steps}

    return app
