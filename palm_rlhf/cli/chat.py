"""`palm-rlhf chat`: talk to a model in the terminal, with streaming replies."""

from __future__ import annotations

import argparse
import sys

from .serve import add_model_arguments

EXAMPLES = """examples:
  palm-rlhf chat runs/ppo
  palm-rlhf chat runs/sft --system "You are terse." --temperature 0.7 --seed 0
  printf 'Hello\\n/reset\\nHi again\\n' | palm-rlhf chat runs/ppo    # one line per turn

In the chat: /reset forgets the conversation, /exit (or Ctrl-D) quits. When the conversation
outgrows the context, the oldest turns are dropped with a notice.
"""


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="a system prompt that starts every conversation")
    p.add_argument("--max-tokens", type=int, default=256, help="longest reply in tokens (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass kept (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed for repeatable replies")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ConfigError, InputError
    from ..serving import Engine, load_for_inference, set_threads
    from ..serving.chat import ChatSession

    if args.max_tokens < 1 or args.context < 2:
        raise ConfigError("--max-tokens must be >= 1 and --context >= 2")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("--temperature must be >= 0 and --top-p in (0, 1]")
    set_threads(args.threads)
    loaded = load_for_inference(args.model, args.adapter, args.tokenizer, dtype=args.dtype)
    engine = Engine(loaded.model, loaded.tokenizer, context=args.context, max_batch=1, gather_s=0.0,
                    finetune_scope=loaded.finetune_scope).start()
    session = ChatSession(engine, loaded.tokenizer, loaded.template, system=args.system,
                          max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed)
    tty = sys.stdin.isatty()
    out = sys.stdout
    if tty:
        print(f"chatting with {loaded.name}; /reset forgets, /exit or Ctrl-D quits", file=sys.stderr)
    try:
        while True:
            if tty:
                out.write("> ")
                out.flush()
            line = sys.stdin.readline()
            if not line:  # Ctrl-D / end of the piped input
                break
            text = line.rstrip("\n")
            if text.strip() == "/exit":
                break
            if text.strip() == "/reset":
                session.reset()
                print("[conversation reset]", file=sys.stderr, flush=True)
                continue
            if not text.strip():
                continue
            pieces = session.ask(text)
            try:
                first = next(pieces, "")
                if session.dropped:
                    print(f"[dropped the oldest {session.dropped} turn(s) to fit the {args.context}-token context]",
                          file=sys.stderr, flush=True)
                out.write(first.lstrip())
                out.flush()
                for piece in pieces:
                    out.write(piece)
                    out.flush()
                out.write("\n")
                out.flush()
            except InputError as e:
                print(f"[{e}]", file=sys.stderr, flush=True)
            except KeyboardInterrupt:  # stop this reply (its row leaves the batch), keep chatting
                out.write("\n[interrupted]\n")
                out.flush()
            finally:
                pieces.close()
    finally:
        engine.stop()
    return 0
