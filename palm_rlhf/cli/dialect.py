"""The one dialect of every command that trains: `palm-rlhf CMD --config PRESET key=value ...`.

pretrain, finetune, reward train, ppo, grpo and dpo are built here, so they parse alike:

    --config PRESET      a YAML file or a preset shipped with the package
    key=value ...        dotted config overrides, anywhere on the line (after flags too)
    --print-config       print the resolved config as YAML and exit
    --no-progress        progress=false
    -h / --help          the examples, then every config key with type, default and meaning

Yesterday's spellings keep working with a one-line deprecation notice: `--base X` (model=X),
`--data X` (data=X), `--out X` (out_dir=X), `--val-data X` (eval.data=X), `--set k=v ...`,
`--no-resume` (resume=never) and `--resume` (resume=must). Old config keys (`steps=`,
`preferences=`, `base=`) are the config dataclasses' ALIASES, translated by runtime.config.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from importlib import import_module
from pathlib import Path

log = logging.getLogger(__name__)

# deprecated flag -> the config key it sets
_VALUE_FLAGS = {"--base": "model", "--data": "data", "--out": "out_dir", "--val-data": "eval.data"}
_RESUME_FLAGS = {"--no-resume": "never", "--resume": "must"}
OVERRIDES_DEST = "overrides"


def import_object(path: str):
    """`package.module.Name` -> the object."""
    module, _, name = path.rpartition(".")
    return getattr(import_module(module), name)


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if value == "":
        return '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def keys_help(config_cls) -> str:
    """The `config keys:` section of `CMD --help`, generated from the config dataclass."""
    from ..runtime.config import config_help

    rows = [(key, tp, _show(default), text) for key, tp, default, text in config_help(config_cls)]
    left = [f"  {key}: {tp} = {default}" for key, tp, default, _ in rows]
    width = min(max(len(s) for s in left) + 2, 56)
    term = shutil.get_terminal_size((120, 24)).columns
    lines = ["config keys (key=value, dotted for groups; type = default):"]
    for head, (_, _, _, text) in zip(left, rows):
        if not text:
            lines.append(head)
        elif len(head) + 2 > width or width + len(text) > max(term, 100):
            lines += [head, " " * 8 + text]
        else:
            lines.append(head.ljust(width) + text)
    aliases = _old_keys(config_cls)
    if aliases:
        lines.append("deprecated keys (still accepted): " + ", ".join(f"{k}= -> {v}" for k, v in aliases.items()))
    return "\n".join(lines)


def _old_keys(config_cls, prefix: str = "") -> dict[str, str]:
    """{old key: what to write instead} of a config and its sections."""
    import dataclasses
    import typing

    from ..runtime.config import Converted

    out = {}
    for klass in reversed(config_cls.__mro__):
        for old, new in (getattr(klass, "ALIASES", None) or {}).items():
            out[prefix + old] = new.new if isinstance(new, Converted) else f"{prefix}{new}="
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        tp = hints.get(f.name)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out.update(_old_keys(tp, f"{prefix}{f.name}."))
    return out


class _HelpWithKeys(argparse.Action):
    """-h/--help that appends the config keys (imported only now: the trainers load torch)."""

    def __init__(self, option_strings, dest, config_path: str, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="show this help and exit")
        self.config_path = config_path

    def __call__(self, parser, namespace, values, option_string=None):
        parser.epilog = (parser.epilog or "").rstrip() + "\n\n" + keys_help(import_object(self.config_path)) + "\n"
        parser.print_help()
        parser.exit()


def add_training_command(sub, name: str, *, help: str, examples: str, config: str, run, description: str = ""):
    """A sub-parser in the one dialect; `config` is the dotted path of its config dataclass and `run(args,
    config)` gets the loaded config."""
    p = sub.add_parser(name, help=help, description=description or help, epilog=examples, add_help=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-h", "--help", action=_HelpWithKeys, config_path=config)
    p.add_argument("--config", default=None, metavar="PRESET",
                   help="YAML file or packaged preset name (`palm-rlhf COMMAND --config NAME`)")
    p.add_argument(OVERRIDES_DEST, nargs="*", metavar="KEY=VALUE",
                   help="config overrides, dotted for groups (optim.lr=1e-3); see the keys below")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (progress=false)")
    for flag in _VALUE_FLAGS:
        p.add_argument(flag, default=None, help=argparse.SUPPRESS)
    for flag in _RESUME_FLAGS:
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--set", nargs="*", default=[], dest="set_overrides", help=argparse.SUPPRESS)

    def run_command(args) -> int:
        config = load_command_config(args)
        if args.print_config:
            print_config(config)
            return 0
        return run(args, config)

    p.set_defaults(func=run_command, config_path=config)
    return p


def _deprecated_overrides(args) -> list[str]:
    out = []
    for flag, key in _VALUE_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            log.warning("%s is deprecated; write %s=%s", flag, key, value)
            out.append(f"{key}={value}")
    for flag, mode in _RESUME_FLAGS.items():
        if getattr(args, flag[2:].replace("-", "_")):
            log.warning("%s is deprecated; write resume=%s", flag, mode)
            out.append(f"resume={mode}")
    if args.set_overrides:
        log.warning("--set is deprecated; write the key=value pairs directly: %s", " ".join(args.set_overrides))
        out += list(args.set_overrides)
    return out


def load_command_config(args):
    """The config dataclass from --config + deprecated flags + key=value overrides (later wins)."""
    from dataclasses import fields

    from ..runtime.config import load_config

    config_cls = import_object(args.config_path)
    overrides = _deprecated_overrides(args) + list(getattr(args, OVERRIDES_DEST))
    if args.no_progress and "progress" in {f.name for f in fields(config_cls)}:
        overrides.append("progress=false")
    return load_config(config_cls, args.config, overrides)


def print_config(config) -> None:
    import yaml

    from ..runtime.config import config_to_dict

    sys.stdout.write(yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=None))


def run_trainer(trainer, out_dir) -> int:
    """setup, train, cleanup; print one JSON summary line (rank 0). Ctrl-C/SIGTERM: the run saves a checkpoint
    and raises RunInterrupted, a KeyboardInterrupt that `main` turns into exit code 130."""
    try:
        trainer.setup()
        summary = trainer.train()
    finally:
        trainer.cleanup()
    if isinstance(summary, list):  # a history of metric rows: report the last
        summary = summary[-1] if summary else {}
    summary = dict(summary or {})
    final = Path(out_dir) / "final"
    if getattr(trainer, "is_main", True):
        shown = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in summary.items()}  # lr 2e-05, not 0.0
        print(json.dumps({"out_dir": str(out_dir), **({"final": str(final)} if final.is_dir() else {}), **shown},
                         default=str))
    return 0
