"""`palm-rlhf plot RUN_DIR`: loss and learning-rate curves from RUN_DIR/metrics.jsonl as PNG."""

from __future__ import annotations

import argparse
import json

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


def run(args) -> int:
    from ..runtime.plots import plot_run

    print(json.dumps({"png": str(plot_run(args.run_dir, args.out))}))
    return 0
