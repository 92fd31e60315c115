"""The quickstart's pictures and `summary.md`: curves from each step's metrics.jsonl."""

from __future__ import annotations

import logging
from pathlib import Path

from ..files import atomic_write_bytes
from ..runtime.metrics import read_metrics
from ..runtime.plots import plot_series

log = logging.getLogger(__name__)

# (file name, title, step directory, metric keys)
PLOTS = (
    ("pretrain_loss.png", "Pretraining loss (nats/token)", "pretrain", ("train/loss", "val/loss")),
    ("reward_accuracy.png", "Reward model: held-out pairwise accuracy", "reward", ("val/accuracy",)),
    ("rl_reward.png", "RL: mean reward-model score of rollouts", "rl", ("reward_mean",)),
    ("rl_kl.png", "RL: KL to the reference (nats/sequence)", "rl", ("kl_ref",)),
)


def _table(rows: dict) -> list[str]:
    before, after = rows["before"], rows["after"]
    lines = ["| | before RL | after RL | change |", "| --- | --- | --- | --- |"]
    for key, label in (("reward_model", "mean reward-model score"), ("annotator_rule", "annotator's rule score"),
                       ("kl_to_reference", "KL to reference (nats/seq)")):
        lines.append(f"| {label} | {before[key]:.4f} | {after[key]:.4f} | {after[key] - before[key]:+.4f} |")
    return lines


def _samples(rows: dict) -> list[str]:
    lines = []
    for label in ("before", "after"):
        lines.append(f"**{label} RL**\n")
        for prompt, text in rows[label]["samples"]:
            lines.append(f"- prompt `{prompt!r}` → `{text!r}`")
        lines.append("")
    return lines


def write_report(out: Path, results: dict, rows: dict, config) -> dict:
    """Plots into OUT/plots, `OUT/summary.md`; returns the eval step's result (printed by the CLI)."""
    plots = []
    for name, title, step, keys in PLOTS:
        if plot_series(read_metrics(out / step), keys, title, out / "plots" / name):
            plots.append((name, title))
    pre, prefs, rm = results.get("pretrain", {}), results.get("preferences", {}), results.get("reward", {})
    md = [
        "# palm-rlhf quickstart", "",
        f"Algorithm: **{config.algo.upper()}**, budget {config.minutes:g} minutes, seed {config.seed}.", "",
        "## Steps", "",
        f"1. Pretrained a {pre.get('parameters', 0):,}-parameter byte-level PaLM on the Python standard library "
        f"for {pre.get('steps')} steps: validation loss {pre.get('val_loss', float('nan')):.3f} nats/token, "
        f"{pre.get('val_bpb', float('nan')):.3f} bits/byte.",
        f"2. Sampled two completions per prompt and let the simulated annotator (prefers the larger share of "
        f"vowels) judge them: {prefs.get('pairs')} pairs ({prefs.get('ties_dropped')} ties dropped).",
        f"3. Trained a reward model for {rm.get('steps')} steps: held-out pairwise accuracy "
        f"{rm.get('val_accuracy', float('nan')):.1%}.",
        f"4. Ran {config.algo.upper()} against the reward model.", "",
        "## Before and after RL", "",
        f"On {config.eval_prompts} held-out prompts, sampling at temperature 1:", "",
        *_table(rows), "",
        *_samples(rows),
        "## Plots", "",
        *[f"![{title}](plots/{name})" for name, title in plots], "",
    ]
    atomic_write_bytes(out / "summary.md", "\n".join(md).encode())
    return {k: {m: v for m, v in rows[k].items()} for k in rows} | {"plots": [n for n, _ in plots],
                                                                      "table": _table(rows)}
