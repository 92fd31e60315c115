"""Training throughput and MFU: ours vs the seed package vs Hugging Face Llama.

    python benchmarks/train.py                                  # everything (~10 minutes)
    python benchmarks/train.py --precisions fp32 --repeats 3    # quicker
    python benchmarks/train.py --systems ours ours-compile --precisions bf16
    python benchmarks/train.py --memory                         # also peak RSS, one subprocess per row

Config S (issue 4): dim 384, depth 6, heads 6, dim_head 64, vocab 256, seq 256, batch 16,
AdamW, 2 threads, random weights and fixed random token batches. Every system trains with the
same optimizer step: `palm_rlhf.runtime.step.TrainStep` (AdamW over decay/no-decay groups,
grad clipping at 1.0, bf16 autocast when asked), so only the model and its loss differ:

* ours      `palm_rlhf.model.PaLM` with the pretrain trainer's loss (`PaLM.logits` +
            `ops.token_cross_entropy`): the one block forward, attention through SDPA;
  ours-compile            the same loss under `torch.compile` (the trainers' `compile: true`).
* seed      `palm_rlhf_pytorch.PaLM(..., return_loss=True)` 0.8.0 (its default attention).
* llama     `transformers.LlamaForCausalLM`: hidden 384, 6 layers, 6 query heads with one
            key/value head (multi-query, like PaLM), SwiGLU width 1536, tied embeddings, its
            default (SDPA) attention. Parameters 12,784,512 vs PaLM's 12,782,208 (only norm gains differ).

All rows run in one process, interleaved (the order rotates every repeat), and each repeat also
measures the matmul peak (a 2048^3 `torch.mm`, fp32 and bf16) so MFU compares like with like on a
shared machine. Reported: medians over repeats, and ratios to the seed package. MFU is against
the `torch.mm` peak (the issue's reference: the seed package measures 82% against it); fp32 MFU
is also reported against oneDNN's fp32 2048^3 product, which runs faster than `torch.mm`'s on
some CPUs (1.2x on the AMD EPYC development machine).

FLOPs per trained token (PaLM paper, appendix B): 6 N + 12 L H Q T, with N the weights that
take part in matmuls (12,779,520: the 6 blocks' projections plus the tied 256 x 384 output
projection; the embedding lookup is not a matmul), L = 6 layers, H = 6 heads, Q = 64 head dim,
T = 256 tokens. Attention is counted for the full T x T square, as the paper does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from palm_rlhf.backends.cpu import onednn_linear, onednn_works

DIM, DEPTH, HEADS, DIM_HEAD, VOCAB, SEQ, BATCH = 384, 6, 6, 64, 256, 256, 16
SYSTEMS = ("ours", "ours-compile", "seed", "llama")
DEFAULT_SYSTEMS = ("ours", "seed", "llama")
PRECISIONS = ("fp32", "bf16")


def matmul_weights() -> int:
    """N in 6N: weights used in matmuls (the same count for all three systems)."""
    ff = 4 * DIM
    per_layer = DIM * (HEADS * DIM_HEAD + 2 * DIM_HEAD + 2 * ff) + HEADS * DIM_HEAD * DIM + ff * DIM
    return DEPTH * per_layer + VOCAB * DIM


def flops_per_token() -> int:
    return 6 * matmul_weights() + 12 * DEPTH * HEADS * DIM_HEAD * SEQ


def batches(count: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Fixed (BATCH, SEQ + 1) token windows; ids start at 1 so the seed's ignore_index=0 drops none."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (BATCH, SEQ + 1), generator=g) for _ in range(count)]


def _ours_model():
    from palm_rlhf.model import PaLM
    from palm_rlhf.trainers.base import ModelConfig

    return PaLM(**ModelConfig(dim=DIM, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD).kwargs(VOCAB))


def build(system: str, precision: str):
    """-> (model, step(batch) -> loss float). One real optimizer step per call."""
    from palm_rlhf.ops import token_cross_entropy
    from palm_rlhf.runtime.optim import OptimConfig, build_optimizer
    from palm_rlhf.runtime.step import TrainStep

    torch.manual_seed(0)
    if system.startswith("ours"):
        model = _ours_model()
        forward = torch.compile(model) if system == "ours-compile" else model

        def loss_fn(batch):  # the pretrain trainer's loss
            inputs, targets = batch[:, :-1], batch[:, 1:]  # (b, n)
            return token_cross_entropy(forward(inputs), targets)
    elif system == "seed":
        from palm_rlhf_pytorch import PaLM as SeedPaLM

        model = SeedPaLM(dim=DIM, num_tokens=VOCAB, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD)

        def loss_fn(batch):
            return model(batch, return_loss=True)
    elif system == "llama":
        model = build_llama()

        def loss_fn(batch):
            logits = model(input_ids=batch[:, :-1]).logits  # (b, n, V)
            return F.cross_entropy(logits.reshape(-1, VOCAB).float(), batch[:, 1:].reshape(-1))
    else:
        raise ValueError(system)
    model.train()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4))
    stepper = TrainStep(model, optimizer, None, grad_accum=1, clip_grad_norm=1.0, precision=precision)
    counter = iter(range(10**9))

    def step(batch) -> float:
        return stepper(loss_fn, [batch], step=next(counter)).loss
    return model, step


def build_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=4 * DIM, num_hidden_layers=DEPTH,
                      num_attention_heads=HEADS, num_key_value_heads=1, head_dim=DIM_HEAD,
                      max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=None, pad_token_id=0, use_cache=False)
    return LlamaForCausalLM(cfg)


def matmul_peak(dtype: torch.dtype, threads: int, n: int = 2048, reps: int = 3,
                onednn: bool = False) -> tuple[float, float]:
    """Best FLOP/s of `reps` (n x n) @ (n x n) matmuls: (per wall second, per CPU second x threads).
    onednn: oneDNN's linear (`palm_rlhf.backends.cpu.onednn_linear`) instead of `torch.mm`."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)

    def mm():
        return onednn_linear(a, b) if onednn else torch.mm(a, b)
    mm()
    wall = cpu = float("inf")
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        mm()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, (time.process_time() - c) / threads)
    return 2 * n**3 / wall, 2 * n**3 / cpu


def time_steps(step, data, steps: int, threads: int) -> tuple[float, float]:
    """Tokens per second over `steps` optimizer steps: (per wall second, per CPU second x threads).

    On a machine shared with other jobs the wall clock also counts time this process waited for
    a core; its own CPU time does not (idle OpenMP threads that spin still count, which only
    lowers the figure), so CPU-time rates and MFU are the load-independent ones.
    """
    t, c = time.perf_counter(), time.process_time()
    for i in range(steps):
        step(data[i % len(data)])
    tokens = steps * BATCH * SEQ
    return tokens / (time.perf_counter() - t), tokens / ((time.process_time() - c) / threads)


def memory_child(system: str, precision: str, steps: int) -> None:
    """Subprocess body: a few steps, then print the process's peak RSS (MiB)."""
    torch.set_num_threads(2)
    _, step = build(system, precision)
    data = batches()
    for i in range(steps):
        step(data[i % len(data)])
    print(json.dumps({"rss_mib": peak_rss_self_mib()}))


def peak_rss_self_mib() -> float:
    """This process's peak RSS. Linux keeps `ru_maxrss` across exec, so a child started from a
    large benchmark process would report the parent's peak; VmHWM belongs to the new image."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss(system: str, precision: str, steps: int = 3) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory-child", system, precision, str(steps)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_mib"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", nargs="+", default=list(DEFAULT_SYSTEMS), choices=SYSTEMS)
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per timing")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory", action="store_true", help="peak RSS of each row in its own subprocess")
    p.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--tune-malloc", action="store_true",
                   help="apply the glibc malloc settings the palm-rlhf command uses (to every system)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON (benchmarks/report.py reads it)")
    args = p.parse_args(argv)
    if args.tune_malloc:
        from palm_rlhf.cli.allocator import tune_malloc

        print("glibc malloc tuned (palm_rlhf.cli.allocator):", tune_malloc())
    if args.memory_child:
        memory_child(args.memory_child[0], args.memory_child[1], int(args.memory_child[2]))
        return
    torch.set_num_threads(args.threads)
    data = batches()
    rows = [(s, prec) for prec in args.precisions for s in args.systems]
    steppers = {}
    for row in rows:
        _, step = build(*row)
        for i in range(args.warmup):
            step(data[i % len(data)])
        steppers[row] = step
        print(f"built and warmed {row}", file=sys.stderr)

    speeds = {row: [] for row in rows}  # [(wall tokens/s, CPU-time tokens/s)] per repeat
    peaks = {prec: [] for prec in args.precisions}
    for r in range(args.repeats):
        for prec in args.precisions:
            peaks[prec].append(matmul_peak(torch.float32 if prec == "fp32" else torch.bfloat16, args.threads))
        if "fp32" in args.precisions and onednn_works(torch.float32):
            peaks.setdefault("fp32-onednn", []).append(matmul_peak(torch.float32, args.threads, onednn=True))
        order = rows[r % len(rows):] + rows[:r % len(rows)]
        for row in order:
            speeds[row].append(time_steps(steppers[row], data, args.steps, args.threads))
        print(f"repeat {r + 1}/{args.repeats} (wall, cpu tokens/s): "
              + ", ".join(f"{s}/{p} {speeds[(s, p)][-1][0]:.0f}, {speeds[(s, p)][-1][1]:.0f}" for s, p in rows),
              file=sys.stderr)
    report(args, rows, speeds, peaks)


def _med(values, clock: int) -> float:
    return statistics.median(v[clock] for v in values)


def report(args, rows, speeds, peaks) -> None:
    fpt = flops_per_token()
    payload = {"benchmark": "train", "torch": torch.__version__, "threads": args.threads, "repeats": args.repeats,
               "steps": args.steps, "rows": [], "ratios": []}
    print(f"\ntorch {torch.__version__}, {args.threads} threads, {args.repeats} repeats x {args.steps} steps, "
          f"batch {BATCH} x seq {SEQ}; FLOPs/token = 6N + 12LHQT = {fpt / 1e6:.2f} M")
    for prec in peaks:
        print(f"matmul peak {prec}: median {_med(peaks[prec], 0) / 1e9:.1f} GFLOP/s per wall second, "
              f"{_med(peaks[prec], 1) / 1e9:.1f} per CPU second x threads")
    seed = ("seed", "fp32")
    print("\n| system | precision | tokens/s wall (median, range) | tokens/s CPU time | MFU vs fp32 peak "
          "(CPU time) | MFU vs own-precision peak (CPU time) | MFU vs oneDNN fp32 peak | x seed fp32 (CPU time) "
          "| peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        s, prec = row
        wall, cpu = _med(speeds[row], 0), _med(speeds[row], 1)
        walls = [v[0] for v in speeds[row]]
        mfu32 = f"{100 * cpu * fpt / _med(peaks['fp32'], 1):.1f}%" if "fp32" in peaks else "-"
        own = 100 * cpu * fpt / _med(peaks[prec], 1)
        dnn = f"{100 * cpu * fpt / _med(peaks['fp32-onednn'], 1):.1f}%" if prec == "fp32" and "fp32-onednn" in peaks else "-"
        ratio = f"{cpu / _med(speeds[seed], 1):.2f}" if seed in speeds else "-"
        rss = f"{peak_rss(s, prec):.0f}" if args.memory else "-"
        payload["rows"].append({"system": s, "precision": prec, "tok_s_wall": wall, "tok_s_cpu": cpu,
                                "mfu_own_peak_pct": own})
        print(f"| {s} | {prec} | {wall:.0f} ({min(walls):.0f}-{max(walls):.0f}) | {cpu:.0f} | {mfu32} | "
              f"{own:.1f}% | {dnn} | {ratio} | {rss} |")  # one decimal: a target like 90% must not be met by rounding
    # per-repeat ratios (same repeat = same machine load) are steadier than ratios of medians
    for prec in args.precisions:
        for other in ("seed", "llama", "ours-compile"):
            if ("ours", prec) in speeds and (other, prec) in speeds:
                for clock, name in ((0, "wall"), (1, "cpu")):
                    rs = [a[clock] / b[clock] for a, b in zip(speeds[("ours", prec)], speeds[(other, prec)])]
                    payload["ratios"].append({"other": other, "precision": prec, "clock": name,
                                              "median": statistics.median(rs), "min": min(rs), "max": max(rs)})
                    print(f"ours/{other} {prec} {name}: median per-repeat ratio {statistics.median(rs):.2f} "
                          f"(range {min(rs):.2f}-{max(rs):.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
