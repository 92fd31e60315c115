"""`palm-rlhf <command>`: parse arguments, run, map exceptions to exit codes.

Each command lives in its own module in this package and exposes
`register(subparsers)`, which adds a sub-parser and sets `func=run`.
The CLI is the only place that prints for humans or exits.

Exit codes: 0 ok, 1 unexpected internal error, 2 bad input/config/data/checkpoint
(a `PalmRLHFError`), 3 training stopped by a failure (NaN loss), 130 interrupted,
141 the reader of stdout went away (`palm-rlhf info RUN | head`), quietly.

`key=value` overrides may follow flags (`ppo --config ppo model=a --no-progress max_steps=1`):
argparse stops filling a positional list at the first flag, so the leftovers that look like
`key=value` are appended to the command's overrides (in order) rather than rejected.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import import_module

from ..errors import PalmRLHFError, TrainingError
from .dialect import OVERRIDES_DEST

# one module per command (or command group), in the order `--help` lists them
COMMAND_MODULES = [
    "quickstart",
    "prepare",
    "tokenizer",
    "pretrain",
    "finetune",
    "plot",
    "convert",
    "export",
    "info",
    "generate",
    "reward",
    "ppo",
    "grpo",
    "rloo",
    "reinforce_pp",
    "tpo",
    "flowrl",
    "dpo",
    "feedback",
    "serve", "chat",
]

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_TRAINING, EXIT_INTERRUPTED, EXIT_PIPE = 0, 1, 2, 3, 130, 141


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("palm-rlhf")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="palm-rlhf",
        description="Train PaLM language models and align them with human feedback.",
        epilog="Run `palm-rlhf COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"palm-rlhf {_version()}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name in COMMAND_MODULES:
        import_module(f"palm_rlhf.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_PIPE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except PalmRLHFError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_TRAINING if isinstance(e, TrainingError) else EXIT_USER
    except Exception as e:  # noqa: BLE001 - last-resort mapping to an exit code
        if args.debug:
            raise
        print(f"internal error: {type(e).__name__}: {e} (re-run with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None):
    """parse_args, except that `key=value` words after a flag join the command's overrides."""
    args, extras = parser.parse_known_args(argv)
    if extras and hasattr(args, OVERRIDES_DEST):
        stray = [a for a in extras if a.startswith("-") or "=" not in a]
        if not stray:
            getattr(args, OVERRIDES_DEST).extend(extras)
            extras = []
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def _silence_stdout() -> None:
    """stdout's reader is gone: point stdout at /dev/null so the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def console_main() -> int:
    """The `palm-rlhf` executable: process-wide tuning first, then `main`."""
    from .allocator import tune_malloc

    tune_malloc()
    return main()


if __name__ == "__main__":
    raise SystemExit(console_main())
