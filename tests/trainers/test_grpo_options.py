"""GRPO's options from the seed package (issue 34): policy_loss, advantage_norm, entropy_advantage."""

from dataclasses import replace

import pytest
import torch

from palm_rlhf.errors import ConfigError
from palm_rlhf.runtime.config import config_from_dict
from palm_rlhf.rl.collect import collect_rollout
from palm_rlhf.trainers.grpo import GRPOConfig, GRPOTrainer
from palm_rlhf.trainers.rl_base import row_generators
from rl_fixtures import EOS, pretrained_tiny_state, rl_prompts, tiny_model  # noqa: F401
from rl_stubs import RecordingReward


def test_option_keys_are_checked_and_scale_by_std_is_translated():
    with pytest.raises(ConfigError, match="policy_loss"):
        GRPOConfig(policy_loss="ppo")
    with pytest.raises(ConfigError, match="advantage_norm"):
        GRPOConfig(advantage_norm="median")
    with pytest.raises(ConfigError, match="kappa"):
        config_from_dict(GRPOConfig, {"entropy_advantage": {"kappa": 0}})
    with pytest.raises(ConfigError, match="is_cap"):
        config_from_dict(GRPOConfig, {"score_centering": {"is_cap": -1}})
    assert GRPOConfig(scale_by_std=False).advantage_norm == "constant"
    assert GRPOConfig(scale_by_std=True).advantage_norm == "std"
    c = config_from_dict(GRPOConfig, {"entropy_advantage": {"scale": 0.4}, "score_centering": {"topk": 8}})
    hp = c.hyperparams()
    assert (hp.entropy_scale, hp.entropy_kappa, hp.score_centering_topk) == (0.4, 2.0, 8)


def _gradients(tmp_path, model):
    """The trainer's gradient of its loss on one rollout for each option (the same rollout, the same
    weights): variant name -> flat gradient over the actor adapter."""
    config = GRPOConfig(out_dir=str(tmp_path / "grads"), prompts_per_step=4, group_size=4, batch_size=16,
                        max_new_tokens=8, eos_token=EOS, sample_every=0, kl_coef=0.0, max_steps=1, save_every=0)
    trainer = GRPOTrainer(config, model=model, reward=RecordingReward(), prompts=rl_prompts()).setup()
    rows = trainer._prompts_for(0)
    gens = row_generators(config.seed, 0, range(len(rows)), model.token_emb.weight.device)
    rollout = collect_rollout(trainer.scorer, rows, trainer.sampling, trainer.reward, generator=gens)
    params = trainer._parameters()
    variants = {"clip": {}, "spo": dict(policy_loss="spo"), "score_centering": dict(policy_loss="score_centering"),
                "score_centering_top16": dict(policy_loss="score_centering", score_centering_topk=16),
                "maxrl": dict(advantage_norm="mean"), "dr_grpo": dict(advantage_norm="constant"),
                "entropy": dict(entropy_scale=0.4, entropy_kappa=2.0)}
    base, out = trainer.hp, {}
    for name, options in variants.items():
        trainer.hp = replace(base, **options)
        ro = replace(rollout)
        trainer._prepare(ro)
        trainer.model.train()
        loss, _ = trainer._loss(ro)
        out[name] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    trainer.cleanup()
    return out


def test_on_policy_spo_and_score_centering_have_the_clip_gradient(tmp_path, tiny_model):
    """At ratio 1 (the first update on fresh rollouts) the three policy losses have the same gradient:
    the clip and SPO's penalty are inactive (d/dratio of (ratio - 1)^2 is 0 at 1), and score centring's
    term sum_v p_v grad log p_v is 0 when the sampler is the policy. Top-16 of the 256 tokens is an
    approximation: nearly the same direction (on this tiny model it can round to the same one). MaxRL's, Dr. GRPO's and the entropy bonus's advantages
    change the gradient."""
    g = _gradients(tmp_path, tiny_model)
    assert float(g["clip"].norm()) > 1e-3
    torch.testing.assert_close(g["spo"], g["clip"], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(g["score_centering"], g["clip"], atol=1e-6, rtol=1e-4)
    cos = torch.nn.functional.cosine_similarity(g["score_centering_top16"], g["clip"], dim=0)
    assert float(cos) > 0.9, float(cos)  # at most as close as 1.0 in float rounding: the top 16 hold nearly all the mass
    for name in ("maxrl", "dr_grpo", "entropy"):
        assert float((g[name] - g["clip"]).abs().max()) > 1e-4 * float(g["clip"].abs().max()), name
