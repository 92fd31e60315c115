"""Quality for a fixed wall-clock budget: ours vs the seed package vs Hugging Face Llama.

    python benchmarks/quality.py                     # 5 minutes of training each (~16 minutes)
    python benchmarks/quality.py --minutes 2 --precision fp32

Each system (config S of `benchmarks/train.py`: dim 384, depth 6, heads 6, dim_head 64,
vocab 256, seq 256, batch 16, 2 threads) trains on the bytes of ../shared/data/tinyshakespeare.txt
(first 90% train, last 10% validation) with the same optimizer step (`TrainStep`: AdamW
lr 1e-3 after 50 linear warmup steps, betas 0.9/0.95, weight decay 0.1 on matrices, clip 1.0),
the same initial seed and the same batch order (step k reads the same windows for every system).

The systems take turns, one optimizer step each, and each step's own duration is charged to
its system; a system stops once its charged time reaches the budget. So all three see the same
machine load (other jobs share these cores) and the same time, and the faster one simply gets
more steps. Validation bits per byte (fp32, no grad, 64 fixed windows) is measured at the end,
outside the budget. Lower is better.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train as bench  # noqa: E402  (same configs and builders as the speed benchmark)

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"


def load_bytes(path: Path):
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    cut = int(len(raw) * 0.9)
    return raw[:cut], raw[cut:]


def window_batch(tokens: np.ndarray, starts: np.ndarray) -> torch.Tensor:
    idx = starts[:, None] + np.arange(bench.SEQ + 1)  # (b, n + 1)
    return torch.from_numpy(tokens[idx].astype(np.int64))


def logits_fn(system: str, model):
    if system == "llama":
        return lambda x: model(input_ids=x).logits
    return model  # ours and the seed: model(x) -> logits (b, n, V)


def build(system: str, precision: str, lr: float, warmup: int):
    """-> (model, logits function, step(batch) -> loss). Builders shared with train.py."""
    from palm_rlhf.ops import token_cross_entropy
    from palm_rlhf.runtime.optim import build_optimizer
    from palm_rlhf.runtime.step import TrainStep

    torch.manual_seed(0)
    if system == "ours":
        model = bench._ours_model(None)
    elif system == "seed":
        from palm_rlhf_pytorch import PaLM as SeedPaLM

        model = SeedPaLM(dim=bench.DIM, num_tokens=bench.VOCAB, depth=bench.DEPTH, heads=bench.HEADS,
                         dim_head=bench.DIM_HEAD)
    else:
        model = bench.build_llama()
    model.train()
    forward = logits_fn(system, model)
    optimizer = build_optimizer(model, bench_optim(lr))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    stepper = TrainStep(model, optimizer, scheduler, grad_accum=1, clip_grad_norm=1.0, precision=precision)

    if system == "seed":
        def loss_fn(batch):
            return model(batch, return_loss=True)  # the seed's own loss path
    else:
        def loss_fn(batch):
            return token_cross_entropy(forward(batch[:, :-1]), batch[:, 1:])
    return model, forward, lambda batch, k: stepper(loss_fn, [batch], step=k).loss


def bench_optim(lr: float):
    from palm_rlhf.runtime.optim import OptimConfig

    return OptimConfig(lr=lr, betas=(0.9, 0.95), weight_decay=0.1, max_grad_norm=1.0)


@torch.no_grad()
def val_bpb(forward, model, val: np.ndarray, windows: int = 64) -> float:
    model.eval()
    starts = np.linspace(0, len(val) - bench.SEQ - 1, windows).astype(np.int64)
    total, count = 0.0, 0
    for i in range(0, windows, bench.BATCH):
        batch = window_batch(val, starts[i:i + bench.BATCH])
        logits = forward(batch[:, :-1]).float()
        total += F.cross_entropy(logits.reshape(-1, bench.VOCAB), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train()
    return total / count / math.log(2)  # nats per byte -> bits per byte (one token = one byte)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="training time budget per system")
    p.add_argument("--systems", nargs="+", default=["ours", "seed", "llama"], choices=["ours", "seed", "llama"])
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=DATA)
    args = p.parse_args(argv)
    if not args.data.is_file():
        print(f"skipped: {args.data} not found (pass --data PATH to a text file)")
        return 0
    torch.set_num_threads(args.threads)
    train, val = load_bytes(args.data)
    budget = args.minutes * 60
    runs = {s: build(s, args.precision, args.lr, args.warmup) for s in args.systems}
    spent = {s: 0.0 for s in args.systems}
    steps = {s: 0 for s in args.systems}
    last_loss = {s: float("nan") for s in args.systems}
    rng = np.random.default_rng(0)
    batches = []  # step k's windows, shared by every system
    while any(spent[s] < budget for s in args.systems):
        for s in args.systems:
            if spent[s] >= budget:
                continue
            k = steps[s]
            while len(batches) <= k:
                batches.append(rng.integers(0, len(train) - bench.SEQ - 1, bench.BATCH))
            batch = window_batch(train, batches[k])
            t = time.perf_counter()
            last_loss[s] = runs[s][2](batch, k)
            spent[s] += time.perf_counter() - t
            steps[s] += 1
        done = min(steps.values())
        if done % 50 == 0:
            print(f"step {done}: " + ", ".join(f"{s} {last_loss[s]:.3f} ({spent[s]:.0f}s)" for s in args.systems),
                  file=sys.stderr)
    print(f"\n{args.minutes:g} min of training each, {args.precision}, {args.threads} threads, "
          f"torch {torch.__version__}\n")
    print("| system | steps | tokens trained | last train loss | val bits/byte |")
    print("| --- | --- | --- | --- | --- |")
    for s in args.systems:
        model, forward, _ = runs[s]
        bpb = val_bpb(forward, model, val)
        print(f"| {s} | {steps[s]} | {steps[s] * bench.BATCH * bench.SEQ:,} | {last_loss[s]:.3f} | {bpb:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
