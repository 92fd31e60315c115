"""Generation throughput: ours vs the seed package vs Hugging Face Llama.

    python benchmarks/generate.py                       # everything (several minutes)
    python benchmarks/generate.py --systems ours llama  # skip the slow seed package
    python benchmarks/generate.py --batches 1 --dtypes fp32 --repeats 5
    python benchmarks/generate.py --systems ours ours-plain   # the CPU backend vs the plain engine
    python benchmarks/generate.py --family llama --dtypes fp32   # a Llama-family checkpoint: ours vs transformers

Config (issue 3): dim 384, depth 6, heads 6, dim_head 64, vocab 256, random
weights; 64-token prompts, 256 new tokens, sampling at temperature 1 with no
filters. All systems run in one process, interleaved (ours, seed, llama, ours,
...), and the median of the repeats is reported with ratios. Llama is
`transformers.LlamaForCausalLM` of matched size: hidden 384, 6 layers, 6 heads
with one key/value head (multi-query, like PaLM), SwiGLU width 1536, tied
embeddings, its own KV cache. `ours` decodes with the default backend ("auto": the
CPU backend on a CPU), `ours-plain` with `model.backend = "plain"` (the model's
own block forward per token).

`--family llama`: one Llama-family checkpoint (config S: hidden 384, 6 layers, 6 heads, 2 key/value
heads, SwiGLU width 1024, vocabulary 32,000, untied embeddings, random weights) is written by
transformers to a temporary directory; `ours` loads it with `PaLM.from_pretrained` (our decoder,
plain engine) and `llama` with `AutoModelForCausalLM.from_pretrained`: the same weights on both.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

DIM, DEPTH, HEADS, DIM_HEAD, VOCAB = 384, 6, 6, 64, 256
PROMPT, NEW = 64, 256
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_ours(dtype, backend="auto"):
    from palm_rlhf.generation import SamplingConfig, generate
    from palm_rlhf.model import PaLM

    model = PaLM(dim=DIM, num_tokens=VOCAB, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD).to(dtype).eval()
    model.backend = backend
    config = SamplingConfig(max_new_tokens=NEW, temperature=1.0)

    def run(prompts, new_tokens=NEW):
        cfg = config if new_tokens == NEW else SamplingConfig(max_new_tokens=new_tokens)
        out = generate(model, prompts, cfg)
        assert out.tokens.shape[1] == new_tokens
    return run


def build_seed(dtype):
    from palm_rlhf_pytorch import PaLM as SeedPaLM

    model = SeedPaLM(dim=DIM, num_tokens=VOCAB, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD).to(dtype).eval()

    def run(prompts, new_tokens=NEW):
        out = model.generate(PROMPT + new_tokens, prompts, temperature=1.0, filter_logits_fn=None)
        assert out.shape[1] == new_tokens
    return run


def build_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=4 * DIM, num_hidden_layers=DEPTH,
                      num_attention_heads=HEADS, num_key_value_heads=1, head_dim=DIM_HEAD,
                      max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=None, pad_token_id=0)
    return hf_runner(LlamaForCausalLM(cfg).to(dtype).eval())


def hf_runner(model):
    """Sampling with transformers' `generate` (its KV cache), every row to exactly the new-token count."""

    def run(prompts, new_tokens=NEW):
        with torch.inference_mode():
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, use_cache=True, pad_token_id=0)
        assert out.shape[1] == PROMPT + new_tokens
    return run


FAMILY_DIR = None  # set by --family: the checkpoint both systems load


def write_family_checkpoint(family: str) -> str:
    import tempfile

    import transformers

    if family != "llama":
        raise SystemExit(f"--family {family}: only llama is benchmarked")
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    directory = tempfile.mkdtemp(prefix="palm-rlhf-bench-llama-")
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)
    return directory


def build_family_ours(dtype):
    from palm_rlhf.generation import SamplingConfig, generate
    from palm_rlhf.model import PaLM

    model = PaLM.from_pretrained(FAMILY_DIR, dtype=dtype).eval()

    def run(prompts, new_tokens=NEW):
        out = generate(model, prompts, SamplingConfig(max_new_tokens=new_tokens, temperature=1.0))
        assert out.tokens.shape[1] == new_tokens
    return run


def build_family_hf(dtype):
    from transformers import AutoModelForCausalLM

    return hf_runner(AutoModelForCausalLM.from_pretrained(FAMILY_DIR, dtype=dtype).eval())


BUILDERS = {"ours": build_ours, "ours-plain": lambda dtype: build_ours(dtype, "plain"), "seed": build_seed,
            "llama": build_llama}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", default=["ours", "seed", "llama"], choices=list(BUILDERS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--family", choices=["llama"], default=None,
                        help="benchmark a Llama-family checkpoint (ours vs transformers on the same weights)")
    parser.add_argument("--tune-malloc", action="store_true",
                        help="apply the glibc malloc settings the palm-rlhf command uses (to every system)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON (benchmarks/report.py reads it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.tune_malloc:
        from palm_rlhf.cli.allocator import tune_malloc

        print("glibc malloc tuned (palm_rlhf.cli.allocator):", tune_malloc())
    import transformers  # noqa: F401  (import cost outside the timings)

    global FAMILY_DIR
    vocab = VOCAB
    if args.family:
        FAMILY_DIR, vocab = write_family_checkpoint(args.family), 32000
        BUILDERS.update(ours=build_family_ours, llama=build_family_hf)
        args.systems = [s for s in args.systems if s in ("ours", "llama")] or ["ours", "llama"]
        print(f"{args.family} checkpoint (config S, vocabulary 32,000) in {FAMILY_DIR}; systems {args.systems}")

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, prompt {PROMPT}, new tokens {NEW}")
    results = {}
    for dtype_name in args.dtypes:
        torch.manual_seed(0)
        runners = {name: BUILDERS[name](DTYPES[dtype_name]) for name in args.systems}
        for batch in args.batches:
            prompts = torch.randint(1, vocab, (batch, PROMPT))
            for run in runners.values():
                run(prompts, new_tokens=8)  # warm-up: allocator, kernels, lazy imports
            times = {name: [] for name in runners}
            for _ in range(args.repeats):
                for name, run in runners.items():  # interleaved
                    start = time.perf_counter()
                    run(prompts)
                    times[name].append(time.perf_counter() - start)
            for name, ts in times.items():
                results[(dtype_name, batch, name)] = batch * NEW / statistics.median(ts)
            line = ", ".join(f"{n} {results[(dtype_name, batch, n)]:.0f}" for n in runners)
            print(f"{dtype_name} batch {batch}: tok/s (median of {args.repeats}): {line}", flush=True)

    print("\n| dtype | batch | " + " | ".join(f"{n} tok/s" for n in args.systems) + " | "
          + " | ".join(f"ours / {n}" for n in args.systems if n != "ours") + " |")
    print("| --- " * (2 + len(args.systems) + len(args.systems) - 1) + "|")
    for dtype_name in args.dtypes:
        for batch in args.batches:
            row = [results[(dtype_name, batch, n)] for n in args.systems]
            cells = [f"{v:.0f}" for v in row]
            if "ours" in args.systems:
                ours = results[(dtype_name, batch, "ours")]
                cells += [f"{ours / results[(dtype_name, batch, n)]:.2f}x" for n in args.systems if n != "ours"]
            print(f"| {dtype_name} | {batch} | " + " | ".join(cells) + " |")
    if args.json:
        rows = [{"dtype": d, "batch": b, "system": s, "tok_s": v} for (d, b, s), v in results.items()]
        write_json(args.json, {"benchmark": "generate", "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "family": args.family, "repeats": args.repeats, "new_tokens": NEW, "rows": rows})


def write_json(path: str, payload: dict) -> None:
    import json

    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


if __name__ == "__main__":
    main()
