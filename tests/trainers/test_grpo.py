"""GRPO trainer: learning on a verifiable reward with bounded KL."""

import pytest

from palm_rlhf.errors import ConfigError
from palm_rlhf.trainers.grpo import GRPOConfig, GRPOTrainer
from rl_fixtures import EOS, pretrained_tiny_state, rl_prompts, tiny_model, vowel_fraction  # noqa: F401


def test_group_size_must_compare_samples():
    with pytest.raises(ConfigError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ConfigError, match="aggregation"):
        GRPOConfig(aggregation="mean")


@pytest.mark.slow
@pytest.mark.parametrize("variant", [dict(), dict(scale_by_std=False, aggregation="seq_sum_norm")])
def test_grpo_raises_vowel_reward_with_bounded_kl(tmp_path, tiny_model, variant):
    """GRPO (and Dr. GRPO: no std scaling, sum / max_len): 8 prompts x 4 samples per step. After 20 steps
    the mean reward of the last 3 steps is >= 0.15 above the first step's, with KL <= 20 nats/sequence."""
    config = GRPOConfig(out_dir=str(tmp_path / "grpo"), steps=20, prompts_per_step=8, group_size=4,
                        minibatch_size=16, max_new_tokens=16, eos_token=EOS, lr=3e-3, kl_coef=0.05,
                        sample_every=5, **variant)
    trainer = GRPOTrainer(config, model=tiny_model, reward=vowel_fraction, prompts=rl_prompts())
    history = trainer.setup().train()
    trainer.cleanup()
    start = history[0]["reward_mean"]
    end = sum(h["reward_mean"] for h in history[-3:]) / 3
    assert history[0]["kl_ref"] == pytest.approx(0.0, abs=1e-4)
    assert end >= start + 0.15, [round(h["reward_mean"], 3) for h in history]
    assert max(h["kl_ref"] for h in history[-3:]) <= 20.0, [round(h["kl_ref"], 2) for h in history]
    assert all("zero_variance_groups" in h for h in history)
