"""`palm-rlhf finetune`: supervised finetuning (full or LoRA) on prompt/response JSONL."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  palm-rlhf finetune --base runs/tiny-stdlib/final --data sft.jsonl --config configs/finetune/lora.yaml
  palm-rlhf finetune --base runs/pretrain/final --data sft.jsonl lora.scope= optim.lr=1e-4   # full finetune
  palm-rlhf finetune --base runs/pretrain/final --data sft.jsonl --val-data val.jsonl out_dir=runs/sft2
  torchrun --nproc_per_node 2 -m palm_rlhf finetune --base runs/pretrain/final --data sft.jsonl batch_size=4

Each line of --data is {"prompt": "...", "response": "..."}; the loss covers the response and the EOS
appended to it. With lora.scope=NAME only that LoRA scope trains; OUT/final holds the merged model and
OUT/final/adapter.safetensors the scope alone. Resumes from OUT/checkpoints/latest (resume=never starts over).
"""


def register(sub) -> None:
    p = sub.add_parser("finetune", help="supervised finetuning (SFT) on prompt/response JSONL, full or LoRA",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None, help="base model: a PaLM.save_pretrained directory")
    p.add_argument("--data", default=None, help="JSONL of {\"prompt\", \"response\"} lines")
    p.add_argument("--val-data", default=None, help="held-out JSONL (default: hold out val_fraction of --data)")
    p.add_argument("--config", default=None, help="YAML file or packaged preset name, e.g. configs/finetune/lora.yaml or lora")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--resume", action="store_true", help="require a checkpoint to continue from")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..runtime.config import load_config
    from ..trainers.finetune import FinetuneConfig, FinetuneTrainer
    from .pretrain import run_trainer

    overrides = [f"{k}={v}" for k, v in (("base", args.base), ("data", args.data), ("val_data", args.val_data))
                 if v is not None]
    overrides += list(args.overrides) + (["progress=false"] if args.no_progress else [])
    config = load_config(FinetuneConfig, args.config, overrides)
    return run_trainer(FinetuneTrainer, config, require_checkpoint=args.resume)
