"""`palm-rlhf pretrain`: train a PaLM from scratch (or continue one) on a text corpus."""

from __future__ import annotations

import argparse
import json

EXAMPLES = """examples:
  palm-rlhf pretrain --config configs/pretrain/tiny-stdlib.yaml          # ~1 minute on 2 CPU cores
  palm-rlhf pretrain --config configs/pretrain/shakespeare.yaml max_steps=2000 optim.lr=1e-3
  palm-rlhf pretrain --config tiny-stdlib      # a preset shipped in the package, by name, from any directory
  palm-rlhf pretrain data.sources=[my_corpus_dir] model.dim=512 model.depth=8 out_dir=runs/mine
  palm-rlhf pretrain --config configs/pretrain/tiny-stdlib.yaml --resume   # continue OUT/checkpoints/latest
  torchrun --nproc_per_node 2 -m palm_rlhf pretrain --config configs/pretrain/shakespeare.yaml batch_size=8

Overrides are dotted KEY=VALUE pairs (optim.lr=1e-3, model.depth=2, data.sources=[a.txt,b.txt]).
An existing run directory resumes automatically (resume=auto); resume=never starts over.
Writes OUT/metrics.jsonl, OUT/checkpoints/step_*/ and OUT/final/ (PaLM.from_pretrained(OUT/final)).
Exit codes: 0 done, 2 bad config/data, 3 training failed (NaN loss), 130 interrupted (checkpoint saved).
"""


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a PaLM on text (resumable, torchrun-ready)", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file or packaged preset name, e.g. configs/pretrain/tiny-stdlib.yaml or tiny-stdlib")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--resume", action="store_true", help="require a checkpoint to continue from (resume=auto "
                   "already continues when one exists)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run_trainer(trainer_cls, config, require_checkpoint: bool) -> int:
    """Shared by pretrain and finetune: setup, train, cleanup, print a JSON summary, exit code."""
    from ..errors import CheckpointError

    trainer = trainer_cls(config)
    try:
        trainer.setup()
        if require_checkpoint and trainer.step == 0:
            raise CheckpointError(f"--resume: no checkpoint in {config.out_dir}/checkpoints; drop --resume to start")
        summary = trainer.train()
    finally:
        trainer.cleanup()
    if trainer.is_main:
        print(json.dumps({"out_dir": config.out_dir, **summary}))
    return 130 if summary.get("interrupted") else 0


def run(args) -> int:
    from ..runtime.config import load_config
    from ..trainers.pretrain import PretrainConfig, PretrainTrainer

    overrides = list(args.overrides) + (["progress=false"] if args.no_progress else [])
    if args.resume:
        overrides.append("resume=auto")
    config = load_config(PretrainConfig, args.config, overrides)
    return run_trainer(PretrainTrainer, config, require_checkpoint=args.resume)
