"""`palm-rlhf pretrain`: train a PaLM from scratch (or continue one) on a text corpus."""

from __future__ import annotations

from .dialect import add_training_command, import_object, run_trainer

EXAMPLES = """examples:
  palm-rlhf pretrain --config tiny-stdlib                  # ~1 minute on 2 CPU cores
  palm-rlhf pretrain --config shakespeare max_steps=2000 optim.lr=1e-3
  palm-rlhf pretrain --config tiny-stdlib data.sources=[my_corpus_dir] model.dim=512 model.depth=8 out_dir=runs/mine
  palm-rlhf pretrain --config tiny-stdlib data.tokenizer=tok/ out_dir=runs/base   # a BPE tokenizer
  palm-rlhf pretrain --config tiny-stdlib resume=must      # continue OUT/checkpoints/latest, error if none
  palm-rlhf pretrain --config tiny-stdlib --print-config   # the resolved config, as YAML
  torchrun --nproc_per_node 2 -m palm_rlhf pretrain --config shakespeare batch_size=16   # 8 per process

An existing run directory resumes automatically (resume=auto); resume=never starts over.
Writes OUT/config.yaml, OUT/metrics.jsonl, OUT/checkpoints/step_*/ and OUT/final/ (PaLM.from_pretrained).
Exit codes: 0 done, 2 bad config/data, 3 training failed (NaN loss), 130 interrupted (checkpoint saved).
"""


def register(sub) -> None:
    add_training_command(sub, "pretrain", help="pretrain a PaLM on text (resumable, torchrun-ready)",
                         examples=EXAMPLES, config="palm_rlhf.trainers.pretrain.PretrainConfig", run=run)


def check_sources(config, preset: str | None) -> None:
    """A preset's data path that is missing here: say which key to set, before any work."""
    from pathlib import Path

    from ..errors import DataError

    missing = [s for s in config.data.sources if s != "stdlib" and not Path(s).exists()]
    if missing:
        origin = f"--config {preset} reads" if preset else "data.sources names"
        raise DataError(f"{origin} {missing[0]}, which does not exist here ({Path.cwd()}); point it at your "
                        f"text with data.sources=[path/to/corpus.txt] (files or directories) or data.sources=[stdlib]")


def run(args, config) -> int:
    check_sources(config, args.config)
    return run_trainer(import_object("palm_rlhf.trainers.pretrain.PretrainTrainer")(config), config.out_dir)
