"""Where one serving decode step goes: torch.profiler over `DecodeBatch.step` + sampling at 16 rows.

    python benchmarks/decode_profile.py                 # config-S Llama (vocabulary 32,000), 16 rows, 2 threads
    python benchmarks/decode_profile.py --rows 8 --threads 1

It writes the Llama checkpoint of `benchmarks/serve.py --family llama` (random weights) to a
temporary directory, loads it as `palm-rlhf serve` does, joins `--rows` rows of 40-token prompts to
the server's decode batch, decodes 60 warm-up steps, then profiles `--steps` steps of what the
engine does per step: the batch's decode step and sampling each row from its logits (temperature 1,
as the serving benchmark's requests). Prints the ms per step and the top operators by self time.
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
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from torch.profiler import ProfilerActivity, profile

    from palm_rlhf.generation import SamplingConfig, process_logits, sample
    from palm_rlhf.serving.batch import DecodeBatch
    from palm_rlhf.serving.loading import load_for_inference
    from serve import write_family_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="decode-profile-"))
    try:
        model = load_for_inference(write_family_checkpoint(tmp / "llama")).model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the weights are in memory by now
    batch = DecodeBatch(model, 1024, 64)
    config = SamplingConfig(max_new_tokens=1, temperature=1.0)
    rng = random.Random(0)
    with torch.inference_mode():
        for _ in range(args.rows):
            _, packed = batch.prefill([[rng.randrange(256) for _ in range(40)]])
            batch.join(object(), *packed.prompt(0))
        tokens = torch.randint(0, 256, (len(batch.rows),))

        def step():
            logits = batch.step(tokens)
            return sample(process_logits(logits, config), False, uniform=torch.rand(len(logits), dtype=torch.float64))

        for _ in range(60):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{args.rows} rows, {args.threads} threads, torch {torch.__version__}: "
          f"{total / args.steps / 1000:.1f} ms per step (self CPU time, profiler on)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
