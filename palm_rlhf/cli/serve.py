"""`palm-rlhf serve`: an OpenAI-compatible HTTP API (completions, chat, streaming) with request batching."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  palm-rlhf serve runs/ppo                            # http://127.0.0.1:8000/v1, the run's final/
  palm-rlhf serve runs/sft --port 0                   # a free port (printed at start)
  palm-rlhf serve runs/sft --adapter runs/lora        # the base with a LoRA run's adapter
  palm-rlhf serve runs/ppo --host 0.0.0.0 --api-key "$KEY" --max-batch 32

Clients: curl, or the openai package with base_url="http://127.0.0.1:8000/v1" (docs/serving.md).
"""


def add_model_arguments(p) -> None:
    """MODEL, --adapter, --tokenizer, --context, --threads: shared by `serve` and `chat`."""
    p.add_argument("model", type=Path, help="a run directory (its final/), a final/ or save_pretrained "
                   "directory, a checkpoint step directory, or a Llama/Mistral/Qwen checkpoint directory")
    p.add_argument("--adapter", type=Path, default=None,
                   help="a LoRA adapter to apply: adapter.safetensors, or a LoRA/PPO/GRPO/DPO run directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the one saved with the model)")
    p.add_argument("--context", type=int, default=1024,
                   help="context length in tokens: prompt + reply must fit (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: torch's choice; 1 is fastest for tiny models or a busy CPU)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="weights' dtype (default: as saved for our models, fp32 for a family checkpoint)")


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    p.add_argument("--max-batch", type=int, default=16, help="most rows decoded together (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="most rows waiting for a place in the batch; more get 503 (default: %(default)s)")
    p.add_argument("--gather-ms", type=float, default=10.0,
                   help="how long an idle server waits after a request for others to batch with (default: %(default)s)")
    p.add_argument("--stream-interval-ms", type=float, default=20.0,
                   help="a stream sends the tokens of this many ms together in one chunk (first tokens and finishes "
                        "at once): fewer wake-ups of the HTTP thread leave more CPU to decoding; 0 sends every "
                        "token as soon as it is decoded (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--workers", type=int, default=1,
                   help="engine replicas, each a process with its own copy of the model and a share of the CPU "
                        "threads; requests go to the least busy (default: %(default)s: one engine, in this process)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ConfigError

    try:
        from ..serving.app import create_app
    except ImportError as e:
        raise ConfigError(f"serving needs the `web` extra ({e.name} is missing): pip install 'palm-rlhf[web]'") from e
    from ..feedback.server import bind, is_loopback, serve, url_of
    from ..serving import Engine, EnginePool, EngineProcess, Source, load_for_inference, set_threads

    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1),
                             ("--workers", args.workers, 1), ("--context", args.context, 2),
                             ("--max-body-bytes", args.max_body_bytes, 1024)):
        if value < low:
            raise ConfigError(f"{flag} must be at least {low}, got {value}")
    for flag, value in (("--gather-ms", args.gather_ms), ("--stream-interval-ms", args.stream_interval_ms)):
        if value < 0:
            raise ConfigError(f"{flag} must be >= 0, got {value}")
    set_threads(args.threads)
    options = dict(context=args.context, max_batch=args.max_batch, max_queue=args.max_queue,
                   gather_s=args.gather_ms / 1000)
    if args.workers > 1:  # the replicas load the model (their errors are raised here)
        threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
        level = logging.getLogger().getEffectiveLevel()
        engine = EnginePool([EngineProcess(Source(args.model, args.adapter, args.tokenizer, threads,
                                                  level if i == 0 else logging.ERROR, args.dtype), **options)
                             for i in range(args.workers)]).start()
    else:
        loaded = load_for_inference(args.model, args.adapter, args.tokenizer, dtype=args.dtype)
        engine = Engine(loaded.model, loaded.tokenizer, finetune_scope=loaded.finetune_scope, **options)
    try:  # the engine processes must not outlive a failure here
        if args.workers > 1:  # the first replica has logged the warnings about the model
            with _quiet(logging.getLogger("palm_rlhf")):
                loaded = load_for_inference(args.model, tokenizer=args.tokenizer, weights=False)
        app = create_app(engine, loaded.tokenizer, model_name=loaded.name, template=loaded.template,
                         api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                         stream_interval_s=args.stream_interval_ms / 1000)
        sock = bind(args.host, args.port)
    except BaseException:
        engine.stop()
        raise
    if not is_loopback(args.host) and args.api_key is None:
        log.warning("listening on %s without --api-key: anyone who can reach this address can use the model; "
                    "pass --api-key (and put it behind HTTPS)", args.host)
    print(f"serving {loaded.name} on {url_of(sock)}/v1 (max batch {args.max_batch}, context "
          f"{args.context}); Ctrl-C stops it", flush=True)
    serve(app, sock)
    return 0


@contextlib.contextmanager
def _quiet(logger):
    """Only errors from `logger` inside the block."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
