"""GPU figures: training tokens/s and MFU, decode tokens/s against HF Llama, peak memory.

    python benchmarks/gpu.py                  # everything, about 3 minutes on an H100
    python benchmarks/gpu.py --parts peak train

- peak: the card's bf16 matmul peak, measured (8192^3 `torch.mm`, median of 10 after warm-up).
- train: ours, bf16 autocast, AdamW through `TrainStep`, a GPU-sized config (dim 1024, depth 12,
  16 heads of 64, vocab 256, 2,048 tokens x batch 8), and HF Llama of matched size (one key/value
  head, SwiGLU 4 x dim, tied embeddings, SDPA). MFU = tokens/s x (6N + 12LHQT) / measured peak.
- decode: config S (dim 384, depth 6, heads 6, dim_head 64, vocab 256; `benchmarks/generate.py`'s
  matched Llama), bf16, 64-token prompts, 256 new tokens, batch 1 and 8, interleaved, median of 3:
  ours eager (the plain engine: the model's own forward per token), ours `compile=True`, Llama's
  `generate` with its KV cache.
- memory: `benchmarks/memory.py` on CUDA at 2k and 8k tokens (ours and Llama; the seed package is
  not installed on the GPU machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate as gen_bench  # noqa: E402  (benchmarks/generate.py: config S and its matched Llama)
import memory as mem_bench  # noqa: E402

TRAIN = dict(dim=1024, depth=12, heads=16, dim_head=64, vocab=256, seq=2048, batch=8)


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def bf16_peak() -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    return 2 * 8192**3 / statistics.median(timed(lambda: a @ b, 10))


def train_models():
    from palm_rlhf.model import PaLM
    from palm_rlhf.ops import token_cross_entropy
    from transformers import LlamaConfig, LlamaForCausalLM

    c = TRAIN
    torch.manual_seed(0)
    ours = PaLM(dim=c["dim"], num_tokens=c["vocab"], depth=c["depth"], heads=c["heads"], dim_head=c["dim_head"])
    cfg = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["dim"], intermediate_size=4 * c["dim"],
                      num_hidden_layers=c["depth"], num_attention_heads=c["heads"], num_key_value_heads=1,
                      head_dim=c["dim_head"], max_position_embeddings=c["seq"], tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=None, pad_token_id=0, use_cache=False,
                      attn_implementation="sdpa")
    llama = LlamaForCausalLM(cfg)
    return {"ours": (ours, lambda b: token_cross_entropy(ours(b[:, :-1]), b[:, 1:])),
            "llama": (llama, lambda b: F.cross_entropy(llama(input_ids=b[:, :-1]).logits.reshape(-1, c["vocab"])
                                                       .float(), b[:, 1:].reshape(-1)))}


def flops_per_token(model) -> float:
    c = TRAIN
    n = sum(p.numel() for name, p in model.named_parameters() if p.ndim == 2 and "emb" not in name)
    n += c["vocab"] * c["dim"]  # the tied output projection is a matmul; the embedding lookup is not
    return 6 * n + 12 * c["depth"] * c["heads"] * c["dim_head"] * c["seq"]


def train_part(peak: float) -> None:
    c = TRAIN
    batch = torch.randint(1, c["vocab"], (c["batch"], c["seq"] + 1), device="cuda")
    print(f"\n## training, bf16 autocast, dim {c['dim']}, depth {c['depth']}, {c['heads']} heads x {c['dim_head']}, "
          f"{c['batch']} x {c['seq']} tokens")
    print("| system | tokens/s | step ms | MFU vs measured bf16 peak | peak memory GiB |")
    print("| --- | --- | --- | --- | --- |")
    for name, (model, loss_fn) in train_models().items():
        tokens, seconds, gib = train_one(model.cuda().train(), loss_fn, batch)
        print(f"| {name} | {tokens:,.0f} | {1000 * seconds:.1f} | {100 * tokens * flops_per_token(model) / peak:.1f}% | "
              f"{gib:.1f} |", flush=True)
        model.cpu()
        torch.cuda.empty_cache()


def train_one(model, loss_fn, batch) -> tuple[float, float, float]:
    """(tokens/s, seconds per step, peak GiB) of bf16 AdamW steps; the optimizer is freed on return."""
    from palm_rlhf.runtime.optim import OptimConfig, build_optimizer
    from palm_rlhf.runtime.step import TrainStep

    stepper = TrainStep(model, build_optimizer(model, OptimConfig(lr=1e-4)), None, precision="bf16")
    counter = iter(range(10**6))
    step = lambda: stepper(loss_fn, [batch], step=next(counter))  # noqa: E731
    for _ in range(3):
        step()
    torch.cuda.reset_peak_memory_stats()
    seconds = statistics.median(timed(step, 10))
    tokens = batch.shape[0] * (batch.shape[1] - 1)  # inputs are batch[:, :-1]
    return tokens / seconds, seconds, torch.cuda.max_memory_allocated() / 2**30


def decode_part(repeats: int = 3) -> None:
    from palm_rlhf.generation import SamplingConfig, generate
    from palm_rlhf.model import PaLM

    torch.manual_seed(0)
    ours = PaLM(dim=gen_bench.DIM, num_tokens=gen_bench.VOCAB, depth=gen_bench.DEPTH, heads=gen_bench.HEADS,
                dim_head=gen_bench.DIM_HEAD).to("cuda", torch.bfloat16).eval()
    llama_model = None

    def ours_run(prompts, compile):
        out = generate(ours, prompts, SamplingConfig(max_new_tokens=gen_bench.NEW, temperature=1.0), compile=compile)
        assert out.tokens.shape[1] == gen_bench.NEW

    def llama_run(prompts):
        with torch.inference_mode():
            out = llama_model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                       temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=gen_bench.NEW,
                                       min_new_tokens=gen_bench.NEW, use_cache=True, pad_token_id=0)
        assert out.shape[1] == gen_bench.PROMPT + gen_bench.NEW

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=gen_bench.VOCAB, hidden_size=gen_bench.DIM, intermediate_size=4 * gen_bench.DIM,
                      num_hidden_layers=gen_bench.DEPTH, num_attention_heads=gen_bench.HEADS, num_key_value_heads=1,
                      head_dim=gen_bench.DIM_HEAD, max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    llama_model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    systems = {"ours eager": lambda p: ours_run(p, False), "ours compiled": lambda p: ours_run(p, True),
               "llama": llama_run}
    print(f"\n## decode, bf16, config S, prompt {gen_bench.PROMPT}, {gen_bench.NEW} new tokens, median of {repeats}")
    print("| batch | " + " | ".join(f"{s} tok/s" for s in systems) + " | ours eager / llama | ours compiled / llama |")
    print("| --- |" + " --- |" * (len(systems) + 2))
    for batch in (1, 8):
        prompts = [torch.randint(1, gen_bench.VOCAB, (gen_bench.PROMPT,)) for _ in range(batch)]
        prompt_tensor = torch.stack(prompts).cuda()
        for name, run in systems.items():  # warm-up (compiles the decode step)
            run(prompt_tensor if name == "llama" else prompts)
        times = {name: [] for name in systems}
        for _ in range(repeats):
            for name, run in systems.items():
                times[name] += timed(lambda: run(prompt_tensor if name == "llama" else prompts), 1)
        tps = {name: batch * gen_bench.NEW / statistics.median(ts) for name, ts in times.items()}
        print(f"| {batch} | " + " | ".join(f"{tps[s]:,.0f}" for s in systems)
              + f" | {tps['ours eager'] / tps['llama']:.2f}x | {tps['ours compiled'] / tps['llama']:.2f}x |", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["peak", "train", "decode", "memory"],
                   choices=["peak", "train", "decode", "memory"])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (these figures need a GPU)")
        return
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    peak = bf16_peak()
    print(f"measured bf16 matmul peak (8192^3 torch.mm, median of 10): {peak / 1e12:.0f} TFLOP/s", flush=True)
    if "train" in args.parts:
        train_part(peak)
    if "decode" in args.parts:
        decode_part()
    if "memory" in args.parts:
        print("\n## memory: one fp32 training step, batch 1, peak CUDA allocation above the step's start")
        print(mem_bench.table([2048, 8192], "cuda", systems=("ours", "llama")), flush=True)


if __name__ == "__main__":
    main()
