"""PPO trainer: learning on a verifiable reward with bounded KL, and exact resume."""

import copy

import pytest
import torch

from palm_rlhf.errors import ConfigError
from palm_rlhf.trainers.ppo import PPOConfig, PPOTrainer
from palm_rlhf.model.palm import PaLM
from rl_fixtures import EOS, pretrained_tiny_state, rl_prompts, tiny_model, vowel_fraction  # noqa: F401
from rl_stubs import RecordingReward, Row, assert_rollout_metrics_match, patch_collect


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
    reward = RecordingReward()
    trainer = PPOTrainer(ppo_config(tmp_path), model=tiny_model, reward=reward, prompts=rl_prompts())
    history = trainer.setup().train()
    trainer.cleanup()
    start = history[0]["reward_mean"]
    end = sum(h["reward_mean"] for h in history[-3:]) / 3
    assert end >= start + 0.15, [round(h["reward_mean"], 3) for h in history]
    assert max(h["kl_ref"] for h in history[-3:]) <= 6.0, [round(h["kl_ref"], 2) for h in history]
    assert_rollout_metrics_match(history, reward)  # and KL 0 at step 1: policy == reference before any update


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
    # the controller followed the logged sequence KL (target 1, 8 rollouts a step, horizon 100) through the
    # resume: each step's kl_coef is the value the previous steps' updates give, and so is the final value
    value = 0.05
    for row in full_hist:
        assert row["kl_coef"] == pytest.approx(value, rel=1e-9)
        value *= 1 + min(max(row["kl_ref"] / 1.0 - 1, -0.2), 0.2) * 8 / 100
    assert full.kl_ctl.value == resumed.kl_ctl.value == pytest.approx(value, rel=1e-9)
    assert len({round(row["kl_coef"], 9) for row in full_hist}) == len(full_hist)  # it moved at every step


def test_trainer_drives_the_adaptive_kl_controller(tmp_path, monkeypatch):
    """Stub rollouts with chosen KL; kl_coef 0.1, target 6, horizon 100, 4 rollouts a step, minibatches of 2
    and 2 epochs (4 optimizer steps a step: the controller must move once per step, not per minibatch).
    Step 1: sequence KLs [2, 8, 5, 7] over [1, 3, 4, 2] tokens: mean per sequence 5.5 (per token 22/10 = 2.2,
    which would saturate the clip), e = 5.5/6 - 1 = -1/12: value 0.1 * (1 - (1/12) * 4/100) = 0.1 * (1 - 1/300).
    Step 2: KLs 7 each over [2, 2, 3, 1] tokens: e = 7/6 - 1 = 1/6: value * (1 + (1/6) * 4/100) = value * (1 + 1/150).
    Step 2's rewards are shaped with step 1's new value. The logged rollout metrics are those of the rows:
    reward mean 0.3 (std: deviations +-0.2, +-0.1 -> sqrt(0.1 / 4)), response length 2.5, EOS rate 3/4, KL 5.5."""
    torch.manual_seed(0)
    model = PaLM(dim=16, num_tokens=256, depth=1, heads=2, dim_head=8)
    config = ppo_config(tmp_path, max_steps=2, prompts_per_step=4, minibatch_size=2, epochs=2, max_new_tokens=4,
                        kl_coef=0.1, kl_target=6.0, kl_horizon=100)
    trainer = PPOTrainer(config, model=model, reward=vowel_fraction, prompts=rl_prompts()).setup()
    collector = patch_collect(monkeypatch, trainer, [
        [Row(1, 2.0, 0.5), Row(3, 8.0, 0.1), Row(4, 5.0, 0.2, "max_new_tokens"), Row(2, 7.0, 0.4)],
        [Row(2, 7.0, 0.0), Row(2, 7.0, 1.0), Row(3, 7.0, 0.0), Row(1, 7.0, 1.0)]])
    first = trainer.run.advance(trainer)
    v1 = 0.1 * (1 - 1 / 300)
    assert trainer.kl_ctl.value == pytest.approx(v1, rel=1e-7)
    assert first["kl_coef"] == pytest.approx(0.1, rel=1e-9)
    assert first["kl_ref"] == pytest.approx(5.5, rel=1e-6) and first["reward_mean"] == pytest.approx(0.3)
    assert first["response_length"] == 2.5 and first["eos_rate"] == 0.75
    assert first["reward_std"] == pytest.approx(0.025 ** 0.5, rel=1e-6)
    second = trainer.run.advance(trainer)
    assert second["kl_coef"] == pytest.approx(v1, rel=1e-7)
    assert trainer.kl_ctl.value == pytest.approx(v1 * (1 + 1 / 150), rel=1e-7)
    # step 2's per-token rewards: -v1 * 7 / length on every token, plus the score on the last one
    ro = collector.rollouts[1]
    expected = torch.tensor([[-v1 * 3.5, -v1 * 3.5 + 0.0, 0.0], [-v1 * 3.5, -v1 * 3.5 + 1.0, 0.0],
                             [-v1 * 7 / 3] * 3, [-v1 * 7 + 1.0, 0.0, 0.0]])
    torch.testing.assert_close(ro.rewards, expected, atol=1e-6, rtol=0)
