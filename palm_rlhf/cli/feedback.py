"""`palm-rlhf feedback serve|export|add-rater`: the human-preference web app."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  palm-rlhf feedback add-rater alice --raters raters.txt      # prints alice's token
  palm-rlhf feedback serve --checkpoint runs/sft --prompts prompts.txt --raters raters.txt
  palm-rlhf feedback serve --checkpoint runs/ppo --checkpoint runs/sft --prompts prompts.jsonl   # ppo@... vs sft@...
  palm-rlhf feedback serve --generator http://127.0.0.1:8000/v1 --prompts prompts.txt    # from `palm-rlhf serve`
  palm-rlhf feedback export --db feedback.sqlite --out prefs.jsonl
"""


def register(sub) -> None:
    p = sub.add_parser("feedback", help="collect human preferences in a web app and export them",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="feedback_command", metavar="ACTION", title="actions", required=True)

    s = actions.add_parser("serve", help="serve pairs of completions to raters",
                           epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--checkpoint", action="append", type=Path, default=[],
                   help="a run directory (its final/), a final/ or a checkpoint step directory; give it twice to "
                   "compare two models (e.g. --checkpoint runs/ppo --checkpoint runs/sft)")
    s.add_argument("--generator", action="append", default=[], metavar="URL",
                   help="take completions from a running `palm-rlhf serve` (or any OpenAI-compatible API) at URL, "
                        "e.g. http://127.0.0.1:8000/v1, instead of loading a checkpoint here; with --checkpoint or "
                        "twice, it compares two models")
    s.add_argument("--generator-api-key", default=None, metavar="KEY", help="the --generator server's --api-key")
    s.add_argument("--prompts", type=Path, required=True,
                   help="prompts: one per line (.txt, \\n for a newline) or JSONL with a \"prompt\" field")
    s.add_argument("--db", type=Path, default=Path("feedback.sqlite"), help="SQLite database (default: %(default)s)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    s.add_argument("--raters", type=Path, help="raters file, `name token` per line (default: one rater "
                                                "'local' with a fresh token printed at start)")
    s.add_argument("--max-new-tokens", type=int, default=64, help="completion length (default: %(default)s)")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=0.9)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int, default=None, help="seed for sampling and pair order")
    s.add_argument("--queue-size", type=int, default=8, help="pairs kept prepared ahead (default: %(default)s)")
    s.add_argument("--shared-fraction", type=float, default=0.1,
                   help="chance a rater gets a pair another rater judged, for agreement stats (default: %(default)s)")
    s.add_argument("--max-body-bytes", type=int, default=64 * 1024, help="larger request bodies get 413")
    s.add_argument("--secure-cookies", action="store_true", help="mark cookies Secure (behind an HTTPS proxy)")
    s.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a host name the app answers to (repeatable); IP addresses, localhost and --host "
                        "always work; other Host headers get 400 (DNS rebinding)")
    s.add_argument("--session-hours", type=float, default=12.0,
                   help="a browser sign-in expires after this many hours (default: %(default)s)")

    e = actions.add_parser("export", help="write A/B judgements as preference JSONL for reward training",
                           epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--db", type=Path, required=True, help="the database `serve` wrote")
    e.add_argument("--out", type=Path, required=True, help="output JSONL (pairwise preference records)")
    e.add_argument("--margin-from-rating", action="store_true",
                   help="set margin = (rating - 1) / 4 from the optional 1-5 rating")

    a = actions.add_parser("add-rater", help="append a rater with a fresh random token to a raters file",
                           epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("name", help="rater name (letters, digits, _ . @ -)")
    a.add_argument("--raters", type=Path, required=True, help="raters file (created with mode 600)")
    p.set_defaults(func=run)


def run(args) -> int:
    return {"serve": run_serve, "export": run_export, "add-rater": run_add_rater}[args.feedback_command](args)


def run_serve(args) -> int:
    from ..errors import ConfigError

    try:
        from ..feedback.app import create_app
    except ImportError as e:
        raise ConfigError(f"the web app needs the `web` extra ({e.name} is missing): "
                          "pip install 'palm-rlhf[web]'") from e
    from ..feedback.auth import make_token, read_raters
    from ..feedback.pairs import ModelPairSource, PairQueue, ServedModel, load_checkpoint, read_prompts
    from ..feedback.server import bind, is_loopback, serve
    from ..feedback.store import FeedbackStore
    from ..generation import SamplingConfig
    from ..runtime.resolve import resolve_model

    if not 1 <= len(args.checkpoint) + len(args.generator) <= 2:
        raise ConfigError(f"give one or two models to sample from (--checkpoint DIR and/or --generator URL), got "
                          f"{len(args.checkpoint) + len(args.generator)}")
    if not 0.0 <= args.shared_fraction <= 1.0:
        raise ConfigError(f"--shared-fraction must be in [0, 1], got {args.shared_fraction}")
    if args.max_body_bytes < 1024:
        raise ConfigError(f"--max-body-bytes must be at least 1024, got {args.max_body_bytes}")
    if not args.session_hours > 0:
        raise ConfigError(f"--session-hours must be positive, got {args.session_hours}")
    prompts = read_prompts(args.prompts)
    if args.raters:
        raters = read_raters(args.raters)
    else:
        token = make_token()
        raters = {token: "local"}
        print(f"no --raters file: sign in as 'local' with token {token}")
    sources = [resolve_model(d) for d in args.checkpoint]
    checkpoints = [load_checkpoint(s.model_dir, name=s.name) for s in sources]
    eos = list(checkpoints[0].tokenizer.eos_ids) if checkpoints else 0  # 0 for every palm-rlhf tokenizer
    checkpoints += [ServedModel(url, args.generator_api_key) for url in args.generator]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, eos_token=eos)
    store = FeedbackStore(args.db, seed=args.seed)
    queue = PairQueue(store, ModelPairSource(checkpoints, sampling, seed=args.seed), prompts, size=args.queue_size)
    app = create_app(store, queue, raters, shared_fraction=args.shared_fraction,
                     max_body_bytes=args.max_body_bytes, secure_cookies=args.secure_cookies,
                     allowed_hosts=[args.host, *args.allowed_host], session_hours=args.session_hours)
    if not is_loopback(args.host):
        log.warning("listening on %s: anyone who can reach this address can try tokens; "
                    "put it behind HTTPS and pass --secure-cookies", args.host)
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"feedback app on http://{shown}:{port}/ ({len(raters)} rater(s), "
          f"{len(prompts)} prompts, database {args.db}); Ctrl-C stops it", flush=True)
    try:
        serve(app, sock)
    finally:
        store.close()
    return 0


def run_export(args) -> int:
    from ..errors import DataError
    from ..feedback.export import export_preferences
    from ..feedback.store import FeedbackStore

    if not args.db.is_file():
        raise DataError(f"--db {args.db}: no such database; pass the file `palm-rlhf feedback serve --db` wrote")
    store = FeedbackStore(args.db)
    try:
        summary = export_preferences(store, args.out, margin_from_rating=args.margin_from_rating)
    finally:
        store.close()
    skipped = ", ".join(f"{n} {k}" for k, n in summary.skipped.items() if n) or "none"
    print(f"wrote {summary.written} preference records to {args.out} (skipped: {skipped})")
    return 0


def run_add_rater(args) -> int:
    from ..feedback.auth import add_rater

    token = add_rater(args.raters, args.name)
    print(f"added rater {args.name!r} to {args.raters}; their token (give it to them privately):", file=sys.stderr)
    print(token)
    return 0
