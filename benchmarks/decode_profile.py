"""Where one serving decode step goes: torch.profiler over `DecodeBatch.step` + sampling at 16 rows.

    python benchmarks/decode_profile.py                 # config-S Llama (vocabulary 32,000), 16 rows, 2 threads
    python benchmarks/decode_profile.py --rows 8 --threads 1
    python benchmarks/decode_profile.py --prefill                  # the server's packed prefill of 16 prompts

It writes the Llama checkpoint of `benchmarks/serve.py --family llama` (random weights) to a
temporary directory, loads it as `palm-rlhf serve` does, joins `--rows` rows of 40-token prompts to
the server's decode batch, decodes 60 warm-up steps, then profiles `--steps` steps of what the
engine does per step: the batch's decode step and sampling each row from its logits (temperature 1,
as the serving benchmark's requests). Prints the ms per step and the top operators by self time.
`--prefill`: instead, the packed prefill of the serving benchmark's 16 prompts (539 tokens);
`--backend plain`: the model's own forward for every step (what a GPU runs).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", action="store_true", help="profile the packed prefill of 16 prompts instead")
    ap.add_argument("--backend", default="auto", choices=["auto", "plain", "cpu"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from torch.profiler import ProfilerActivity, profile

    from palm_rlhf.generation import SamplingConfig, process_logits, sample
    from palm_rlhf.serving.batch import DecodeBatch
    from palm_rlhf.serving.loading import load_for_inference
    from serve import make_requests, write_family_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="decode-profile-"))
    try:
        loaded = load_for_inference(write_family_checkpoint(tmp / "llama"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the weights are in memory by now
    model = loaded.model
    model.backend = args.backend
    batch = DecodeBatch(model, 1024, 64)
    config = SamplingConfig(max_new_tokens=1, temperature=1.0)
    rng = random.Random(0)
    with torch.inference_mode():
        for _ in range(args.rows):
            _, packed = batch.prefill([[rng.randrange(256) for _ in range(40)]])
            batch.join(object(), *packed.prompt(0))
        tokens = torch.randint(0, 256, (len(batch.rows),))

        def step():
            if args.prefill:
                return batch.prefill(prompts)
            logits = batch.step(tokens)
            return sample(process_logits(logits, config), False, uniform=torch.rand(len(logits), dtype=torch.float64))

        prompts = [loaded.tokenizer.encode(r["prompt"]) for r in make_requests(16, seed=16)]
        for _ in range(5 if args.prefill else 60):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    what = f"prefill of 16 prompts, backend {args.backend}" if args.prefill else f"{args.rows} rows"
    print(f"{what}, {args.threads} threads, torch {torch.__version__}: "
          f"{total / args.steps / 1000:.1f} ms per step (self CPU time, profiler on)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
