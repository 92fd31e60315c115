"""RLOO and REINFORCE++ maths against numbers worked by hand (each docstring shows the arithmetic)."""

import math

import pytest
import torch

from palm_rlhf.errors import ConfigError, InputError
from palm_rlhf.rl.reinforce import ReinforceHyperparams, discounted_returns, leave_one_out_advantages, \
    policy_gradient_loss, reinforce_pp_advantages, reinforce_prepare
from palm_rlhf.rl.rollout import Rollout

MASK = torch.tensor([[True, True], [True, False]])


def rollout(scores, kl, mask=MASK, **kw):
    """Rows whose per-token k1 KL (old - ref) is `kl`: old log-probs -1, reference -1 - kl."""
    mask = torch.as_tensor(mask)
    old = torch.full(mask.shape, -1.0).masked_fill(~mask, 0.0)
    ref = (old - torch.as_tensor(kl, dtype=torch.float32)).masked_fill(~mask, 0.0)
    b, T = mask.shape
    return Rollout(prompts=torch.ones(b, 1, dtype=torch.long), prompt_lengths=torch.ones(b, dtype=torch.long),
                   responses=torch.ones(b, T, dtype=torch.long) * mask, mask=mask, old_log_probs=old,
                   ref_log_probs=ref, scores=torch.tensor(scores, dtype=torch.float32), **kw)


def test_leave_one_out_baseline_is_the_other_samples_mean():
    """k = 3, rewards [1, 2, 6 | 0, 0, 3].
    Group 1 (sum 9): 1 - (9 - 1)/2 = -3; 2 - (9 - 2)/2 = -1.5; 6 - (9 - 6)/2 = 4.5
    (= 3/2 * (R - mean 3)). Group 2 (sum 3): 0 - 1.5 = -1.5 twice; 3 - 0 = 3.
    A baseline that includes the sample itself (R - mean) would give [-2, -1, 3, -1, -1, 2]."""
    adv = leave_one_out_advantages(torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), 3)
    torch.testing.assert_close(adv, torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    with pytest.raises(ConfigError, match="group_size"):
        leave_one_out_advantages(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(InputError, match="groups of 3"):
        leave_one_out_advantages(torch.tensor([1.0, 2.0]), 3)


def test_rloo_prepare_puts_the_sequence_kl_in_the_reward():
    """k = 2, scores [1, 0]; row 0 has KL 0.5 + 0.5 = 1, row 1 (one token) KL 3; kl_coef 0.1:
    R = [1 - 0.1, 0 - 0.3] = [0.9, -0.3]; A0 = 0.9 - (-0.3) = 1.2, A1 = -1.2, on every real token:
    [[1.2, 1.2], [-1.2, 0 (padding)]]. (Without the KL: +-1.)"""
    ro = rollout([1.0, 0.0], [[0.5, 0.5], [3.0, 9.0]])
    reinforce_prepare(ro, ReinforceHyperparams(algorithm="rloo", group_size=2, kl_coef=0.1))
    torch.testing.assert_close(ro.advantages, torch.tensor([[1.2, 1.2], [-1.2, 0.0]]))


def test_discounted_returns_stop_at_the_last_real_token():
    """r = [1, 2, (pad) 3]: gamma 0.5: G1 = 2, G0 = 1 + 0.5 * 2 = 2 -> [2, 2, 0]; gamma 1: [3, 2, 0]."""
    r = torch.tensor([[1.0, 2.0, 3.0]])
    m = torch.tensor([[True, True, False]])
    torch.testing.assert_close(discounted_returns(r, m, 0.5), torch.tensor([[2.0, 2.0, 0.0]]))
    torch.testing.assert_close(discounted_returns(r, m, 1.0), torch.tensor([[3.0, 2.0, 0.0]]))


def test_reinforce_pp_whitens_kl_shaped_returns_over_the_batch():
    """scores [1, 0], per-token KL [[0.2, 0.2], [0.4, pad]], kl_coef 0.5, gamma 1.
    rewards: row 0 [-0.1, -0.1 + 1] = [-0.1, 0.9]; row 1 [-0.2].  returns: [0.8, 0.9], [-0.2].
    Over the 3 tokens: mean 0.5, deviations [0.3, 0.4, -0.7], unbiased var 0.74 / 2 = 0.37, std 0.608276:
    advantages [0.49320, 0.65760, -1.15080] (padding 0)."""
    scores, kl = torch.tensor([1.0, 0.0]), torch.tensor([[0.2, 0.2], [0.4, 0.0]])
    adv, returns = reinforce_pp_advantages(scores, kl, MASK, kl_coef=0.5)
    torch.testing.assert_close(returns, torch.tensor([[0.8, 0.9], [-0.2, 0.0]]))
    std = math.sqrt(0.37)
    torch.testing.assert_close(adv, torch.tensor([[0.3 / std, 0.4 / std], [-0.7 / std, 0.0]]))
    ro = rollout([1.0, 0.0], [[0.2, 0.2], [0.4, 5.0]])
    reinforce_prepare(ro, ReinforceHyperparams(algorithm="reinforce_pp", group_size=1, kl_coef=0.5))
    torch.testing.assert_close(ro.advantages, adv)


def test_reinforce_pp_baseline_subtracts_the_group_mean_before_global_whitening():
    """Groups of 2, scores [1, 0 | 4, 2], one token each, no KL. Group means 0.5 and 3:
    [0.5, -0.5, 1, -1]; whitened over all 4 (mean 0, var 2.5 / 3, std 0.912871):
    [0.547723, -0.547723, 1.095445, -1.095445]. Plain REINFORCE++ whitens [1, 0, 4, 2] instead
    (mean 1.75): [-0.4, -0.933, 1.2, 0.133]; whitening each group alone would give +-0.707."""
    mask = torch.ones(4, 1, dtype=torch.bool)
    ro = rollout([1.0, 0.0, 4.0, 2.0], torch.zeros(4, 1), mask)
    reinforce_prepare(ro, ReinforceHyperparams(algorithm="reinforce_pp_baseline", group_size=2, kl_coef=0.5))
    std = math.sqrt(2.5 / 3)
    torch.testing.assert_close(ro.advantages, torch.tensor([[0.5], [-0.5], [1.0], [-1.0]]) / std)
    plain = rollout([1.0, 0.0, 4.0, 2.0], torch.zeros(4, 1), mask)
    reinforce_prepare(plain, ReinforceHyperparams(algorithm="reinforce_pp", group_size=2))
    centred = torch.tensor([[-0.75], [-1.75], [2.25], [0.25]])
    torch.testing.assert_close(plain.advantages, centred / math.sqrt(float((centred ** 2).sum()) / 3))


def test_policy_gradient_loss_at_ratio_one_is_minus_the_mean_advantage():
    """Ratio 1, A = [[1.2, 1.2], [-1.2, pad]]: token_mean -(1.2 + 1.2 - 1.2) / 3 = -0.4; seq_mean
    (-1.2 + 1.2) / 2 = 0. Entropy [[1, 2], [3, pad]] with ent_coef 0.1: token_mean -0.4 - 0.1 * 6 / 3 = -0.6.
    The gradient w.r.t. logp is -A / 3 per token (REINFORCE)."""
    ro = rollout([0.0, 0.0], torch.zeros(2, 2), advantages=torch.tensor([[1.2, 1.2], [-1.2, 0.0]]))
    entropy = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    logp = ro.old_log_probs.clone().requires_grad_(True)
    hp = ReinforceHyperparams(group_size=2)
    loss, stats = policy_gradient_loss(logp, entropy, ro, hp)
    assert loss.item() == pytest.approx(-0.4, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, -ro.advantages / 3)
    assert policy_gradient_loss(logp, entropy, ro, ReinforceHyperparams(group_size=2, aggregation="seq_mean")
                                )[0].item() == pytest.approx(0.0, abs=1e-6)
    with_ent, _ = policy_gradient_loss(logp, entropy, ro, ReinforceHyperparams(group_size=2, ent_coef=0.1))
    assert with_ent.item() == pytest.approx(-0.6, abs=1e-6)
    assert float(stats["entropy"]) == pytest.approx(2.0)


def test_hyperparameters_are_checked():
    with pytest.raises(ConfigError, match="algorithm"):
        ReinforceHyperparams(algorithm="ppo")
    with pytest.raises(ConfigError, match="group_size=1 must be >= 2 for rloo"):
        ReinforceHyperparams(algorithm="rloo", group_size=1)
    ReinforceHyperparams(algorithm="reinforce_pp", group_size=1)  # plain REINFORCE++ needs no group
    with pytest.raises(ConfigError, match="aggregation"):
        ReinforceHyperparams(aggregation="mean")
