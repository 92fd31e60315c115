"""Peak memory of a reward run's end-of-run saves (the last checkpoint and final/).

    python benchmarks/save_memory.py                 # the 9.8M-parameter Llama of benchmarks/trl.py
    python benchmarks/save_memory.py --lora-r 0      # full finetuning: optimizer state in state.pt

transformers writes a random Llama checkpoint (hidden 384, 6 layers, 6/2 heads, vocabulary 1,024);
`RewardTrainer` sets up a LoRA reward model on it (as `reward train --config pairwise lora.r=8`)
and takes two steps. The process's peak resident memory (`VmHWM`) is then reset
(`/proc/self/clear_refs`) before each save, and the figure is the peak above the resident memory
just before it: what the save itself adds to a run's peak.

2026-12-07, torch 2.13.0+cpu: full finetuning (`--lora-r 0`, 10.2M parameters, AdamW state 78 MiB)
added 75 MiB at the checkpoint when `state.pt` was serialised into memory first, 0 MiB since it
streams into its file; final/ 0 MiB either way; LoRA r 8: 0 MiB either way.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's palm_rlhf


def _status(key: str) -> int:
    return int(open("/proc/self/status").read().split(f"{key}:")[1].split()[0]) // 1024  # MiB


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def added_peak(fn) -> int:
    """MiB that `fn()` adds above the resident memory before it."""
    _reset_peak()
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lora-r", type=int, default=8)
    args = ap.parse_args(argv)

    import torch
    import transformers

    from palm_rlhf.data.preferences import PairwiseRecord, write_preferences
    from palm_rlhf.runtime.config import load_config
    from palm_rlhf.trainers.reward import RewardTrainConfig, RewardTrainer

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="palm-rlhf-save-"))
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(work / "llama")
    write_preferences(work / "pairs.jsonl", [PairwiseRecord(f"{i} + {i} =", f" {2 * i}", f" {i}?") for i in range(64)])

    class Bytes:  # ids < 256 fit the 1,024-token vocabulary
        def encode(self, s):
            return list(s.encode())

    cfg = load_config(RewardTrainConfig, None, [f"model={work / 'llama'}", f"data={work / 'pairs.jsonl'}",
                                                f"out_dir={work / 'run'}", f"lora.r={args.lora_r}", "max_steps=2",
                                                "batch_size=8", "eval.fraction=0.0", "progress=false"])
    trainer = RewardTrainer(cfg, tokenizer=Bytes()).setup()
    try:
        for _ in range(2):
            trainer.run.advance(trainer)
        params = sum(p.numel() for p in trainer.model.parameters())
        checkpoint = added_peak(lambda: trainer.run.save_checkpoint(trainer))
        final = added_peak(lambda: trainer.run.write_final(trainer))
    finally:
        trainer.cleanup()
    weights = sum(p.numel() * p.element_size() for p in trainer.model.state_dict().values()) / 2**20
    print(json.dumps({"parameters": params, "weights_mib": round(weights, 1), "lora_r": args.lora_r,
                      "checkpoint_added_mib": checkpoint, "final_added_mib": final}))


if __name__ == "__main__":
    main()
