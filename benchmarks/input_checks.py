"""Cost of PaLM's input checks: `model.logits(x)` (checks ids, dtype, shape, range)
vs `model.to_logits(model._forward_hidden(x))` (the same forward, no checks).

    python benchmarks/input_checks.py                 # small + medium model, 1 thread
    python benchmarks/input_checks.py --threads 2 --repeats 15
    python benchmarks/input_checks.py --device cuda   # where the range check's host sync matters most

Both variants run in the same process on the same model and input, interleaved
(checked, unchecked, checked, ...), each timing the mean of `--inner` forwards
under `torch.inference_mode()`; the table reports the median over `--repeats`
and the ratio checked / unchecked (1.00 = no measurable cost).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

from palm_rlhf.model import PaLM

SIZES = {
    # name: (PaLM kwargs, batch, seq_len)
    "small": (dict(dim=64, depth=2, heads=4, dim_head=16, num_tokens=256), 1, 32),
    "medium": (dict(dim=256, depth=4, heads=4, dim_head=64, num_tokens=256), 2, 128),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, inner, device):
    sync(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - start) / inner


def bench(name, repeats, inner, device):
    kwargs, batch, seq_len = SIZES[name]
    torch.manual_seed(0)
    model = PaLM(**kwargs).to(device).eval()
    x = torch.randint(0, kwargs["num_tokens"], (batch, seq_len), device=device)
    checked = lambda: model.logits(x)  # noqa: E731
    unchecked = lambda: model.to_logits(model._forward_hidden(x))  # noqa: E731
    check_only = lambda: model._check_tokens(x)  # noqa: E731
    with torch.inference_mode():
        assert torch.equal(checked(), unchecked())  # the same computation
        for fn in (checked, unchecked, check_only):  # warm-up
            timed(fn, max(1, inner // 4), device)
        times = {"checked": [], "unchecked": [], "check_only": []}
        for _ in range(repeats):
            for key, fn in (("checked", checked), ("unchecked", unchecked), ("check_only", check_only)):
                times[key].append(timed(fn, inner, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in model.parameters())
    return (f"| {name} ({params / 1e6:.2f}M params, x {batch}x{seq_len}) | {med['checked'] * 1e3:.3f} | "
            f"{med['unchecked'] * 1e3:.3f} | {med['checked'] / med['unchecked']:.3f} | "
            f"{med['check_only'] * 1e6:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--inner", type=int, default=10, help="forwards per timing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"{datetime.date.today()}, torch {torch.__version__}, {where}, "
          f"median of {args.repeats} x {args.inner} forwards, fp32, inference_mode\n")
    print("| model (input) | with checks, ms | without, ms | ratio | the check alone, us |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.sizes:
        print(bench(name, args.repeats, args.inner, device), flush=True)


if __name__ == "__main__":
    main()
