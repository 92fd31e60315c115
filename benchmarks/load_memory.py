"""Peak memory while loading a Llama-family checkpoint: ours against transformers.

    python benchmarks/load_memory.py                  # a ~0.5 GB fp32 checkpoint
    python benchmarks/load_memory.py --layers 4       # smaller

transformers writes one random Llama checkpoint (model.safetensors, fp32) to a temporary
directory. Each loader then runs in a fresh process that first imports torch, palm_rlhf and
transformers (their memory is the baseline), then loads the checkpoint; the process reports its
peak resident memory (`VmHWM`) after the load. The figure is (peak - baseline) / the
weights' bytes: 1.0 means the load never held more than the model itself. The target is at
most 1.3 (docs/models.md). Repeats alternate the loaders; medians are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, torch, transformers, palm_rlhf
from palm_rlhf.model import PaLM
torch.set_num_threads(1)
which, path = sys.argv[1], sys.argv[2]
def high_water():  # this process's peak resident memory (ru_maxrss would include the parent's, from fork)
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
before = high_water()
if which == "ours":
    model = PaLM.from_pretrained(path)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
with torch.no_grad():  # transformers maps the file lazily: a forward touches every weight, as a user's first call
    model(torch.zeros(1, 1, dtype=torch.long))
peak = high_water()
weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
print(json.dumps({"baseline": before, "peak": peak, "weights": weights}))
"""


def write_checkpoint(layers: int) -> str:
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                      num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    directory = tempfile.mkdtemp(prefix="palm-rlhf-load-")
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    directory = write_checkpoint(args.layers)
    ratios = {"ours": [], "transformers": []}
    weights = 0
    for _ in range(args.repeats):
        for which in ratios:
            out = subprocess.run([sys.executable, "-c", CHILD, which, directory], capture_output=True, text=True,
                                 check=True)
            m = json.loads(out.stdout.strip().splitlines()[-1])
            weights = m["weights"]
            ratios[which].append((m["peak"] - m["baseline"]) / m["weights"])
    print(f"checkpoint: {args.layers} layers, {weights / 2**20:.0f} MiB of fp32 weights, in {directory}")
    print("| loader | peak RSS above baseline / weights (median) | range |")
    print("| --- | --- | --- |")
    for which, values in ratios.items():
        print(f"| {which} | {statistics.median(values):.2f}x | {min(values):.2f}-{max(values):.2f} |")


if __name__ == "__main__":
    main()
