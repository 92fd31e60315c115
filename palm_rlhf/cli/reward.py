"""`palm-rlhf reward train|score`: train a reward model on preferences, or score a JSONL file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TRAIN_EXAMPLES = """examples:
  palm-rlhf reward train --base runs/pretrain/final --data prefs.jsonl
  palm-rlhf reward train --base runs/pretrain/final --data prefs.jsonl --config configs/reward/pairwise.yaml \\
      --out runs/reward --set max_steps=500 lr=3e-4 use_lora=false
  palm-rlhf reward train --base runs/sft/final --data ratings.jsonl --config configs/reward/ratings.yaml
  torchrun --nproc_per_node 2 -m palm_rlhf reward train --base runs/pretrain/final --data prefs.jsonl

Training resumes from the latest checkpoint in --out when one exists (--no-resume starts over).
The final reward model is written to OUT/final (RewardModel.from_pretrained(OUT/final)).
"""

SCORE_EXAMPLES = """examples:
  palm-rlhf reward score runs/reward/final --data responses.jsonl --out scores.jsonl
  palm-rlhf reward score runs/reward/final --data prefs.jsonl --out scored.jsonl   # also prints accuracy

Input lines: {"prompt": ..., "response": ...} or {"prompt": ..., "chosen": ..., "rejected": ...};
each output line is the input plus "reward" (or "chosen_reward" and "rejected_reward").
"""


def register(sub) -> None:
    group = sub.add_parser("reward", help="train a reward model on preferences, or score responses with one",
                           epilog=TRAIN_EXAMPLES + "\n" + SCORE_EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = group.add_subparsers(dest="reward_command", metavar="ACTION", title="actions")
    group.set_defaults(func=lambda args: (group.print_help(), 2)[1])

    t = actions.add_parser("train", help="train on pairwise preferences (Bradley-Terry) or ratings",
                           epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--base", required=True, help="base checkpoint: a PaLM.save_pretrained directory")
    t.add_argument("--data", required=True, help="preference JSONL (see docs/reward.md for the schema)")
    t.add_argument("--config", default=None, help="YAML file or packaged preset name, e.g. configs/reward/pairwise.yaml or pairwise")
    t.add_argument("--out", default=None, help="run directory for checkpoints, metrics and the final model")
    t.add_argument("--val-data", default=None, help="held-out JSONL (default: hold out val_fraction of --data)")
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config fields")
    t.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=run_train)

    s = actions.add_parser("score", help="score prompt/response pairs in a JSONL file",
                           epilog=SCORE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("checkpoint", help="a RewardModel.save_pretrained directory (e.g. runs/reward/final)")
    s.add_argument("--data", required=True, help="JSONL of prompt/response or prompt/chosen/rejected lines")
    s.add_argument("--out", required=True, help="where to write the scored JSONL")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--max-len", type=int, default=None, help="truncate prompt+response to this many tokens")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    s.set_defaults(func=run_score)


def run_train(args) -> int:
    from ..runtime.config import load_config
    from ..trainers.reward import RewardTrainConfig, RewardTrainer

    overrides = [f"base={args.base}", f"data={args.data}", *args.set]
    if args.out:
        overrides.append(f"out_dir={args.out}")
    if args.val_data:
        overrides.append(f"val_data={args.val_data}")
    if args.no_progress:
        overrides.append("progress=false")
    config = load_config(RewardTrainConfig, args.config, overrides)
    trainer = RewardTrainer(config)
    try:
        trainer.setup(resume=not args.no_resume)
        metrics = trainer.train()
    finally:
        trainer.cleanup()
    if trainer.is_main:
        print(json.dumps({"final": str(Path(config.out_dir) / "final"), **metrics}))
    return 0


def run_score(args) -> int:
    import torch

    from ..errors import ConfigError
    from ..model.reward import RewardModel
    from ..data.tokenizer import load_tokenizer_or_bytes
    from ..trainers.reward_score import score_file

    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size {args.batch_size}: must be a positive integer")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise ConfigError(f"--device {args.device!r}: {e}") from None
    model = RewardModel.from_pretrained(args.checkpoint, map_location=device).eval()
    summary = score_file(model, load_tokenizer_or_bytes(args.checkpoint), args.data, args.out,
                         batch_size=args.batch_size, max_len=args.max_len)
    print(json.dumps({"out": args.out, **summary}))
    return 0
