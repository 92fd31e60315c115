"""Human feedback -> reward model -> PPO, with a simulated rater in place of people.

1. Pretrain a small PaLM on standard-library text (`PretrainTrainer` saves a checkpoint the app can serve).
2. Run the feedback web app in-process (the real routes, SQLite store and background pair
   queue; `starlette.testclient` instead of a network socket). A simulated rater, the rule
   annotator of `palm_rlhf.data.synthetic` (prefers the completion with more vowels), asks
   `/api/next` for a pair and posts its choice to `/api/judge` with its bearer token, exactly
   as a script or the page's JavaScript would.
3. Export the judgements to preference JSONL (`palm_rlhf.feedback.export`), train a reward
   model on them, and run PPO against it.
4. Compare before and after with the reward model and with the rule itself (the ground truth).

    python examples/feedback_to_ppo.py           # a few minutes on a laptop CPU
    python examples/feedback_to_ppo.py --quick   # seconds; what CI runs

Needs the `web` extra (fastapi, jinja2, python-multipart) and httpx. With real people, serve the
same store with `palm-rlhf feedback serve` instead (docs/feedback.md).
"""

from __future__ import annotations

import shutil
import time

from common import log, parser, pretrain, rl_summary, sample_and_score, start, write_summary

from palm_rlhf.data.corpus import stdlib_files
from palm_rlhf.data.synthetic import rule_annotator, rule_score
from palm_rlhf.data.tokenizer import ByteTokenizer
from palm_rlhf.generation import SamplingConfig
from palm_rlhf.model.reward import RewardModel
from palm_rlhf.trainers.ppo import PPOConfig, PPOTrainer
from palm_rlhf.trainers.reward import RewardTrainConfig, RewardTrainer

PROMPTS = ["def ", "class ", "import ", "return ", "# ", "if ", "for ", "with ", "print(", "self.", "raise ",
           "try:", "while ", "x = ", "from ", "assert "]
TOKEN = "simulated-rater-token-0123456789"  # any secret of >= 16 characters


def collect_judgements(checkpoint, db, n: int, max_new_tokens: int, seed: int) -> dict:
    """Serve `checkpoint` in the feedback app and let the rule annotator judge `n` pairs through its JSON API."""
    from starlette.testclient import TestClient

    from palm_rlhf.feedback import FeedbackStore, ModelPairSource, PairQueue, load_checkpoint
    from palm_rlhf.feedback.app import create_app

    store = FeedbackStore(db, seed=seed)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, eos_token=0)
    queue = PairQueue(store, ModelPairSource([load_checkpoint(checkpoint)], sampling, seed=seed), PROMPTS, size=8)
    app = create_app(store, queue, {TOKEN: "rule"}, shared_fraction=0.0)
    annotate = rule_annotator()
    choices = {"a": 0, "b": 0, "tie": 0}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:  # starts and stops the pair queue
        while sum(choices.values()) < n:
            pair = client.get("/api/next", params={"wait": 10}, headers=auth).json()["pair"]
            if pair is None:
                raise RuntimeError(f"the app prepared no pair within 10 s (generator error: {queue.last_error})")
            record = annotate(pair["prompt"], pair["completion_a"], pair["completion_b"])
            choice = "tie" if record is None else ("a" if record.chosen == pair["completion_a"] else "b")
            reply = client.post("/api/judge", json={"pair_id": pair["pair_id"], "choice": choice, "next": False},
                                headers=auth)
            reply.raise_for_status()
            choices[choice] += 1
    store.close()
    return choices


def main() -> int:
    p = parser(__doc__, "feedback_to_ppo")
    args = p.parse_args()
    out = start(args)
    q = args.quick
    tok = ByteTokenizer()
    t0 = time.perf_counter()

    # 1. the model raters will judge
    model, pre = pretrain(out / "pretrain", stdlib_files()[:40 if q else 300],
                          model=dict(dim=32 if q else 96, depth=1 if q else 3, heads=2 if q else 4,
                                     dim_head=16 if q else 24),
                          steps=60 if q else 300, batch_size=16, seq_len=64 if q else 128, seed=args.seed,
                          progress=not q)
    base = out / "pretrain" / "final"  # save_pretrained weights + tokenizer: what `feedback serve` loads

    # 2. feedback through the web app, then 3. export
    max_new = 16 if q else 24
    db = out / "feedback.sqlite"
    db.unlink(missing_ok=True)  # a fresh session every run (keep the file to continue one with `feedback serve`)
    choices = collect_judgements(base, db, 40 if q else 400, max_new, args.seed)
    log.info("judgements: %s", choices)
    from palm_rlhf.feedback import FeedbackStore
    from palm_rlhf.feedback.export import export_preferences

    store = FeedbackStore(db)
    exported = export_preferences(store, out / "prefs.jsonl")
    store.close()
    log.info("exported %d preference records (skipped %s)", exported.written, exported.skipped)

    # 4. reward model on the exported file, the same file `palm-rlhf reward train` reads
    rm = RewardTrainer(RewardTrainConfig(model=str(base), data=str(out / "prefs.jsonl"),
                                         out_dir=str(out / "reward"), eval={"fraction": 0.2, "every": 10_000},
                                         max_steps=30 if q else 200, optim={"lr": 3e-3}, progress=not q, seed=args.seed,
                                         resume="never"))
    try:
        rm_metrics = rm.setup().train()
    finally:
        rm.cleanup()
    reward_model = RewardModel.from_pretrained(out / "reward" / "final")

    # 5. PPO against the reward model
    score = dict(max_new_tokens=max_new, eos_token=tok.eos_id, seed=args.seed + 1)
    eval_prompts = PROMPTS * (2 if q else 4)
    truth = lambda prompts, completions: [rule_score(c) for c in completions]  # noqa: E731 - the ground truth
    before = {"reward_model": sample_and_score(model, tok, eval_prompts, reward_model, **score),
              "vowel_share": sample_and_score(model, tok, eval_prompts, truth, **score)}
    shutil.rmtree(out / "ppo", ignore_errors=True)  # a fresh PPO run each time (pretraining is reused)
    ppo = PPOTrainer(PPOConfig(out_dir=str(out / "ppo"), max_steps=3 if q else 40, prompts_per_step=16 if q else 32,
                               batch_size=16, epochs=2, max_new_tokens=max_new, eos_token=tok.eos_id,
                               optim={"lr": 3e-3}, critic_lr=3e-3, kl_coef=0.05, sample_every=0, seed=args.seed),
                     model=model, reward=reward_model, prompts=PROMPTS, tokenizer=tok)
    history = ppo.setup().train()
    ppo.cleanup()
    scope = ppo.actor_scope
    after = {"reward_model": sample_and_score(model, tok, eval_prompts, reward_model, scope=scope, **score),
             "vowel_share": sample_and_score(model, tok, eval_prompts, truth, scope=scope, **score)}

    summary = {"pretrain_val_loss": pre.get("val/loss"), "judgements": choices, "exported_records": exported.written,
               "reward_model_accuracy": rm_metrics["accuracy"], "rl": rl_summary(history),
               "before": {k: v["mean"] for k, v in before.items()}, "after": {k: v["mean"] for k, v in after.items()},
               "samples_after": after["vowel_share"]["samples"], "seconds": round(time.perf_counter() - t0, 1)}
    write_summary(out, summary)
    print(f"{sum(choices.values())} judgements via the app -> {exported.written} preference records -> reward model "
          f"held-out accuracy {rm_metrics['accuracy']:.3f}")
    for key in ("reward_model", "vowel_share"):
        print(f"{key:>12}: before {summary['before'][key]:+.3f} -> after {summary['after'][key]:+.3f}")
    print(f"KL to the reference: {summary['rl']['kl_last_steps']:.3f} nats/sequence")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
