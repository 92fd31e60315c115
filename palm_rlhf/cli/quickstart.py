"""`palm-rlhf quickstart`: the whole RLHF loop on the built-in corpus, offline, in minutes."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  palm-rlhf quickstart                          # PPO into runs/quickstart: ~4 min on 2 idle CPU cores
  palm-rlhf quickstart --algo grpo --out runs/qs-grpo
  palm-rlhf quickstart --minutes 2              # a smaller, faster version of every step

Re-running the same command continues where an interrupted run stopped; delete a step's
directory (e.g. runs/quickstart/rl) to redo it and the steps after it.
"""


def register(sub) -> None:
    p = sub.add_parser("quickstart", help="pretrain, reward and RL-tune a small PaLM on the built-in corpus",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quickstart", help="run directory (default: runs/quickstart)")
    p.add_argument("--minutes", type=float, default=10.0, help="time budget (default 10): every step's size scales with it, sized so that an idle "
                   "2-core CPU finishes in well under the budget")
    p.add_argument("--algo", choices=["ppo", "grpo"], default="ppo", help="RL algorithm (default: ppo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..trainers.quickstart import Quickstart, QuickstartConfig

    config = QuickstartConfig(out=args.out, minutes=args.minutes, algo=args.algo, seed=args.seed,
                              progress=not args.no_progress)
    results = Quickstart(config).run()
    report = results["eval"]
    print()
    print("\n".join(report["table"]))
    print()
    for label in ("before", "after"):
        print(f"{label} RL:")
        for prompt, text in report[label]["samples"][:2]:
            print(f"  {prompt!r} -> {text!r}")
    print(f"\nsummary, plots and checkpoints: {config.out}/summary.md")
    return 0
