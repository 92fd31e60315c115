"""`palm-rlhf plot RUN_DIR`: loss and learning-rate curves from RUN_DIR/metrics.jsonl as PNG."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLES = """examples:
  palm-rlhf plot runs/pretrain                  # writes runs/pretrain/curves.png
  palm-rlhf plot runs/sft --out sft.png

Plots train/loss and val/loss (and val/bpb when present) against the step, and the learning rate.
"""


def register(sub) -> None:
    p = sub.add_parser("plot", help="plot loss and learning-rate curves of a run as PNG", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
    p.set_defaults(func=run)


def _series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir, out=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..errors import DataError
    from ..runtime.metrics import read_metrics

    rows = read_metrics(run_dir)
    if not rows:
        raise DataError(f"{run_dir}: no metrics.jsonl rows; is this a run directory (palm-rlhf pretrain --out)?")
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for key in ("train/loss", "val/loss", "val/bpb"):
        steps, values = _series(rows, key)
        if steps:
            ax_loss.plot(steps, values, label=key, marker="o" if key != "train/loss" else None, markersize=3)
    ax_loss.set_ylabel("loss (nats/token) / bits per byte")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    steps, values = _series(rows, "lr")
    ax_lr.plot(steps, values, color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run(args) -> int:
    print(json.dumps({"png": str(plot_run(args.run_dir, args.out))}))
    return 0
