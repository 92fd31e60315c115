"""A reward for the RL runs under the NCCL rule (imported by name in the launched processes)."""


def ascii_fraction(prompts, completions) -> list[float]:
    """Share of completion characters below 128: about half for a random byte model, so every GRPO
    group has score variance."""
    return [sum(ord(ch) < 128 for ch in c) / max(len(c), 1) for c in completions]
