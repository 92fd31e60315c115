"""Make the model say positive things: PPO on Shakespeare with a sentiment reward.

A byte-level PaLM is pretrained on tinyshakespeare (or loaded with --pretrained). The reward
of a completion is the compound score of the vaderSentiment lexicon (-1 very negative ..
+1 very positive), given to PPO as a plain Python function: no reward model is trained.
The KL penalty to the pretrained model keeps the text Shakespeare-like while the policy
learns to continue each line more warmly. The script prints the mean sentiment of sampled
completions before and after, with examples.

    python examples/shakespeare_sentiment.py            # a few minutes on a laptop CPU
    python examples/shakespeare_sentiment.py --quick    # seconds; what CI runs
    python examples/shakespeare_sentiment.py --data my_corpus.txt --pretrained runs/pretrain/final

Needs `pip install vaderSentiment` (in the `test` extra). The corpus defaults to
<repo>/../shared/data/tinyshakespeare.txt; when it is absent a small built-in text stands in
(the script says so). The pretrained model is saved to OUT/pretrain/final and reused on a re-run.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from common import REPO, log, parser, pretrain, rl_summary, sample_and_score, start, write_summary

from palm_rlhf.data.tokenizer import ByteTokenizer
from palm_rlhf.model import PaLM
from palm_rlhf.trainers.ppo import PPOConfig, PPOTrainer

DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
NEWLINE = 10  # a completion is the rest of the line
PROMPTS = ["Thou art ", "My lord, ", "I am ", "O, ", "What is ", "The king ", "Her eyes ", "This day ",
           "Good morrow, ", "I would ", "Let us ", "Our hearts ", "The world ", "Come, ", "Now, ", "You are "]

# A stand-in when the corpus is missing: short lines in the same layout (name, colon, speech).
BUILTIN = """FIRST CITIZEN:
The day is fair and the bread is good, yet we are hungry.

SECOND CITIZEN:
I am glad of it, for the king is kind and the hour is sweet.

FIRST CITIZEN:
Thou art a sad man and a poor friend, and the night is cold.

SECOND CITIZEN:
Come, let us go; our hearts are light and the world is merry.

LADY:
My lord, I fear the storm, the war, the grief that follows it.

LORD:
Fear not, good lady; love and peace shall keep this house.
"""


def sentiment_reward(analyzer):
    def reward(prompts: list[str], completions: list[str]) -> list[float]:
        """VADER compound score of each completion (the prompt is not scored)."""
        return [analyzer.polarity_scores(c)["compound"] for c in completions]
    return reward


def corpus_file(path: Path, out: Path) -> Path:
    if path.is_file():
        return path
    print(f"NOTE: {path} not found; pretraining on a small built-in text instead (expect weaker results)")
    builtin = out / "builtin.txt"
    builtin.write_text(BUILTIN * 50)
    return builtin


def main() -> int:
    p = parser(__doc__, "shakespeare_sentiment")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="plain-text corpus to pretrain on")
    p.add_argument("--pretrained", default=None, help="a PaLM.save_pretrained directory to start from instead")
    args = p.parse_args()
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        p.error("this example needs the vaderSentiment package: pip install vaderSentiment")
    out = start(args)
    q = args.quick
    tok = ByteTokenizer()
    reward = sentiment_reward(SentimentIntensityAnalyzer())
    t0 = time.perf_counter()

    saved = Path(args.pretrained) if args.pretrained else out / "pretrain" / "final"
    pre = {}
    if (saved / "config.json").is_file():
        log.info("loading the pretrained model from %s", saved)
        model = PaLM.from_pretrained(saved).eval()
    else:
        model, pre = pretrain(out / "pretrain", [corpus_file(Path(args.data), out)],
                              model=dict(dim=32 if q else 128, depth=1 if q else 3, heads=2 if q else 4,
                                         dim_head=16 if q else 32),
                              steps=60 if q else 500, batch_size=16, seq_len=64 if q else 128, seed=args.seed,
                              progress=not q)

    prompts = PROMPTS * (2 if q else 8)
    score = dict(max_new_tokens=16 if q else 32, eos_token=NEWLINE, seed=args.seed + 1)
    before = sample_and_score(model, tok, prompts, reward, **score)
    log.info("before PPO: mean sentiment %.3f", before["mean"])

    shutil.rmtree(out / "ppo", ignore_errors=True)  # a fresh PPO run each time (pretraining is reused)
    config = PPOConfig(out_dir=str(out / "ppo"), max_steps=3 if q else 60, prompts_per_step=16 if q else 32,
                       batch_size=16, epochs=2, max_new_tokens=score["max_new_tokens"], eos_token=NEWLINE,
                       optim={"lr": 3e-3}, critic_lr=3e-3, kl_coef=0.05, sample_every=0 if q else 20, seed=args.seed)
    trainer = PPOTrainer(config, model=model, reward=reward, prompts=PROMPTS, tokenizer=tok)
    history = trainer.setup().train()
    trainer.cleanup()
    after = sample_and_score(model, tok, prompts, reward, scope=trainer.actor_scope, **score)

    summary = {"data": args.data if Path(args.data).is_file() else "built-in text",
               "pretrain_val_loss": pre.get("val/loss"), "rl": rl_summary(history),
               "sentiment_before": before["mean"], "sentiment_after": after["mean"],
               "before": before["samples"], "after": after["samples"], "seconds": round(time.perf_counter() - t0, 1)}
    write_summary(out, summary)
    print(f"mean VADER sentiment of completions: before {before['mean']:+.3f} -> after {after['mean']:+.3f} "
          f"(KL to the reference {summary['rl']['kl_last_steps']:.2f} nats/completion)")
    for b, a in zip(before["samples"], after["samples"]):
        print(f"  {b['prompt']!r}: before {b['completion']!r} ({b['score']:+.2f}) | after {a['completion']!r} "
              f"({a['score']:+.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
