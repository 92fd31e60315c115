"""Peak memory of one training step (forward + backward, batch 1) at long context: ours vs the
seed package (`flash_attn=True`) vs Hugging Face Llama (SDPA attention) of matched size.

    python benchmarks/memory.py                         # CPU, 1k 2k 4k 8k tokens
    python benchmarks/memory.py --lengths 2048 8192 --device cuda

Config S (issue 4): dim 384, depth 6, heads 6, dim_head 64, vocab 256; Llama with hidden 384,
6 layers, 6 query heads and one key/value head, SwiGLU 1536, tied embeddings. fp32.

Each (system, length) runs in its own subprocess: build the model, one short warm-up step (so
lazily allocated library buffers and the gradients exist), then the measured step. CPU: peak
RSS above the RSS just before the step (the kernel's high-water mark is reset there by writing 5
to /proc/self/clear_refs). CUDA: `torch.cuda.max_memory_allocated` above the allocation before
the step. Gradients exist in both cases, so the figure is activations and attention state.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

DIM, DEPTH, HEADS, DIM_HEAD, VOCAB = 384, 6, 6, 64, 256
SYSTEMS = ("ours", "seed", "llama")
LENGTHS = (1024, 2048, 4096, 8192)


def build(system: str, max_len: int):
    """-> (model, loss(tokens (1, n + 1)) -> scalar)."""
    torch.manual_seed(0)
    if system == "ours":
        from palm_rlhf.model import PaLM
        from palm_rlhf.ops import token_cross_entropy

        model = PaLM(dim=DIM, num_tokens=VOCAB, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD)
        return model, lambda x: token_cross_entropy(model(x[:, :-1]), x[:, 1:])
    if system == "seed":
        from palm_rlhf_pytorch import PaLM as SeedPaLM

        model = SeedPaLM(dim=DIM, num_tokens=VOCAB, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD, flash_attn=True)
        return model, lambda x: model(x, return_loss=True)
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=4 * DIM, num_hidden_layers=DEPTH,
                      num_attention_heads=HEADS, num_key_value_heads=1, head_dim=DIM_HEAD,
                      max_position_embeddings=max_len, tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=None, pad_token_id=0, use_cache=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)

    def loss(x):
        logits = model(input_ids=x[:, :-1]).logits
        return F.cross_entropy(logits.reshape(-1, VOCAB).float(), x[:, 1:].reshape(-1))
    return model, loss


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(system: str, n: int, device: str) -> dict:
    """One measured step; returns {"peak_mib": ...}."""
    model, loss_fn = build(system, n + 64)
    model.to(device).train()
    loss_fn(torch.randint(1, VOCAB, (1, 65), device=device)).backward()  # warm-up: kernels, gradients
    x = torch.randint(1, VOCAB, (1, n + 1), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_fn(x).backward()
        torch.cuda.synchronize()
        return {"peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = rss_mib("VmRSS")
    loss_fn(x).backward()
    return {"peak_mib": rss_mib("VmHWM") - base}


def measure(system: str, n: int, device: str = "cpu", threads: int = 2) -> float | None:
    """Peak MiB of one step in a fresh subprocess (None when it failed, e.g. out of memory)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "--child", system, str(n), device], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        print(f"{system} at {n} tokens failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def table(lengths, device: str, systems=SYSTEMS, threads: int = 2, json_path: str | None = None) -> str:
    peaks = {(s, n): measure(s, n, device, threads) for n in lengths for s in systems}
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"benchmark": "memory", "torch": torch.__version__, "device": device, "threads": threads,
                       "rows": [{"system": s, "tokens": n, "peak_mib": v} for (s, n), v in peaks.items()]}, f, indent=1)
    fmt = lambda v: "failed" if v is None else f"{v:,.0f}"  # noqa: E731
    lines = ["| tokens | " + " | ".join(f"{s} MiB" for s in systems) + " | ours / lower peer |",
             "| --- |" + " --- |" * (len(systems) + 1)]
    for n in lengths:
        peers = [peaks[(s, n)] for s in systems if s != "ours" and peaks[(s, n)] is not None]
        ours = peaks.get(("ours", n))
        ratio = f"{ours / min(peers):.2f}" if ours is not None and peers else "-"
        lines.append(f"| {n:,} | " + " | ".join(fmt(peaks[(s, n)]) for s in systems) + f" | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS))
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON (benchmarks/report.py reads it)")
    args = p.parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(child(args.child[0], int(args.child[1]), args.child[2])))
        return
    print(f"torch {torch.__version__}, {args.device}, fp32, batch 1, one forward + backward, "
          f"peak {'RSS' if args.device == 'cpu' else 'CUDA allocation'} above the step's start")
    print(table(args.lengths, args.device, args.systems, args.threads, args.json))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
