"""Serving throughput and latency: `palm-rlhf serve` vs HF transformers' pipeline behind the same API.

    python benchmarks/serve.py                          # levels 1 4 16 64, 2 repeats (many minutes)
    python benchmarks/serve.py --levels 1 16 --repeats 1 --systems ours
    python benchmarks/serve.py --levels 16 --repeats 5 --systems ours ours-workers hf
    python benchmarks/serve.py --family llama --levels 1 16 --threads 1   # one Llama checkpoint for both

Model: config S of issue 4 (dim 384, depth 6, heads 6, dim_head 64, vocab 256, random weights),
and for HF the matched-size `LlamaForCausalLM` of benchmarks/generate.py (one key/value head,
SwiGLU 1536, tied embeddings) run by `transformers.pipeline("text-generation")` over a byte-level
tokenizer. Both are served by the same HTTP app (`palm_rlhf.serving.app`), each in its own
subprocess: ours with its continuous-batching engine, HF with `HFEngine` below, which gathers
waiting requests (up to --max-batch) and runs them as one pipeline call (static batching, every
row decoding to the longest max_tokens; a pipeline cannot stream, so a reply arrives whole).

Ours runs `palm-rlhf serve` with its defaults (a stream sends a chunk at most every 20 ms,
first tokens and finishes at once; `--systems ours-every-token` adds ours with a chunk per decode
step, `ours-workers` ours with `--workers 2`: two engine processes of one thread each). On a
busy 2-core machine pass `--threads 1`: the client, the HTTP thread and other jobs share the
cores, and two torch threads waiting for each other cost both servers far more than they gain
(HF's 16-client batch took 11-39 s instead of 1.4 s under load).

Load: for each level c, c clients each send `--per-client` streamed completion requests one
after another (prompts of 8-64 tokens, max_tokens 32-96 averaging 64, `ignore_eos` so every
request gets its full length, a seed each, `logprobs: 0` so that every token is a chunk even when
its text is held back, e.g. half a UTF-8 character); then the same requests one at a time. Reported per
system and level, medians over repeats (runs interleaved: ours, hf, ours, hf ...): total
completion tokens/s, p50/p95 time to first token (TTFT), p50/p95 per-token latency after the
first, and the ratios concurrent/sequential and ours/hf.

`--family llama`: both servers load one Llama-family checkpoint directory written here (config S:
hidden 384, 6 layers, 6 heads, 2 key/value heads, SwiGLU 1024, vocabulary 32,000, random weights)
with one tokenizer.json beside it (the 256 byte-level symbols, 31,743 filler tokens and an EOS):
ours runs `palm-rlhf serve DIR`, HF `pipeline("text-generation")` over
`AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import torch

DIM, DEPTH, HEADS, DIM_HEAD, VOCAB = 384, 6, 6, 64, 256
HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------- the HF side


def build_hf_pipeline():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, pipeline

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=alphabet[0], padding_side="left")
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=4 * DIM, num_hidden_layers=DEPTH,
                      num_attention_heads=HEADS, num_key_value_heads=1, head_dim=DIM_HEAD,
                      max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    return pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")


def write_family_checkpoint(directory: Path) -> Path:
    """A config-S Llama checkpoint with a 32,000-token byte-level tokenizer, as a downloaded one would be."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({f"<filler{i}>": len(alphabet) + i for i in range(32000 - 1 - len(alphabet))})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken("<|eos|>", special=True)])  # id 31999
    directory.mkdir(parents=True, exist_ok=True)
    tk.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|eos|>", "pad_token": "<|eos|>"}))
    cfg = LlamaConfig(vocab_size=32000, hidden_size=DIM, intermediate_size=1024, num_hidden_layers=DEPTH,
                      num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=31999, pad_token_id=31999)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    return directory


def build_hf_family_pipeline(directory):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(directory, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")


class HFEngine:
    """The `serving.Engine` interface over a transformers pipeline: static batches, whole replies."""

    def __init__(self, pipe, *, context: int, max_batch: int):
        self.pipe, self.context, self.max_batch = pipe, context, max_batch
        self.waiting: deque = deque()
        self.cond = threading.Condition()
        self.thread = None
        self.running = False
        self.steps = 0
        self.active_rows = 0

    def start(self):
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        with self.cond:
            self.running = False
            self.cond.notify_all()

    def queued_rows(self) -> int:
        return len(self.waiting)

    def submit(self, prompt, params, n=1, sink=None):
        from palm_rlhf.serving.engine import Request

        request = Request(list(prompt), params, n, sink)
        with self.cond:
            self.waiting.append(request)
            self.cond.notify_all()
        return request

    def _run(self):
        from palm_rlhf.serving.engine import Delta

        while self.running:
            with self.cond:
                while self.running and not self.waiting:
                    self.cond.wait(0.5)
                deadline = time.monotonic() + 0.01
                while self.running and len(self.waiting) < self.max_batch and time.monotonic() < deadline:
                    self.cond.wait(max(deadline - time.monotonic(), 0.0))
                batch = [self.waiting.popleft() for _ in range(min(self.max_batch, len(self.waiting)))]
            if not batch:
                continue
            self.active_rows = len(batch)
            longest = max(r.params.max_tokens for r in batch)
            texts = [bytes(r.prompt).decode("latin-1") for r in batch]
            with torch.inference_mode():
                outs = self.pipe(texts, batch_size=len(texts), max_new_tokens=longest, min_new_tokens=longest,
                                 do_sample=True, temperature=1.0, top_k=0, top_p=1.0, return_full_text=False)
            self.steps += longest
            self.active_rows = 0
            for r, out in zip(batch, outs):
                text = out[0]["generated_text"] if isinstance(out, list) else out["generated_text"]
                for i in range(r.n):
                    r.sink(Delta(i, text, "length", [], r.params.max_tokens))


def hf_server(max_batch: int, family_dir: str | None = None) -> None:
    from palm_rlhf.data.tokenizer import ByteTokenizer, load_tokenizer
    from palm_rlhf.feedback.server import bind, serve
    from palm_rlhf.serving import ChatTemplate
    from palm_rlhf.serving.app import create_app

    pipe = build_hf_family_pipeline(family_dir) if family_dir else build_hf_pipeline()
    engine = HFEngine(pipe, context=1024, max_batch=max_batch)
    tokenizer = load_tokenizer(family_dir) if family_dir else ByteTokenizer()
    app = create_app(engine, tokenizer, model_name="llama", template=ChatTemplate())
    sock = bind("127.0.0.1", 0)
    print(f"serving llama on http://127.0.0.1:{sock.getsockname()[1]}/v1", flush=True)
    serve(app, sock)


# ---------------------------------------------------------------------------- servers and load


def start_server(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    """Start a server that prints `serving NAME on http://HOST:PORT/v1 ...`; returns (process, base URL)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("serving "):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc, line.split(" on ")[1].split()[0].removesuffix("/v1")
    raise RuntimeError(f"server did not start: {cmd}")


def make_requests(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = "the of and to in is was that for on with as his he by at it from".split()
    out = []
    for i in range(count):
        n = rng.randint(8, 64)
        prompt = ""
        while len(prompt) < n:
            prompt += rng.choice(words) + " "
        out.append({"prompt": prompt[:n], "max_tokens": rng.randint(32, 96), "seed": seed * 1000 + i,
                    "stream": True, "ignore_eos": True, "temperature": 1.0, "logprobs": 0})
    return out


async def one_request(client, url: str, body: dict) -> dict:
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                if first is None:  # with logprobs every token is a chunk, even one whose text is held back
                    first = time.perf_counter()
                if choice.get("finish_reason"):
                    tokens = body["max_tokens"]
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - start, "per_token": (end - first) / max(tokens - 1, 1), "tokens": tokens}


async def run_load(url: str, requests: list[dict], clients: int) -> dict:
    import httpx

    queue = list(requests)
    results = []
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        async def worker():
            while queue:
                results.append(await one_request(client, url, queue.pop(0)))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start

    def pct(key, q):
        values = sorted(r[key] for r in results)
        return values[min(len(values) - 1, int(q * len(values)))]

    return {"tok_s": sum(r["tokens"] for r in results) / wall, "ttft50": pct("ttft", 0.5), "ttft95": pct("ttft", 0.95),
            "tpot50": pct("per_token", 0.5), "tpot95": pct("per_token", 0.95)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--per-client", type=int, default=1, help="requests each client sends (default 1)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--systems", nargs="+", default=["ours", "hf"], choices=["ours", "ours-every-token", "ours-workers", "hf"],
                    help="ours-every-token: ours with --stream-interval-ms 0 (a chunk per decode step)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each server (0 = default)")
    ap.add_argument("--hf-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="`serve --workers` of the ours-workers system")
    ap.add_argument("--family", choices=["llama"], default=None,
                    help="serve one Llama-family checkpoint (and its tokenizer) with both systems")
    ap.add_argument("--family-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON (benchmarks/report.py reads it)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally` that stops the servers
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.hf_server:
        return hf_server(args.max_batch, args.family_dir)

    from palm_rlhf.model import PaLM

    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    torch.manual_seed(0)
    if args.family:
        write_family_checkpoint(tmp / "model")
    else:
        PaLM(dim=DIM, num_tokens=VOCAB, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD).save_pretrained(tmp / "model")
    family = ["--family-dir", str(tmp / "model")] if args.family else []
    threads = ["--threads", str(args.threads)] if args.threads else []
    procs, urls = [], {}
    try:
        for system in args.systems:
            if system.startswith("ours"):
                extra = {"ours-every-token": ["--stream-interval-ms", "0"],
                         "ours-workers": ["--workers", str(args.workers)]}.get(system, [])
                cmd = [sys.executable, "-m", "palm_rlhf", "serve", str(tmp / "model"), "--port", "0",
                       "--max-batch", str(args.max_batch), *threads, *extra]
            else:
                cmd = [sys.executable, __file__, "--hf-server", "--max-batch", str(args.max_batch), *threads, *family]
            proc, url = start_server(cmd)
            procs.append(proc)
            urls[system] = url
        print(f"torch {torch.__version__}, server threads {args.threads or 'default'}, "
              f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}", flush=True)
        for system in args.systems:  # untimed warm-up: every batch size once (ours builds its buckets)
            warm = [{**r, "max_tokens": 4} for r in make_requests(max(args.levels), seed=0)]
            asyncio.run(run_load(urls[system], warm, max(args.levels)))
            for clients in (1, 2, 4, 8, 16, 32):
                asyncio.run(run_load(urls[system], warm[:clients], clients))
        table: dict = {}
        for level in args.levels:
            requests = make_requests(level * args.per_client, seed=level)
            for rep in range(args.repeats):
                for system in args.systems:
                    for mode, clients in (("concurrent", level), ("sequential", 1)):
                        if mode == "sequential" and level == 1:
                            continue
                        stats = asyncio.run(run_load(urls[system], requests, clients))
                        table.setdefault((system, level, mode), []).append(stats)
                        print(f"  {system:4} c={level:<3} {mode:10} rep {rep}: {stats['tok_s']:7.1f} tok/s  "
                              f"TTFT p50 {stats['ttft50']:.3f}s p95 {stats['ttft95']:.3f}s", flush=True)
        report(table, args)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


def report(table: dict, args) -> None:
    def med(system, level, mode, key):
        runs = table.get((system, level, mode if level > 1 else "concurrent"))
        return statistics.median(r[key] for r in runs) if runs else float("nan")

    print("\n| system | clients | tok/s concurrent | tok/s sequential | ratio | TTFT p50 / p95 (s) "
          "| per-token p50 / p95 (ms) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for level in args.levels:
        for system in args.systems:
            conc, seq = med(system, level, "concurrent", "tok_s"), med(system, level, "sequential", "tok_s")
            print(f"| {system} | {level} | {conc:.1f} | {seq:.1f} | {conc / seq:.2f}x | "
                  f"{med(system, level, 'concurrent', 'ttft50'):.3f} / "
                  f"{med(system, level, 'concurrent', 'ttft95'):.3f} | "
                  + ("whole reply at once |" if system == "hf" else
                     f"{1e3 * med(system, level, 'concurrent', 'tpot50'):.1f} / "
                     f"{1e3 * med(system, level, 'concurrent', 'tpot95'):.1f} |"))
    for ours, other in (("ours", "hf"), ("ours-workers", "hf"), ("ours", "ours-every-token"),
                        ("ours-workers", "ours")):
        if {ours, other} <= set(args.systems):
            for level in args.levels:
                ratio = med(ours, level, "concurrent", "tok_s") / med(other, level, "concurrent", "tok_s")
                print(f"{ours} / {other} tokens/s at {level} clients: {ratio:.2f}x")
    if args.json:
        import json

        rows = [{"system": system, "clients": level, "tok_s_concurrent": med(system, level, "concurrent", "tok_s"),
                 "tok_s_sequential": med(system, level, "sequential", "tok_s"),
                 "ttft_p50_s": med(system, level, "concurrent", "ttft50")}
                for level in args.levels for system in args.systems]
        with open(args.json, "w") as f:
            json.dump({"benchmark": "serve", "torch": torch.__version__, "threads": args.threads,
                       "family": args.family, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
