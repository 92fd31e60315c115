"""Where one training step's time goes, ours or TRL's, on benchmarks/trl.py's --quick checkpoint and data.

    python benchmarks/trl_profile.py grpo ours        # cProfile of 4 steps of our `grpo` (after 2 warm-up steps)
    python benchmarks/trl_profile.py grpo trl         # TRL's GRPOTrainer (steps 3-6 of 6)
    python benchmarks/trl_profile.py sft ours --steps 8 --work /tmp/trl-work

One process, torch.set_num_threads(1) (on a loaded machine single-thread profiles distort least:
compare shares of a step, not seconds). Prints the cumulative-time listing; the shares in
benchmarks/README.md ("Against TRL") are read from it (train_step / training_step = 100%).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # `import trl` is TRL, not trl.py
sys.path.insert(0, str(HERE.parent))
_spec = importlib.util.spec_from_file_location("bench_trl", HERE / "trl.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

COMMANDS = {"sft": ("finetune", "FinetuneConfig", "FinetuneTrainer"), "grpo": ("grpo", "GRPOConfig", "GRPOTrainer"),
            "dpo": ("dpo", "DPOConfig", "DPOTrainer"), "reward": ("reward", "RewardTrainConfig", "RewardTrainer")}


def profile_ours(trainer: str, work: Path, s: dict, steps: int) -> cProfile.Profile:
    from palm_rlhf.cli.dialect import import_object
    from palm_rlhf.runtime.config import load_config

    run = work / "runs" / f"profile-{trainer}-ours"
    shutil.rmtree(run, ignore_errors=True)
    args = bench.our_args(trainer, work, run, {**s, "steps": 1000})  # no end-of-run evaluation inside the window
    i = args.index("--config")
    module, config_cls, trainer_cls = COMMANDS[trainer]
    config = load_config(import_object(f"palm_rlhf.trainers.{module}.{config_cls}"), args[i + 1],
                         [a for a in args[i + 2:] if "=" in a] + ["progress=false"])
    t = import_object(f"palm_rlhf.trainers.{module}.{trainer_cls}")(config).setup()
    t._t0, t._tokens0 = time.perf_counter(), getattr(t, "tokens_seen", 0)  # what LMTrainer.train sets
    t.model.train()
    for _ in range(2):  # warm-up
        t.run.advance(t)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        t.run.advance(t)
    prof.disable()
    t.cleanup()
    return prof


def profile_trl(trainer: str, work: Path, s: dict, steps: int) -> cProfile.Profile:
    import transformers

    prof, seen = cProfile.Profile(), [0]

    class Window(transformers.TrainerCallback):  # profile steps 3 .. steps + 2
        def on_step_begin(self, args, state, control, **kw):
            seen[0] += 1
            if seen[0] == 3:
                prof.enable()

        def on_step_end(self, args, state, control, **kw):
            if seen[0] == steps + 2:
                prof.disable()

    bench.StepTimer.callback = lambda self: Window()
    run = work / "runs" / f"profile-{trainer}-trl"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    bench.child_trl(trainer, work, run, {**s, "steps": steps + 2})
    return prof


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trainer", choices=sorted(COMMANDS))
    p.add_argument("impl", choices=["ours", "trl"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--work", default=None, help="benchmarks/trl.py's work directory (default: a new temporary one)")
    p.add_argument("--lines", type=int, default=60)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    s = bench.settings(True)
    work = Path(args.work or tempfile.mkdtemp(prefix="trl-profile-"))
    if not (work / "llama" / "config.json").exists():
        work.mkdir(parents=True, exist_ok=True)
        bench.make_data(work, s)
        bench.make_checkpoint(work, s)
    sys.path.insert(0, str(work))  # reward_fn=benchmark_rewards:score
    prof = (profile_ours if args.impl == "ours" else profile_trl)(args.trainer, work, s, args.steps)
    print(f"{args.impl} {args.trainer}: {args.steps} steps, 1 thread, load average {os.getloadavg()}")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(args.lines)


if __name__ == "__main__":
    main()
