"""docs/config.md: every training command's config keys, generated from its config dataclass
(the same text as `palm-rlhf COMMAND --help`).

    python -m palm_rlhf.cli.config_docs --write     # regenerate docs/config.md
    python -m palm_rlhf.cli.config_docs             # print it

tests/cli/test_config_docs.py fails when the page is stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HEADER = """# Configuration reference

Every training command reads one config: a packaged preset or YAML file (`--config NAME`), then
`key=value` overrides, dotted for groups (`optim.lr=1e-4`, `lora.r=16`, `eval.every=100`). The
shared keys (`batch_size`, `micro_batch_size`, `optim.*`, `lora.*`, `eval.*`, `model=`, `out_dir=`,
`resume=`, `seed=`, `tokenizer=`) mean the same thing in every command
([training.md](training.md)). This page is generated from the config dataclasses by
`python -m palm_rlhf.cli.config_docs --write`, the same text as `palm-rlhf COMMAND --help`; a test
fails when it is stale. Defaults shown are the dataclass's; a preset may set others
(`palm-rlhf COMMAND --config PRESET --print-config` prints the resolved config).
"""


def training_commands() -> list[tuple[str, str]]:
    """(command line, config class path) of every training command, in `--help` order."""
    from .main import build_parser

    found = []

    def walk(parser):
        for action in parser._actions:  # argparse has no public walk of sub-parsers
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    config = sub.get_default("config_path")
                    if config and sub.prog not in [p for p, _ in found]:
                        found.append((sub.prog, config))
                    walk(sub)

    walk(build_parser())
    return found


def render() -> str:
    from .dialect import import_object, keys_help

    parts = [HEADER]
    for prog, config in training_commands():
        parts.append(f"## `{prog}`\n\n```text\n{keys_help(import_object(config), columns=100)}\n```\n")
    return "\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="write docs/config.md (default: print it)")
    args = ap.parse_args(argv)
    text = render()
    if args.write:
        path = Path(__file__).resolve().parents[2] / "docs" / "config.md"
        path.write_text(text)
        print(f"wrote {path}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
