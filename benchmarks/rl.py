"""Seconds per PPO iteration: ours (`PPOTrainer`) vs the seed package's `RLHFTrainer`.

    python benchmarks/rl.py                              # 5 of ours, 2 of the seed's (several minutes)
    python benchmarks/rl.py --repeats 3 --seed-repeats 1 --seed-rollouts 16 --profile

One iteration (issue 6): collect 64 rollouts of 64 new tokens from 32-token prompts, then one
learning pass (1 epoch, minibatches of 16, actor + critic). Tiny PaLM: dim 128, depth 2, heads 4,
dim_head 32, vocab 256, random weights; the reward is a RewardModel on a PaLM of the same size.
No EOS, so every rollout is exactly 64 tokens in both systems. Both run in this process,
interleaved (ours, seed, ours, seed, ...), fp32, and medians are reported per iteration and per
collected rollout. The seed generates one prompt at a time with no KV cache, so it is slow: it may
be measured with fewer rollouts per iteration (`--seed-rollouts`); the per-rollout figure is the
comparable one. Where the time goes: ours from the trainer's own `seconds_generation` /
`seconds_learning` metrics (and `--profile`: cProfile of one iteration); the seed's by timing its
`learn` call.

Differences kept on purpose: the seed's sampler applies its default top_k(thres=0.9) filter (one
topk per step, negligible); ours samples without a filter. Ours also computes per-token reference
log-probs (the seed has no reference model) and per-token values.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # the seed's generate draws a progress bar per rollout

import torch

DIM, DEPTH, HEADS, DIM_HEAD, VOCAB = 128, 2, 4, 32, 256
PROMPT, NEW, ROLLOUTS, MINIBATCH = 32, 64, 64, 16


def make_prompts(n: int, seed: int = 0) -> torch.Tensor:
    # ids >= 1: the seed strips its pad value 0 from prompts
    return torch.randint(1, VOCAB, (n, PROMPT), generator=torch.Generator().manual_seed(seed))


def build_ours(prompts: torch.Tensor, out_dir: str):
    from palm_rlhf.model import PaLM
    from palm_rlhf.model.reward import RewardModel
    from palm_rlhf.trainers.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(0)
    palm = PaLM(dim=DIM, num_tokens=VOCAB, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD)
    reward = RewardModel(PaLM(dim=DIM, num_tokens=VOCAB, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD),
                         dropout=0.0).eval()
    config = PPOConfig(out_dir=out_dir, max_steps=1_000_000, prompts_per_step=ROLLOUTS, rollout_batch_size=ROLLOUTS,
                       batch_size=MINIBATCH, epochs=1, max_new_tokens=NEW, eos_token=None, sample_every=0)
    trainer = PPOTrainer(config, model=palm, reward=reward, prompts=list(prompts)).setup()
    state = {"step": 0}

    def run() -> dict:
        metrics = trainer.train_step(state["step"])
        state["step"] += 1
        return {"total": metrics["seconds_generation"] + metrics["seconds_learning"],
                "generation": metrics["seconds_generation"], "learning": metrics["seconds_learning"],
                "rollouts": ROLLOUTS}
    return run, trainer


def build_seed(prompts: torch.Tensor):
    from palm_rlhf_pytorch import PaLM as SeedPaLM, RLHFTrainer, RewardModel as SeedRewardModel

    torch.manual_seed(0)
    palm = SeedPaLM(dim=DIM, num_tokens=VOCAB, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD)
    reward = SeedRewardModel(SeedPaLM(dim=DIM, num_tokens=VOCAB, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD),
                             dropout=0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = RLHFTrainer(palm=palm, reward_model=reward, prompt_token_ids=prompts, minibatch_size=MINIBATCH,
                              epochs=1)
    learn_seconds = []
    learn = trainer.learn

    def timed_learn(memories):
        t = time.perf_counter()
        learn(memories)
        learn_seconds.append(time.perf_counter() - t)
    trainer.learn = timed_learn  # train() calls self.learn once per update_timesteps rollouts

    def run(rollouts: int) -> dict:
        learn_seconds.clear()
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train(num_episodes=1, max_timesteps=rollouts, update_timesteps=rollouts,
                          max_batch_size=MINIBATCH, max_seq_len=PROMPT + NEW, eos_token=None, temperature=1.0)
        total = time.perf_counter() - t
        assert len(learn_seconds) == 1, "one learning pass per iteration"
        return {"total": total, "generation": total - learn_seconds[0], "learning": learn_seconds[0],
                "rollouts": rollouts}
    return run


def median(runs: list[dict], key: str, per_rollout: bool = False) -> float:
    return statistics.median(r[key] / (r["rollouts"] if per_rollout else 1) for r in runs)


def profile(trainer, top: int = 18) -> str:
    prof = cProfile.Profile()
    prof.enable()
    trainer.train_step(10_000)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed iterations of ours")
    parser.add_argument("--seed-repeats", type=int, default=2, help="timed iterations of the seed's trainer")
    parser.add_argument("--seed-rollouts", type=int, default=ROLLOUTS, help="rollouts per seed iteration")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="cProfile one iteration of ours")
    parser.add_argument("--skip-seed", action="store_true")
    parser.add_argument("--no-tune-malloc", action="store_true",
                        help="leave glibc malloc at its defaults (the palm-rlhf command tunes it; this process "
                             "runs both systems, so the setting applies to both)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.no_tune_malloc:
        from palm_rlhf.cli.allocator import tune_malloc

        print("glibc malloc tuned (palm_rlhf.cli.allocator):", tune_malloc())
    prompts = make_prompts(256)

    with tempfile.TemporaryDirectory() as tmp:
        ours, trainer = build_ours(prompts, tmp)
        seed = None if args.skip_seed else build_seed(prompts)
        ours()  # warm-up: allocator, first-call overheads
        if seed is not None:
            seed(2)
        mine, theirs = [], []
        for i in range(max(args.repeats, 0 if seed is None else args.seed_repeats)):
            if i < args.repeats:
                mine.append(ours())
                print(f"ours  {i}: {mine[-1]['total']:.2f} s", flush=True)
            if seed is not None and i < args.seed_repeats:
                theirs.append(seed(args.seed_rollouts))
                print(f"seed  {i}: {theirs[-1]['total']:.2f} s ({args.seed_rollouts} rollouts)", flush=True)

        print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, fp32; PaLM dim {DIM} depth {DEPTH}; "
              f"{ROLLOUTS} rollouts x {NEW} new tokens from {PROMPT}-token prompts, minibatch {MINIBATCH}\n")
        print("| system | rollouts / iter | runs | s / iter | generation s | learning s | ms / rollout |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, runs in (("ours (PPOTrainer)", mine), ("seed (RLHFTrainer)", theirs)):
            if runs:
                print(f"| {name} | {runs[0]['rollouts']} | {len(runs)} | {median(runs, 'total'):.2f} | "
                      f"{median(runs, 'generation'):.2f} | {median(runs, 'learning'):.2f} | "
                      f"{1000 * median(runs, 'total', True):.1f} |")
        if mine and theirs:
            ratio = median(theirs, "total", True) / median(mine, "total", True)
            print(f"\nper collected rollout, ours is {ratio:.1f}x faster (ratio of medians)")
        if args.profile:
            print("\n" + profile(trainer))
        trainer.cleanup()


if __name__ == "__main__":
    main()
