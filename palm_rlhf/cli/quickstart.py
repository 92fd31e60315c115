"""`palm-rlhf quickstart`: the main job (placeholder until the pipeline lands)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("quickstart", help="pretrain, reward and RL-tune a small PaLM on the built-in corpus")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ConfigError

    raise ConfigError("quickstart is not wired up yet")
