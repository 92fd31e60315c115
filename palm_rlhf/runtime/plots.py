"""Pictures of runs: curves from metrics.jsonl rows, written as PNG (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .metrics import read_metrics


KL_KEYS = ("kl_ref", "kl_budget")


def series(rows: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of `key` over the rows that hold a number for it."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw(ax, rows, keys, ylabel: str | None = None) -> bool:
    drawn = False
    for key in keys:
        steps, values = series(rows, key)
        if steps:
            ax.plot(steps, values, label=key, marker="o" if len(steps) < 30 else None, markersize=3)
            drawn = True
    if drawn:
        ax.grid(alpha=0.3)
        ax.legend()
        if ylabel:
            ax.set_ylabel(ylabel)
    return drawn


def plot_series(rows: list[dict], keys, title: str, path) -> bool:
    """One chart of `keys` against the step; False (and no file) when no row has any of them."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    drawn = _draw(ax, rows, keys)
    if drawn:
        ax.set_title(title)
        ax.set_xlabel("step")
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    plt.close(fig)
    return drawn


def plot_run(run_dir, out=None) -> Path:
    """RUN_DIR/curves.png: losses (and bits per byte) above, the learning rate below, and between
    them, for runs that log it (PPO, GRPO, DPO), the KL to the reference (and DPO's budget)."""
    rows = read_metrics(run_dir)
    if not rows:
        raise DataError(f"{run_dir}: no metrics.jsonl rows; is this a run directory (palm-rlhf pretrain --out)?")
    out = Path(out) if out else Path(run_dir) / "curves.png"
    plt = _pyplot()
    has_kl = any(series(rows, key)[0] for key in KL_KEYS)  # RL and DPO runs: drift from the reference
    fig, axes = plt.subplots(3 if has_kl else 2, 1, figsize=(8, 10 if has_kl else 7), sharex=True)
    ax_loss, ax_lr = axes[0], axes[-1]
    _draw(ax_loss, rows, ("train/loss", "val/loss", "val/bpb", "loss"), "loss (nats/token) / bits per byte")
    if has_kl:
        _draw(axes[1], rows, KL_KEYS, "KL to the reference (nats / sequence)")
    _draw(ax_lr, rows, ("lr",), "learning rate")
    ax_lr.set_xlabel("step")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


__all__ = ["series", "plot_series", "plot_run"]
