"""RL maths against numbers worked by hand (each docstring shows the arithmetic)."""

import math
import warnings

import pytest
import torch

from palm_rlhf.errors import ConfigError, InputError
from palm_rlhf.rl.advantages import explained_variance, gae, group_advantages, kl_shaped_rewards, whiten
from palm_rlhf.rl.kl import AdaptiveKLController, FixedKLController, kl_per_token, negative_kl_is_significant, \
    sequence_kl
from palm_rlhf.rl.losses import aggregate, clipped_value_loss, ppo_policy_terms, preference_loss
from palm_rlhf.rl.ppo import PPOHyperparams, ppo_prepare
from palm_rlhf.rl.rollout import Rollout


def test_gae_stops_at_eos_and_ignores_padding():
    """gamma 0.9, lambda 0.5, row of 2 real tokens then padding (whose r=5, V=9 must not matter):
    t=1 (last): delta = 1 + 0 - 0.2 = 0.8, A1 = 0.8
    t=0: delta = 0 + 0.9*0.2 - 0.5 = -0.32, A0 = -0.32 + 0.9*0.5*0.8 = 0.04
    returns = A + V = [0.54, 1.0, 0]."""
    r = torch.tensor([[0.0, 1.0, 5.0]])
    v = torch.tensor([[0.5, 0.2, 9.0]])
    m = torch.tensor([[True, True, False]])
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.04, 0.8, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.54, 1.0, 0.0]]))


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    """gamma = lambda = 1: A_t = sum_{k>=t} r_k - V_t. r=[1,2,3], V=[1,1,1] -> A=[5,4,2]."""
    adv, ret = gae(torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool), 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[5.0, 4.0, 2.0]]))
    torch.testing.assert_close(ret, torch.tensor([[6.0, 5.0, 3.0]]))


def test_kl_shaped_rewards_put_score_on_last_real_token():
    """coef 0.5, kl [0.1, -0.2, (pad) 0.3], score 2: r = [-0.05, 0.1 + 2, 0] = [-0.05, 2.1, 0].
    A second row with no tokens gets nothing."""
    kl = torch.tensor([[0.1, -0.2, 0.3], [0.4, 0.4, 0.4]])
    m = torch.tensor([[True, True, False], [False, False, False]])
    r = kl_shaped_rewards(torch.tensor([2.0, 7.0]), kl, m, kl_coef=0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.05, 2.1, 0.0], [0.0, 0.0, 0.0]]))


def test_kl_estimators():
    """logp = -1, ref = -2: d = 1; k1 = 1; k2 = 0.5; k3 = e^-1 + 1 - 1 = 0.36788.
    Equal log-probs give 0 for all three."""
    logp, ref = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -3.0])
    torch.testing.assert_close(kl_per_token(logp, ref, "k1"), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(kl_per_token(logp, ref, "k2"), torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(kl_per_token(logp, ref, "k3"), torch.tensor([math.exp(-1), 0.0]))
    with pytest.raises(ConfigError, match="k1"):
        kl_per_token(logp, ref, "k9")


def test_kl_controllers():
    """Adaptive: value 0.1, target 6, horizon 10000, kl 9 -> error clip(9/6 - 1) = clip(0.5) = 0.2,
    1000 samples: 0.1 * (1 + 0.2 * 1000 / 10000) = 0.102. kl 3 -> error -0.5 -> -0.2:
    0.102 * (1 - 0.02) = 0.09996. Fixed never moves."""
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(9.0, 1000) == pytest.approx(0.102)
    assert ctl.update(3.0, 1000) == pytest.approx(0.09996)
    restored = AdaptiveKLController()
    restored.load_state_dict(ctl.state_dict())
    assert restored == ctl
    assert FixedKLController(0.3).update(100.0, 10) == 0.3


def test_negative_kl_warning_needs_significance():
    m = torch.ones(1, 100, dtype=torch.bool)
    noisy = torch.randn(1, 100, generator=torch.Generator().manual_seed(0)) * 0.1
    assert not negative_kl_is_significant(noisy - noisy.mean(), m)
    assert negative_kl_is_significant(noisy - noisy.mean() - 0.5, m)


def test_whiten_respects_mask():
    """Values [1, 3] (+ padding 100): mean 2, unbiased var 2 -> [-1/sqrt2, 1/sqrt2, 0]."""
    x = torch.tensor([[1.0, 3.0, 100.0]])
    m = torch.tensor([[True, True, False]])
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(whiten(x, m), torch.tensor([[-s, s, 0.0]]), atol=1e-6, rtol=0)
    # shift_mean=False keeps the mean: [-s + 2, s + 2, 0]
    torch.testing.assert_close(whiten(x, m, shift_mean=False), torch.tensor([[2 - s, 2 + s, 0.0]]), atol=1e-6,
                               rtol=0)


def test_whiten_with_reduce_sum_equals_whole_batch():
    """Two halves with a summing 'all-reduce' give the statistics of the whole batch."""
    g = torch.Generator().manual_seed(1)
    x, m = torch.randn(4, 5, generator=g), torch.rand(4, 5, generator=g) > 0.3
    halves = [(x[:2], m[:2]), (x[2:], m[2:])]
    partial_sums = []

    def reduce_sum_for(rank):
        def reduce_sum(t):
            # both ranks' contributions to this statistic, computed from the other half
            other_x, other_m = halves[1 - rank]
            partial_sums.append(t)
            return t + _stat_like(t, other_x, other_m)
        return reduce_sum

    def _stat_like(t, ox, om):
        from palm_rlhf.rl.advantages import global_masked_mean_var
        if t.numel() == 2:  # (sum, count)
            return torch.stack([ox.double().masked_fill(~om, 0).sum(), om.sum().double()])
        mean, _, _ = global_masked_mean_var(x, m)
        return ((ox.double() - mean) ** 2).masked_fill(~om, 0).sum()

    out0 = whiten(halves[0][0], halves[0][1], reduce_sum=reduce_sum_for(0))
    torch.testing.assert_close(out0, whiten(x, m)[:2])  # the whole batch on one process


def test_group_advantages():
    """Groups of 3: [1, 2, 3] has mean 2, unbiased std 1 -> [-1, 0, 1]; [5, 5, 5] has no variance
    -> [0, 0, 0] and is counted. Without std scaling (Dr. GRPO) the first group is also [-1, 0, 1]
    and [1, 3, 8] would give [-3, -1, 4]."""
    adv, zero = group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    assert zero == 1
    adv, zero = group_advantages(torch.tensor([1.0, 3.0, 8.0]), 3, norm="constant")
    torch.testing.assert_close(adv, torch.tensor([-3.0, -1.0, 4.0]))
    assert zero == 0
    with pytest.raises(InputError, match="multiple of group_size"):
        group_advantages(torch.ones(5), 3)


def test_aggregation_modes():
    """x = [[1, 2, pad], [3, pad, pad]]:
    token_mean = (1 + 2 + 3) / 3 = 2; seq_mean = (1.5 + 3) / 2 = 2.25;
    seq_sum_norm (max_len 4) = (3/4 + 3/4) / 2 = 0.75; denominator 6 -> 6 / 6 = 1."""
    x = torch.tensor([[1.0, 2.0, 50.0], [3.0, 60.0, 70.0]])
    m = torch.tensor([[True, True, False], [True, False, False]])
    assert float(aggregate(x, m, "token_mean")) == pytest.approx(2.0)
    assert float(aggregate(x, m, "seq_mean")) == pytest.approx(2.25)
    assert float(aggregate(x, m, "seq_sum_norm", max_len=4)) == pytest.approx(0.75)
    assert float(aggregate(x, m, "token_mean", denominator=6)) == pytest.approx(1.0)
    assert float(aggregate(x, torch.zeros_like(m), "token_mean")) == 0.0  # empty: 0, not NaN


def test_ppo_policy_terms_clip_both_sides():
    """eps 0.2. Token 1: A = 1, ratio 1.5: max(-1.5, -1.2) = -1.2 (clipped).
    Token 2: A = -1, ratio 0.5: max(0.5, 0.8) = 0.8 (clipped). Token 3: A = 2, ratio 1: -2.
    approx-KL (k3 of old/new): ratio - 1 - log ratio: 0.5 - ln 1.5 = 0.09453; -0.5 - ln 0.5 = 0.19315."""
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    terms = ppo_policy_terms(logp, torch.zeros(1, 3), torch.tensor([[1.0, -1.0, 2.0]]), torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(terms.loss, torch.tensor([[-1.2, 0.8, -2.0]]))
    assert terms.clipped.tolist() == [[True, True, False]]
    torch.testing.assert_close(terms.approx_kl, torch.tensor([[0.5 - math.log(1.5), -0.5 - math.log(0.5), 0.0]]))


def test_clipped_value_loss():
    """V 1.0, old 0.5, R 2, c 0.2: err (1 - 2)^2 = 1; V_clip = 0.7, (0.7 - 2)^2 = 1.69 -> 0.5 * 1.69 = 0.845.
    Without clipping: 0.5 * 1 = 0.5."""
    args = torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.ones(1, 1, dtype=torch.bool)
    loss, clipped = clipped_value_loss(*args, clip_range=0.2)
    assert float(loss) == pytest.approx(0.845) and bool(clipped)
    loss, _ = clipped_value_loss(*args, clip_range=None)
    assert float(loss) == pytest.approx(0.5)


def test_dpo_and_ipo_losses():
    """policy chosen -1, rejected -2; reference both -1.5; beta 0.5:
    h = (-1 + 1.5) - (-2 + 1.5) = 1; DPO loss = -log sigmoid(0.5) = log(1 + e^-0.5) = 0.474077;
    implicit rewards 0.5 * 0.5 = 0.25 and 0.5 * -0.5 = -0.25 (accuracy 1, margin 0.5);
    IPO: (1 - 1 / (2 * 0.5))^2 = 0."""
    args = [torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.5)]
    out = preference_loss(*args, beta=0.5)
    assert float(out.loss) == pytest.approx(math.log1p(math.exp(-0.5)))
    metrics = out.metrics()
    assert metrics["chosen_reward"] == pytest.approx(0.25) and metrics["rejected_reward"] == pytest.approx(-0.25)
    assert metrics["reward_accuracy"] == 1.0 and metrics["reward_margin"] == pytest.approx(0.5)
    assert float(preference_loss(*args, beta=0.5, loss_type="ipo").loss) == pytest.approx(0.0)
    # label smoothing 0.1: 0.9 * 0.474077 + 0.1 * log(1 + e^0.5) = 0.42667 + 0.09741 = 0.52408
    smooth = preference_loss(*args, beta=0.5, label_smoothing=0.1)
    assert float(smooth.loss) == pytest.approx(0.9 * math.log1p(math.exp(-0.5)) + 0.1 * math.log1p(math.exp(0.5)))


def test_explained_variance():
    """returns [1, 2, 3], values = returns -> 1; values = 0 -> 1 - var(r)/var(r) = 0; constant returns -> 0."""
    r = torch.tensor([[1.0, 2.0, 3.0]])
    m = torch.ones(1, 3, dtype=torch.bool)
    assert float(explained_variance(r, r, m)) == pytest.approx(1.0)
    assert float(explained_variance(torch.zeros_like(r), r, m)) == pytest.approx(0.0)
    assert float(explained_variance(r, torch.ones_like(r), m)) == 0.0


def test_ppo_policy_terms_use_clip_eps_high():
    """eps 0.2, eps_high 0.28 (DAPO's clip-higher). Token 1: A = 1, ratio 1.5 -> max(-1.5, -1.28) = -1.28 (clipped).
    Token 2: A = 1, ratio 1.25 -> -1.25, inside [0.8, 1.28] (a symmetric clip would give -1.2).
    Token 3: A = -1, ratio 0.5 -> max(0.5, 0.8) = 0.8: the low side still uses eps."""
    logp = torch.log(torch.tensor([[1.5, 1.25, 0.5]]))
    terms = ppo_policy_terms(logp, torch.zeros(1, 3), torch.tensor([[1.0, 1.0, -1.0]]),
                             torch.ones(1, 3, dtype=torch.bool), clip_eps=0.2, clip_eps_high=0.28)
    torch.testing.assert_close(terms.loss, torch.tensor([[-1.28, -1.25, 0.8]]))
    assert terms.clipped.tolist() == [[True, False, True]]


def test_ipo_squares_the_error_away_from_its_minimum():
    """h = (-1 + 1.5) - (-2 + 1.5) = 1, beta 0.2: 1 / (2 beta) = 2.5, loss (1 - 2.5)^2 = 2.25
    (|h - 2.5| would be 1.5). d loss / d h = 2 (h - 2.5) = -3: -3 on policy_chosen, +3 on policy_rejected."""
    chosen, rejected = torch.tensor([-1.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    out = preference_loss(chosen, rejected, torch.tensor([-1.5]), torch.tensor([-1.5]), beta=0.2, loss_type="ipo")
    assert float(out.loss.detach()) == pytest.approx(2.25)
    out.loss.sum().backward()
    assert float(chosen.grad) == pytest.approx(-3.0) and float(rejected.grad) == pytest.approx(3.0)


def _prepare_rollout():
    """Row 0: 2 tokens, k1 KL [0.1, -0.2], score 1, values [0.5, 0.2]. Row 1: 1 token (+ padding whose
    KL 5 and value 9 must not count), KL [0.4], score -1, value [0.3]."""
    mask = torch.tensor([[True, True], [True, False]])
    ref = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]])
    return Rollout(prompts=torch.tensor([[1], [2]]), prompt_lengths=torch.tensor([1, 1]),
                   responses=torch.tensor([[3, 4], [5, 0]]), mask=mask,
                   old_log_probs=ref + torch.tensor([[0.1, -0.2], [0.4, 5.0]]), ref_log_probs=ref,
                   scores=torch.tensor([1.0, -1.0]), values=torch.tensor([[0.5, 0.2], [0.3, 9.0]]))


def test_ppo_prepare_value_targets_are_raw_advantages_plus_values():
    """kl_coef 0.5, gamma = lambda = 1. Rewards: row 0 [-0.05, 0.1 + 1] = [-0.05, 1.1]; row 1 [-0.2 - 1] = [-1.2].
    Advantages A_t = sum_{k>=t} r_k - V_t: row 0 [1.05 - 0.5, 1.1 - 0.2] = [0.55, 0.9]; row 1 [-1.5].
    Returns A + V: [[1.05, 1.1], [-1.2]], from the RAW advantages. The advantages the loss sees are whitened:
    mean -0.05/3, unbiased var 3.36167/2 = 1.68083 -> [0.43708, 0.70705, -1.14413]
    (whitened + V would give returns [0.937, 0.907, -0.844])."""
    ro = _prepare_rollout()
    ppo_prepare(ro, PPOHyperparams(gamma=1.0, lam=1.0), kl_coef=0.5)
    torch.testing.assert_close(ro.rewards, torch.tensor([[-0.05, 1.1], [-1.2, 0.0]]))
    torch.testing.assert_close(ro.returns, torch.tensor([[1.05, 1.1], [-1.2, 0.0]]))
    torch.testing.assert_close(ro.advantages, torch.tensor([[0.437084, 0.707048], [-1.144133, 0.0]]),
                               atol=1e-5, rtol=0)


def test_ppo_prepare_reward_whitening_keeps_the_mean():
    """whiten_rewards: rewards [-0.05, 1.1, -1.2] (as above) have mean -0.05, deviations [0, 1.15, -1.15],
    unbiased var 1.3225 = 1.15^2 -> whitened [0, 1, -1], plus the mean back: [-0.05, 0.95, -1.05].
    Then (advantages not whitened) A: row 0 [0.9 - 0.5, 0.95 - 0.2] = [0.4, 0.75], row 1 [-1.05 - 0.3] = [-1.35];
    returns [[0.9, 0.95], [-1.05]]."""
    ro = _prepare_rollout()
    ppo_prepare(ro, PPOHyperparams(gamma=1.0, lam=1.0, whiten_rewards=True, whiten_advantages=False), kl_coef=0.5)
    torch.testing.assert_close(ro.rewards, torch.tensor([[-0.05, 0.95], [-1.05, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ro.advantages, torch.tensor([[0.4, 0.75], [-1.35, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ro.returns, torch.tensor([[0.9, 0.95], [-1.05, 0.0]]), atol=1e-6, rtol=0)



def test_preference_metrics_do_not_warn_on_a_graph():
    """float() of a tensor that requires grad warned once per DPO run (torch UserWarning)."""
    policy = [torch.tensor([v], requires_grad=True) for v in (-1.0, -2.0)]
    out = preference_loss(*policy, torch.tensor([-1.5]), torch.tensor([-1.5]), beta=0.5)
    assert out.loss.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert out.metrics()["loss"] == pytest.approx(math.log1p(math.exp(-0.5)))


def test_sequence_kl_sums_the_log_ratio_per_response():
    """Two sampled responses, the second padded after 2 tokens:
    row 1: logp - ref = [-1 - -2, -0.5 - -0.5, -2 - -1] = [1, 0, -1]   -> sum 0
    row 2: [-0.1 - -1.1, -0.2 - -2.2, (pad) 5]                    -> 1 + 2 = 3
    mean (0 + 3) / 2 = 1.5; sample std sqrt(((0-1.5)^2 + (3-1.5)^2) / 1) = 2.1213;
    stderr 2.1213 / sqrt(2) = 1.5; per token 3 / 5 = 0.6."""
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-0.1, -0.2, 0.0]])
    ref = torch.tensor([[-2.0, -0.5, -1.0], [-1.1, -2.2, -5.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    kl = sequence_kl(logp, ref, mask)
    assert kl.mean == pytest.approx(1.5) and kl.stderr == pytest.approx(1.5)
    assert kl.per_token == pytest.approx(0.6) and kl.sequences == 2
    assert kl.over(1.0) and not kl.over(2.0) and not kl.over(None)
    with pytest.raises(ConfigError, match="same"):
        sequence_kl(logp, ref[:, :2], mask)
