"""Resident memory of the server's decode batch as its buckets of rows grow, on a real-sized model.

    python benchmarks/serve_memory.py                 # a Qwen2.5-0.5B-sized Qwen2 (1.85 GiB of fp32 weights)
    python benchmarks/serve_memory.py --layers 4      # smaller and quicker
    python benchmarks/serve_memory.py --copy-limit-gib 100   # as if the model were small: sliced copies too

transformers writes a random Qwen2 checkpoint with Qwen2.5-0.5B's shapes (hidden 896, 24 layers, 14
heads, 2 key/value heads, SwiGLU 4,864, vocabulary 151,936, tied embeddings) to a temporary
directory. It is loaded as `palm-rlhf serve` loads it (`serving.load_for_inference`), and rows join
the server's decode batch (`serving.batch.DecodeBatch`, context 256) one at a time, each followed by a
decode step, so that the batch passes through the buckets of 1, 2, 4, 8 and 16 rows, each with its
own decoder. Printed: the resident memory (RSS) after loading and at each bucket, the weights'
bytes, and the median time of a decode step there (5 steps). Each bucket's decoder binds every
weight in the layout that many rows stream fastest; the figure shows how many copies of the weights
that makes (`backends.cpu.decode.base_layout`). `--copy-limit-gib`: `FamilyDecoder.gemv_copy_limit`,
the size of projection weights up to which one and two rows get sliced copies of their own (1 GiB).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def rss_gib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--copy-limit-gib", type=float, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from palm_rlhf.backends.cpu import FamilyDecoder
    from palm_rlhf.serving.batch import DecodeBatch
    from palm_rlhf.serving.loading import load_for_inference

    if args.copy_limit_gib is not None:
        FamilyDecoder.gemv_copy_limit = int(args.copy_limit_gib * 2**30)

    tmp = Path(tempfile.mkdtemp(prefix="serve-memory-"))
    try:
        cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=args.layers,
                          num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=2048)
        torch.manual_seed(0)
        Qwen2ForCausalLM(cfg).save_pretrained(tmp / "qwen2")
        del cfg
        start = rss_gib()
        model = load_for_inference(tmp / "qwen2").model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the weights are in memory by now
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()) / 2**30
    print(f"torch {torch.__version__}, {args.threads} threads; {weights:.2f} GiB of weights; "
          f"RSS {start:.2f} GiB before loading, {rss_gib():.2f} GiB loaded")
    batch = DecodeBatch(model, 256, 64)
    rng = random.Random(0)
    with torch.inference_mode():
        for n in range(1, 17):
            _, packed = batch.prefill([[rng.randrange(1000) for _ in range(20)]])
            batch.join(object(), *packed.prompt(0))
            tokens = torch.zeros(len(batch.rows), dtype=torch.long)
            batch.step(tokens)
            if n in (1, 2, 3, 5, 9, 16):
                times = []
                for _ in range(5):
                    start = time.perf_counter()
                    batch.step(tokens)
                    times.append(time.perf_counter() - start)
                print(f"{n:2} rows (bucket {len(batch.rows):2}): RSS {rss_gib():.2f} GiB, "
                      f"{1e3 * statistics.median(times):.0f} ms per decode step", flush=True)


if __name__ == "__main__":
    main()
