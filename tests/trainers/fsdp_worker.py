"""What `test_fsdp_trainers` runs in each of its 2 gloo processes: several trainer commands in a row,
under the NCCL rule (`tests/runtime/nccl_rule.py`), in one launch (starting processes is the cost)."""

from __future__ import annotations

from palm_rlhf.cli.main import main
from tests.runtime import nccl_rule


def ascii_fraction(prompts, completions) -> list[float]:
    """Share of completion characters below 128: every GRPO group of a random model has score variance."""
    return [sum(ord(ch) < 128 for ch in c) / max(len(c), 1) for c in completions]


def train_all(rank: int, world: int, commands: list[list[str]]) -> list[str]:
    """Run each command (CLI argv) on this rank; returns where each collective the rule let through came from."""
    nccl_rule.install("cpu")
    nccl_rule.seen.clear()
    try:
        for argv in commands:
            code = main(argv)
            if code != 0:
                raise RuntimeError(f"rank {rank}: {argv} exited {code}")
        return [where for _, where, _ in nccl_rule.seen]
    finally:
        nccl_rule.uninstall()
