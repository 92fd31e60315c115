"""The OpenAI-compatible HTTP API over an `Engine`.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health.
Streaming replies are Server-Sent Events in OpenAI's chunk format ending with `data: [DONE]`.
Each route hands its choices to the engine and waits on an asyncio queue the engine thread
feeds; when the client goes away its rows are cancelled and leave the batch at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .engine import Delta, Failure, QueueFull
from .protocol import (ApiError, envelope, logprobs_block, new_id, parse_logprobs, parse_messages, parse_prompts,
                       parse_sampling, usage)

log = logging.getLogger(__name__)


class _Run:
    """The engine requests of one HTTP request, and the queue their events arrive on."""

    def __init__(self, engine, job):
        self.engine, self.job = engine, job
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests = []
        loop = asyncio.get_running_loop()
        try:
            for p, prompt in enumerate(job.prompts):
                self.requests.append(engine.submit(prompt, job.params, job.n, self._sink(loop, p * job.n)))
        except QueueFull as e:
            self.cancel()
            raise ApiError(503, f"the server is busy: {e}", code="queue_full", kind="server_error") from e
        self.choices = len(job.prompts) * job.n
        self.prompt_tokens = sum(len(p) for p in job.prompts)
        self.completion_tokens = 0

    def _sink(self, loop, base: int):
        """Called in the engine thread: hand the event (choice `base + index`) to the event loop."""
        return lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, (base, event))

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    async def events(self, request: Request):
        """(choice index, Delta) until every choice has finished; stops early if the client leaves."""
        left = self.choices
        loop = asyncio.get_running_loop()
        checked = loop.time()
        while left:
            try:
                base, event = await asyncio.wait_for(self.queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                base = event = None
            if loop.time() - checked >= 0.5:  # twice a second, also while tokens keep coming
                checked = loop.time()
                if await request.is_disconnected():
                    return
            if event is None:
                continue
            if isinstance(event, Failure):
                raise ApiError(500, event.message, code="engine_error", kind="server_error")
            assert isinstance(event, Delta)
            if event.finish_reason:
                left -= 1
                self.completion_tokens += event.completion_tokens
            yield base + event.index, event


def create_app(engine, tokenizer, *, model_name: str, template, api_key: str | None = None,
               max_body_bytes: int = 1 << 20):
    context = engine.context

    @asynccontextmanager
    async def lifespan(app):
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
        run = _Run(engine, job)
        rid = new_id("chatcmpl" if chat else "cmpl")
        kind = "chat.completion" if chat else "text_completion"
        if job.stream:
            return StreamingResponse(_stream(request, run, rid, kind + (".chunk" if chat else ""), chat),
                                     media_type="text/event-stream", headers={"cache-control": "no-cache"})
        texts = [""] * run.choices
        reasons = [None] * run.choices
        logprobs = [[] for _ in range(run.choices)]
        try:
            async for index, event in run.events(request):
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
            async for index, event in run.events(request):
                if chat:
                    delta = {"content": event.text} if event.text else {}
                    yield chunk([{"index": index, "delta": delta, "logprobs": None,
                                  "finish_reason": event.finish_reason}])
                else:
                    lp = logprobs_block(event.logprobs, offsets[index]) if run.job.params.logprobs is not None else None
                    offsets[index] += len(event.text)
                    yield chunk([{"index": index, "text": event.text, "logprobs": lp,
                                  "finish_reason": event.finish_reason}])
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
        text = template.render(parse_messages(body))
        job = parse_sampling(body, [tokenizer.encode(text)], context=context, max_n=engine.max_batch,
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
