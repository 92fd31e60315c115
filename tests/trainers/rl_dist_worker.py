"""Two PPO steps on stub rollouts (`rl_stubs`), in one process or, under torchrun, in several.

    python -m torch.distributed.run --standalone --nproc_per_node 2 rl_dist_worker.py OUT_DIR

Each rank writes OUT_DIR/rank<r>.json (the KL controller's value after each step, the logged
metrics, one draw from each of its rows' sampling generators) and rank 0 writes OUT_DIR/state.pt
(the trained actor/critic state). `test_rl_distributed` compares that with `run()` in one process.

The 4 rollouts of a step are split 2 + 2 over 2 ranks with different token counts (4 and 6 at
step 1, 4 and 4 at step 2) and different mean sequence KLs, chosen so that the adaptive controller
(target 6) stays inside its clip: a rank's own KL, a token mean or a per-rank row count each give
another value.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from palm_rlhf.model.palm import PaLM
from palm_rlhf.trainers import rl_base
from palm_rlhf.trainers.ppo import PPOConfig, PPOTrainer
from rl_fixtures import rl_prompts, vowel_fraction
from rl_stubs import Row, StubCollector

ROWS = [
    # rank 0: 1 + 3 tokens, KL 2 and 8 (mean 5); rank 1: 4 + 2 tokens, KL 5 and 7 (mean 6). Global: 5.5 per sequence
    [Row(1, 2.0, 0.5), Row(3, 8.0, 0.1), Row(4, 5.0, 0.2, "max_new_tokens"), Row(2, 7.0, 0.4)],
    # rank 0: KL 6 and 9 (mean 7.5); rank 1: KL 6 and 7 (mean 6.5). Global: 7 per sequence, 28 / 8 = 3.5 per token
    [Row(2, 6.0, 0.0), Row(2, 9.0, 1.0), Row(3, 6.0, 0.3), Row(1, 7.0, 0.6)],
]
KL_COEF, KL_TARGET, KL_HORIZON, ROLLOUTS = 0.1, 6.0, 100, 4


def expected_kl_values() -> list[float]:
    """e = clip(KL / target - 1, +-0.2); value *= 1 + e * rollouts / horizon, with the global per-sequence KL."""
    value, out = KL_COEF, []
    for kl in (5.5, 7.0):
        value *= 1 + min(max(kl / KL_TARGET - 1, -0.2), 0.2) * ROLLOUTS / KL_HORIZON
        out.append(value)
    return out


def run(out_dir: Path) -> dict:
    torch.manual_seed(0)
    model = PaLM(dim=16, num_tokens=256, depth=1, heads=2, dim_head=8)
    config = PPOConfig(out_dir=str(out_dir), max_steps=2, prompts_per_step=ROLLOUTS, minibatch_size=ROLLOUTS, epochs=2,
                       max_new_tokens=4, lr=1e-2, critic_lr=1e-2, kl_coef=KL_COEF, kl_target=KL_TARGET,
                       kl_horizon=KL_HORIZON, sample_every=0, progress=False, seed=0)
    trainer = PPOTrainer(config, model=model, reward=vowel_fraction, prompts=rl_prompts()).setup()
    collector = StubCollector(trainer, ROWS)
    real, rl_base.collect_rollout = rl_base.collect_rollout, collector
    try:
        history, values = [], []
        for _ in range(2):
            history.append(trainer.run.advance(trainer))
            values.append(trainer.kl_ctl.value)
    finally:
        rl_base.collect_rollout = real
        trainer.cleanup()
    return {"kl_values": values, "history": history, "noise": collector.noise,
            "state": trainer.actor_critic.trainable_state()}


def main(out_dir: str) -> None:
    from palm_rlhf.runtime.distributed import cleanup, init_distributed

    env = init_distributed("cpu")
    out = Path(out_dir)
    result = run(out / "run")
    state = result.pop("state")
    (out / f"rank{env.rank}.json").write_text(json.dumps(result))
    if env.rank == 0:
        torch.save(state, out / "state.pt")
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
