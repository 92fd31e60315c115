"""GRPO with a verifiable reward: a program checks the model's arithmetic.

A byte-level PaLM is pretrained briefly on lines like "17+25=42", just long enough to learn the
format and get some sums right. GRPO then samples `group_size` answers per prompt "a+b=", and a
checker scores each answer: 1 for the right sum, otherwise partial credit of 0.5 x the share of
the sum's digits that are right and in the right place. Each answer is compared only with the
other answers to its own prompt (group-relative advantages), so no critic and no reward model is
needed. The script prints the reward curve, then the mean reward and exact-match accuracy of
sampled answers before and after.

    python examples/grpo_verifiable.py           # a few minutes on a laptop CPU
    python examples/grpo_verifiable.py --quick   # seconds; what CI runs
"""

from __future__ import annotations

import random
import re
import shutil
import time

from common import log, parser, pretrain, rl_summary, sample_and_score, start, write_summary

from palm_rlhf.data.tokenizer import ByteTokenizer
from palm_rlhf.trainers.grpo import GRPOConfig, GRPOTrainer

NEWLINE = 10  # "\n" ends every equation, so it is the EOS of an answer

PROMPT = re.compile(r"^(\d+)\+(\d+)=$")


def check_answers(prompts: list[str], completions: list[str]) -> list[float]:
    """The verifier: 1.0 for the exact sum; else 0.5 * (digits right in the right place) / (digits of the sum).
    "3+4=" -> "7": 1.0; "12+30=" -> "41": 0.25 ("4" right, "1" wrong); "12+30=" -> "x": 0.0."""
    scores = []
    for prompt, answer in zip(prompts, completions):
        a, b = map(int, PROMPT.match(prompt).groups())
        target, answer = str(a + b), answer.strip()
        if answer == target:
            scores.append(1.0)
        else:
            right = sum(x == y for x, y in zip(answer, target))
            scores.append(0.5 * right / len(target))
    return scores


def exact_answers(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 for the exact sum, else 0.0 (the accuracy the partial credit is shaping towards)."""
    return [float(s == 1.0) for s in check_answers(prompts, completions)]


def arithmetic_text(n_lines: int, max_operand: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        lines.append(f"{a}+{b}={a + b}")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = parser(__doc__, "grpo_verifiable")
    p.add_argument("--max-operand", type=int, default=9, help="operands are drawn from 0..N")
    args = p.parse_args()
    out = start(args)
    q = args.quick
    tok = ByteTokenizer()
    t0 = time.perf_counter()

    corpus = out / "arithmetic.txt"
    corpus.write_text(arithmetic_text(20_000, args.max_operand, args.seed))
    model, pre = pretrain(out / "pretrain", [corpus], model=dict(dim=32 if q else 64, depth=1 if q else 2,
                          heads=2 if q else 4, dim_head=16), steps=80 if q else 300, batch_size=16, seq_len=64,
                          seed=args.seed, progress=not q)

    prompts = [f"{a}+{b}=" for a in range(args.max_operand + 1) for b in range(args.max_operand + 1)]
    random.Random(args.seed + 1).shuffle(prompts)
    eval_prompts = prompts[:32 if q else 256]  # a fixed subset of the RL prompts (all of them for 0..9)
    score = dict(max_new_tokens=4, eos_token=NEWLINE, seed=args.seed + 2)
    before = sample_and_score(model, tok, eval_prompts, check_answers, **score)
    log.info("before GRPO: mean reward %.3f", before["mean"])

    shutil.rmtree(out / "grpo", ignore_errors=True)  # a fresh GRPO run each time (pretraining is reused)
    config = GRPOConfig(out_dir=str(out / "grpo"), max_steps=4 if q else 150, prompts_per_step=4 if q else 16,
                        group_size=8, batch_size=32, epochs=1, max_new_tokens=4, eos_token=NEWLINE,
                        optim={"lr": 1e-3}, kl_coef=0.04, sample_every=0 if q else 20, seed=args.seed)
    trainer = GRPOTrainer(config, model=model, reward=check_answers, prompts=prompts, tokenizer=tok)
    history = trainer.setup().train()
    trainer.cleanup()
    after = sample_and_score(model, tok, eval_prompts, check_answers, scope=trainer.actor_scope, **score)
    # the same seed draws the same samples again: their exact-match accuracy
    exact = {"before": sample_and_score(model, tok, eval_prompts, exact_answers, **score)["mean"],
             "after": sample_and_score(model, tok, eval_prompts, exact_answers, scope=trainer.actor_scope,
                                       **score)["mean"]}
    curve = [round(h["reward_mean"], 3) for h in history]
    summary = {"pretrain_val_loss": pre.get("val/loss"), "reward_curve": curve, "rl": rl_summary(history),
               "before": before, "after": after, "exact_match": exact,
               "seconds": round(time.perf_counter() - t0, 1)}
    write_summary(out, summary)
    block = max(1, len(curve) // 6)
    means = [round(sum(curve[i:i + block]) / len(curve[i:i + block]), 3) for i in range(0, len(curve), block)]
    print(f"GRPO mean reward per {block} steps: {means}")
    print(f"mean reward on {len(eval_prompts)} RL prompts: before {before['mean']:.3f} -> after {after['mean']:.3f} "
          f"(KL to the reference {summary['rl']['kl_last_steps']:.3f} nats/answer)")
    print(f"exact-match accuracy on them: before {exact['before']:.3f} -> after {exact['after']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
