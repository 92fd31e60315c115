"""Which weight layout a decode-step product streams fastest (supports the CPU backend's `Decoder._layout`).

    python benchmarks/decode_layouts.py --rows 1 8 [--dtype bf16] [--repeats 15]

For each weight shape of the generation benchmark's model (dim 384, ff 1536, vocab
256), times one product of `rows` rows with the weight (plus a residual) in every
layout `palm_rlhf.backends.cpu.Decoder` could use, interleaved, cycling through
~60 MB of distinct matrices so the weights stream from memory as in a real step.
Prints the median µs per product.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from palm_rlhf.backends.cpu import onednn_linear

SHAPES = {"fused projection": (384, 3584), "attention out": (384, 384), "feedforward out": (1536, 384),
          "logits": (384, 256)}


def layouts(w_t, rows=None):
    """(in, out) weight -> {name: (product function, tensor)}; with `rows`, also oneDNN's packed layout."""
    out = {
        "addmm": (lambda x, r, w: torch.addmm(r, x, w), w_t.contiguous()),
        "2 column slices": (lambda x, r, w: torch.bmm(x.expand(2, -1, -1), w).transpose(0, 1)
                            .reshape(x.shape[0], -1).add_(r), w_t.unflatten(1, (2, -1)).transpose(0, 1).contiguous()),
        "2 column slices as (out, in)": (lambda x, r, w: torch.bmm(x.expand(2, -1, -1), w.transpose(1, 2))
                                         .transpose(0, 1).reshape(x.shape[0], -1).add_(r),
                                         w_t.t().unflatten(0, (2, -1)).contiguous()),
        "2 row slices, summed": (lambda x, r, w: torch.bmm(x.view(x.shape[0], 2, -1).transpose(0, 1), w).sum(0)
                                 .add_(r), w_t.unflatten(0, (2, -1)).contiguous()),
        "4 row slices, summed": (lambda x, r, w: torch.bmm(x.view(x.shape[0], 4, -1).transpose(0, 1), w).sum(0)
                                 .add_(r), w_t.unflatten(0, (4, -1)).contiguous()),
    }
    if rows is not None:  # oneDNN's linear with the weight prepacked for `rows` rows
        out["oneDNN packed"] = (lambda x, r, w: onednn_linear(x, w).add_(r),
                                torch.ops.mkldnn._reorder_linear_weight(w_t.t().contiguous(), rows))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.dtype}, µs per product (median)")
    names = list(layouts(torch.zeros(4, 4), 1))
    print("| rows | weight (in x out) | " + " | ".join(names) + " |")
    print("| --- " * (2 + len(names)) + "|")
    torch.manual_seed(0)
    for rows in args.rows:
        for label, (k, n) in SHAPES.items():
            count = max(2, int(60e6 // (k * n * 4)))  # ~60 MB of fp32 weights (30 MB of bf16)
            mats = [layouts(torch.randn(k, n, dtype=dtype), rows) for _ in range(count)]
            x, r = torch.randn(rows, k, dtype=dtype), torch.randn(rows, n, dtype=dtype)
            times = {name: [] for name in names}
            for repeat in range(args.repeats + 1):
                for name in names:  # interleaved
                    start = time.perf_counter()
                    for m in mats:
                        fn, w = m[name]
                        fn(x, r, w)
                    if repeat:  # the first pass is a warm-up
                        times[name].append((time.perf_counter() - start) / count)
            cells = [f"{statistics.median(times[name]) * 1e6:.0f}" for name in names]
            print(f"| {rows} | {k} x {n} ({label}) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
