"""`palm-rlhf reward train|score`: train a reward model on preferences, or score a JSONL file."""

from __future__ import annotations

import argparse
import json

from .dialect import add_training_command, import_object, run_trainer

TRAIN_EXAMPLES = """examples:
  palm-rlhf reward train --config pairwise model=runs/sft data=prefs.jsonl out_dir=runs/rm
  palm-rlhf reward train --config full_finetune model=runs/sft data=prefs.jsonl max_steps=500 optim.lr=3e-4
  palm-rlhf reward train --config ratings model=runs/sft data=ratings.jsonl out_dir=runs/rm-ratings
  torchrun --nproc_per_node 2 -m palm_rlhf reward train --config pairwise model=runs/sft data=prefs.jsonl

model= is a run directory (its final/), a final/ or a checkpoint step directory; its saved tokenizer
is used unless tokenizer= says otherwise. Training resumes from the latest checkpoint in out_dir when
one exists (resume=never starts over). The reward model is written to OUT/final
(RewardModel.from_pretrained(OUT/final); `reward score OUT` and `ppo reward_model=OUT` take OUT).
"""

SCORE_EXAMPLES = """examples:
  palm-rlhf reward score runs/rm --data responses.jsonl --out scores.jsonl
  palm-rlhf reward score runs/rm --data prefs.jsonl --out scored.jsonl   # also prints accuracy

Input lines: {"prompt": ..., "response": ...} or {"prompt": ..., "chosen": ..., "rejected": ...};
each output line is the input plus "reward" (or "chosen_reward" and "rejected_reward").
"""


def register(sub) -> None:
    group = sub.add_parser("reward", help="train a reward model on preferences, or score responses with one",
                           epilog=TRAIN_EXAMPLES + "\n" + SCORE_EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = group.add_subparsers(dest="reward_command", metavar="ACTION", title="actions")
    group.set_defaults(func=lambda args: (group.print_help(), 2)[1])

    add_training_command(actions, "train", help="train on pairwise preferences (Bradley-Terry) or ratings",
                         examples=TRAIN_EXAMPLES, config="palm_rlhf.trainers.reward.RewardTrainConfig", run=run_train)

    s = actions.add_parser("score", help="score prompt/response pairs in a JSONL file",
                           epilog=SCORE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("checkpoint", help="a reward model: its run directory (runs/rm), final/ or a checkpoint step "
                   "directory")
    s.add_argument("--data", required=True, help="JSONL of prompt/response or prompt/chosen/rejected lines")
    s.add_argument("--out", required=True, help="where to write the scored JSONL")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--max-len", type=int, default=None, help="truncate prompt+response to this many tokens")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    s.set_defaults(func=run_score)


def run_train(args, config) -> int:
    return run_trainer(import_object("palm_rlhf.trainers.reward.RewardTrainer")(config), config.out_dir)


def run_score(args) -> int:
    import torch

    from ..errors import ConfigError
    from ..model.reward import RewardModel
    from ..runtime.resolve import load_tokenizer_for, resolve_model
    from ..trainers.reward_score import score_file

    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size {args.batch_size}: must be a positive integer")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise ConfigError(f"--device {args.device!r}: {e}") from None
    source = resolve_model(args.checkpoint)
    model = RewardModel.from_pretrained(source.model_dir, map_location=device).eval()
    summary = score_file(model, load_tokenizer_for(source), args.data, args.out,
                         batch_size=args.batch_size, max_len=args.max_len)
    print(json.dumps({"out": args.out, **summary}))
    return 0
