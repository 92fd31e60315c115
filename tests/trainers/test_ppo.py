"""PPO trainer: learning on a verifiable reward with bounded KL, and exact resume."""

import copy

import pytest
import torch

from palm_rlhf.errors import ConfigError
from palm_rlhf.trainers.ppo import PPOConfig, PPOTrainer
from rl_fixtures import EOS, pretrained_tiny_state, rl_prompts, tiny_model, vowel_fraction  # noqa: F401


def ppo_config(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "ppo"), max_steps=16, prompts_per_step=32, minibatch_size=16, epochs=2,
                max_new_tokens=16, eos_token=EOS, lr=3e-3, critic_lr=3e-3, kl_coef=0.05, sample_every=0, seed=0)
    base.update(kw)
    return PPOConfig(**base)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="lam"):
        PPOConfig(lam=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        PPOConfig(temperature=0.0)


@pytest.mark.slow
def test_ppo_raises_vowel_reward_with_bounded_kl(tmp_path, tiny_model):
    """Reward = share of vowels in the completion. The pretrained model starts near 0.37; after 16 PPO
    steps (32 rollouts each) the mean of the last 3 steps is >= 0.15 higher, with KL to the reference
    <= 6 nats/sequence (k1 penalty 0.05 per token)."""
    trainer = PPOTrainer(ppo_config(tmp_path), model=tiny_model, reward=vowel_fraction, prompts=rl_prompts())
    history = trainer.setup().train()
    trainer.cleanup()
    start = history[0]["reward_mean"]
    end = sum(h["reward_mean"] for h in history[-3:]) / 3
    assert history[0]["kl_ref"] == pytest.approx(0.0, abs=1e-4)  # policy == reference before any update
    assert end >= start + 0.15, [round(h["reward_mean"], 3) for h in history]
    assert max(h["kl_ref"] for h in history[-3:]) <= 6.0, [round(h["kl_ref"], 2) for h in history]
    for key in ("entropy", "clip_frac", "approx_kl", "value_loss", "explained_variance", "eos_rate",
                "response_length", "reward_std", "seconds_generation", "seconds_learning"):
        assert key in history[-1]


def test_resume_matches_uninterrupted_run(tmp_path, pretrained_tiny_state):
    """2 steps + checkpoint + resume for 2 more == 4 uninterrupted steps: same adapters, same metrics."""
    from palm_rlhf.model.palm import PaLM

    def fresh():
        config, state = pretrained_tiny_state
        m = PaLM(**config)
        m.load_state_dict(state)
        return m

    kw = dict(prompts_per_step=8, minibatch_size=4, max_new_tokens=6, kl_target=1.0, kl_horizon=100)
    full = PPOTrainer(ppo_config(tmp_path / "a", max_steps=4, **kw), model=fresh(), reward=vowel_fraction,
                      prompts=rl_prompts())
    full_hist = full.setup().train()
    first = PPOTrainer(ppo_config(tmp_path / "b", max_steps=2, **kw), model=fresh(), reward=vowel_fraction,
                       prompts=rl_prompts())
    first.setup().train()
    first.cleanup()
    resumed = PPOTrainer(ppo_config(tmp_path / "b", max_steps=4, **kw), model=fresh(), reward=vowel_fraction,
                         prompts=rl_prompts())
    resumed.setup()
    assert resumed.step_done == 2
    hist = resumed.train()
    for a, b in zip(full_hist[2:], hist):
        for k in ("reward_mean", "kl_ref", "policy_loss", "value_loss", "kl_coef"):
            assert a[k] == b[k], k
    sa, sb = full.actor_critic.trainable_state(), resumed.actor_critic.trainable_state()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert full.kl_ctl.value == resumed.kl_ctl.value != 0.1  # the adaptive controller moved and was restored
