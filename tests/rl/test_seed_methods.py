"""The seed package's methods (issue 34) against numbers worked by hand: SPO, MaxRL, Dr. GRPO's
constant, entropy-shaped advantages, score centring (full and top-k, with an importance weight),
FlowRL's trajectory balance and TPO's target and loss. Each docstring shows the arithmetic."""

import math

import pytest
import torch

from palm_rlhf.errors import ConfigError
from palm_rlhf.rl.advantages import entropy_shaped_advantages, group_advantages
from palm_rlhf.rl.flowrl import PartitionFunction, trajectory_balance_loss
from palm_rlhf.rl.losses import ppo_policy_terms, score_centering_loss, spo_policy_terms
from palm_rlhf.rl.tpo import tpo_loss, tpo_targets


def test_spo_penalises_the_ratio_quadratically_instead_of_clipping():
    """eps 0.2, so |A| / (2 eps) = 2.5 |A|. Token 1: A = 1, ratio e^0.5 = 1.648721: -1.648721 + 2.5 *
    0.648721^2 = -1.648721 + 2.5 * 0.420839 = -0.596624; PPO clips it at -1.2 with no gradient.
    Token 2: A = -2, ratio 1: 2 + 0 = 2. Token 3: A = -1, ratio 0.5: 0.5 + 2.5 * 0.25 = 1.125 (the
    penalty uses |A|: with A it would be 0.5 - 0.625 = -0.125). Padding: 0.
    Gradients in logp: ratio * (-A + |A|/eps * (ratio - 1)): token 1 1.648721 * (-1 + 5 * 0.648721)
    = 1.648721 * 2.243606 = 3.699075 (pushes the ratio back; PPO's is 0); token 2: 2 (= -A);
    token 3: 0.5 * (1 + 5 * -0.5) = -0.75."""
    logp = torch.tensor([[0.5, 0.0, math.log(0.5), 0.0]], requires_grad=True)
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -2.0, -1.0, 5.0]])
    mask = torch.tensor([[True, True, True, False]])
    terms = spo_policy_terms(logp, old, adv, mask, eps=0.2)
    torch.testing.assert_close(terms.loss, torch.tensor([[-0.596624, 2.0, 1.125, 0.0]]), atol=1e-5, rtol=0)
    assert terms.clipped.tolist() == [[True, False, True, False]]
    terms.loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[3.699075, 2.0, -0.75, 0.0]]), atol=1e-5, rtol=0)
    ppo = ppo_policy_terms(logp.detach(), old, adv, mask, 0.2)
    assert float(ppo.loss[0, 0]) == pytest.approx(-1.2)
    with pytest.raises(ConfigError, match="clip_eps"):
        spo_policy_terms(logp, old, adv, mask, eps=0.0)


def test_maxrl_divides_by_the_group_mean_and_dr_grpo_by_a_constant():
    """Pass/fail rewards in groups of 4. [1, 0, 0, 0]: mean 0.25 -> (r - 0.25) / 0.25 = [3, -1, -1, -1];
    [1, 1, 1, 0]: mean 0.75 -> [1/3, 1/3, 1/3, -1]. A hard prompt (rarely solved) weighs more.
    GRPO's std (both groups: unbiased std 0.5) gives [1.5, -0.5, -0.5, -0.5] and [0.5, 0.5, 0.5, -1.5];
    Dr. GRPO with constant 5 gives [0.15, -0.05, -0.05, -0.05] and [0.05, 0.05, 0.05, -0.15]."""
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    adv, zero = group_advantages(scores, 4, "mean")
    torch.testing.assert_close(adv, torch.tensor([3.0, -1.0, -1.0, -1.0, 1 / 3, 1 / 3, 1 / 3, -1.0]))
    assert zero == 0
    adv, _ = group_advantages(scores, 4, "std")
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5, 0.5, 0.5, 0.5, -1.5]), atol=1e-5, rtol=0)
    adv, _ = group_advantages(scores, 4, "constant", constant=5.0)
    torch.testing.assert_close(adv, torch.tensor([0.15, -0.05, -0.05, -0.05, 0.05, 0.05, 0.05, -0.15]))
    adv, zero = group_advantages(torch.tensor([0.0, 0.0, 2.0, 2.0]), 2, "mean")  # no variance: exactly 0
    assert adv.tolist() == [0.0] * 4 and zero == 2
    with pytest.raises(ConfigError, match="advantage_norm"):
        group_advantages(scores, 4, "median")


def test_entropy_bonus_is_capped_at_abs_advantage_over_kappa():
    """scale 0.4, kappa 2. Row 1, A = 1: entropies [0.5, 3] -> bonus min(0.2, 0.5) = 0.2 and min(1.2, 0.5)
    = 0.5 -> [1.2, 1.5]. Row 2, A = -1: min(0.4, 0.5) = 0.4 -> -0.6 (the sign of a negative advantage
    survives: the cap is 0.5). Row 3, A = 0: the bonus is capped at 0 -> 0. Padding 0."""
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]])
    ent = torch.tensor([[0.5, 3.0], [1.0, 9.0], [2.0, 2.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    out = entropy_shaped_advantages(adv, ent, mask, scale=0.4, kappa=2.0)
    torch.testing.assert_close(out, torch.tensor([[1.2, 1.5], [-0.6, 0.0], [0.0, 0.0]]))
    assert not out.requires_grad  # the bonus is a constant of the loss
    torch.testing.assert_close(entropy_shaped_advantages(adv, ent, mask, 0.0, 2.0), adv.masked_fill(~mask, 0.0))


def _logits(*probs):
    return torch.tensor(probs).log().view(1, 1, -1)


def test_score_centering_full_vocabulary():
    """V = 2, one token, action 0, A = 2, sampler q = [0.5, 0.5], policy p = [0.25, 0.75].
    f = 1: centred = log 0.25 - (0.5 log 0.25 + 0.5 log 0.75) = 0.5 log(0.25 / 0.75) = -0.5 ln 3,
    loss = -2 * -0.5 ln 3 = ln 3 = 1.098612. In the logits z: centred = 0.5 (z0 - z1), so the gradient
    is -2 * [0.5, -0.5] = [-1, 1] (REINFORCE's would be -2 * ([1, 0] - p) = [-1.5, 1.5]).
    f(r) = min(r, 1) (truncated IS): r_a = 0.25 / 0.5 = 0.5; c = [0.5 * min(0.5, 1), 0.5 * min(1.5, 1)]
    = [0.25, 0.5]; centred = 0.5 log 0.25 - 0.25 log 0.25 - 0.5 log 0.75 = 0.25 log 0.25 - 0.5 log 0.75
    = -0.346574 + 0.143841 = -0.202733; loss = 0.405465 (= ln 1.5)."""
    z = _logits(0.25, 0.75).requires_grad_(True)
    q = torch.tensor([0.5, 0.5]).view(1, 1, 2)
    a, adv, m = torch.tensor([[0]]), torch.tensor([[2.0]]), torch.tensor([[True]])
    loss = score_centering_loss(z.log_softmax(-1), q, a, adv, m)
    assert float(loss.detach()) == pytest.approx(math.log(3.0), abs=1e-5)
    loss.sum().backward()
    torch.testing.assert_close(z.grad.view(-1), torch.tensor([-1.0, 1.0]))
    tis = score_centering_loss(z.detach().log_softmax(-1), q, a, adv, m, weight_fn=lambda r: r.clamp(max=1.0))
    assert float(tis) == pytest.approx(math.log(1.5), abs=1e-5)
    padded = score_centering_loss(z.detach().log_softmax(-1), q, a, adv, torch.tensor([[False]]))
    assert float(padded) == 0.0


def test_score_centering_on_policy_gradient_is_reinforce():
    """p = q: sum_v p_v grad log p_v = grad sum_v p_v = 0, so the gradient is -A grad log p_a."""
    torch.manual_seed(0)
    z = torch.randn(2, 3, 5, requires_grad=True)
    a, adv, m = torch.randint(0, 5, (2, 3)), torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool)
    lp = z.log_softmax(-1)
    score_centering_loss(lp, lp.detach().exp(), a, adv, m).sum().backward()
    g_sc = z.grad.clone()
    z.grad = None
    (-adv * z.log_softmax(-1).gather(-1, a[..., None]).squeeze(-1)).sum().backward()
    torch.testing.assert_close(g_sc, z.grad)


def test_score_centering_top_k_folds_the_tail_into_one_event():
    """V = 3, k = 1, q = [0.5, 0.3, 0.2], p = [0.4, 0.4, 0.2], action 1, A = 1, f = 1.
    Head: token 0, c = 0.5. Tails: q 0.5, p 0.6, rho = 1.2, c = 0.5 - (1 / 1.2) * 0.4 = 1/6.
    centred = log 0.4 - (1/6) log 0.4 = (5/6) * -0.916291 = -0.763576; loss = 0.763576.
    k = 3 (the whole vocabulary) equals the full version: log 0.4 - (0.5 log 0.4 + 0.3 log 0.4
    + 0.2 log 0.2) = 0.2 log 0.4 - 0.2 log 0.2 = 0.2 ln 2 = 0.138629; loss -0.138629."""
    lp = _logits(0.4, 0.4, 0.2)
    q = torch.tensor([0.5, 0.3, 0.2]).view(1, 1, 3)
    a, adv, m = torch.tensor([[1]]), torch.tensor([[1.0]]), torch.tensor([[True]])
    assert float(score_centering_loss(lp, q, a, adv, m, topk=1)) == pytest.approx(0.763576, abs=1e-5)
    assert float(score_centering_loss(lp, q, a, adv, m, topk=3)) == pytest.approx(-0.2 * math.log(2), abs=1e-5)
    assert float(score_centering_loss(lp, q, a, adv, m)) == pytest.approx(-0.2 * math.log(2), abs=1e-5)


def test_trajectory_balance_loss():
    """beta 2, clip 0.2. Row 1: log Z 0.5, logp [-1, -2] (mean -1.5), ref [-1, -1] (mean -1), r 0.2, old =
    logp (w = 1): balance 0.5 - 1.5 - 0.4 + 1 = -0.4, loss 0.16. Row 2: one real token, logp -1, old -1.5:
    the ratio e^0.5 = 1.65 is clipped to w = 1.2; log Z 0, ref -1, r -0.5: balance 0 - 1 + 1 + 1 = 1,
    loss 1.2. d loss / d log Z = 2 w * balance = [-0.8, 2.4]; d / d logp_t = 2 w * balance / |y|:
    row 1 [-0.4, -0.4], row 2 [2.4, 0 (padding)]."""
    log_z = torch.tensor([0.5, 0.0], requires_grad=True)
    logp = torch.tensor([[-1.0, -2.0], [-1.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0], [-1.0, 7.0]])
    old = torch.tensor([[-1.0, -2.0], [-1.5, 3.0]])
    mask = torch.tensor([[True, True], [True, False]])
    loss, balance = trajectory_balance_loss(log_z, logp, ref, old, mask, torch.tensor([0.2, -0.5]), beta=2.0)
    torch.testing.assert_close(loss, torch.tensor([0.16, 1.2]))
    torch.testing.assert_close(balance, torch.tensor([-0.4, 1.0]))
    loss.sum().backward()
    torch.testing.assert_close(log_z.grad, torch.tensor([-0.8, 2.4]))
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.4, -0.4], [2.4, 0.0]]))


def test_partition_function_starts_at_log_z_zero_and_learns():
    pf = PartitionFunction(dim=4, hidden=8, layers=2)
    e = torch.randn(3, 4)
    assert pf(e).tolist() == [0.0, 0.0, 0.0]
    pf(e).sum().backward()
    assert float(pf.out.weight.grad.abs().sum()) > 0


def test_tpo_target_tilts_the_old_policy_by_the_z_scored_reward():
    """G = 2, old sequence log-probs equal ([-1, -1]: old softmax [0.5, 0.5]), rewards [1, 0]: mean 0.5,
    unbiased std 0.707107, z = [1, -1] * 0.707107. eta 1: q = softmax([0.707107, -0.707107]) =
    [sigmoid(1.414214), ...] = [0.804429, 0.195571]; eta 0.5: [sigmoid(2.828427), ...] = [0.944193, 0.055807].
    Old log-probs [-1, -1 - ln 3] (old softmax [0.75, 0.25]) and rewards [3, 3] (no variance): q = [0.75, 0.25].
    Policy equal to old on group 1: cross-entropy ln 2 = 0.693147; d/dlogp = softmax - q = [-0.304429,
    0.304429]. With ent_coef 0.1 and mean entropies [1, 3]: loss ln 2 - 0.1 * 2 = 0.493147.
    Group 2 (no variance): loss 0 and no gradient, whatever the entropy bonus."""
    old = torch.tensor([-1.0, -1.0, -1.0, -1.0 - math.log(3.0)])
    scores = torch.tensor([1.0, 0.0, 3.0, 3.0])
    q, var = tpo_targets(old, scores, 2, eta=1.0)
    torch.testing.assert_close(q, torch.tensor([[0.804429, 0.195571], [0.75, 0.25]]), atol=1e-5, rtol=0)
    assert var.tolist() == [True, False]
    q_half, _ = tpo_targets(old, scores, 2, eta=0.5)
    torch.testing.assert_close(q_half[0], torch.tensor([0.944193, 0.055807]), atol=1e-5, rtol=0)
    logp = old.clone().requires_grad_(True)
    ent = torch.tensor([1.0, 3.0, 1.0, 3.0], requires_grad=True)
    loss = tpo_loss(logp, ent, q, var, 2, ent_coef=0.1)
    torch.testing.assert_close(loss, torch.tensor([math.log(2.0) - 0.2, 0.0]))
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-0.304429, 0.304429, 0.0, 0.0]), atol=1e-5, rtol=0)
    assert ent.grad[2:].tolist() == [0.0, 0.0]
    with pytest.raises(ConfigError, match="eta"):
        tpo_targets(old, scores, 2, eta=0.0)


def test_grpo_loss_wires_the_options():
    """One token, logp 0.5, old 0 (ratio e^0.5 = 1.648721), A = 1, entropy 0.5, no KL (reference = policy).
    clip (eps 0.2): max(-1.648721, -1.2) = -1.2. spo: -0.596624 (as in the SPO test above).
    entropy_advantage scale 0.4, kappa 2: A' = 1 + min(0.2, 0.5) = 1.2 -> clip: -1.2 * 1.2 = -1.44.
    score_centering without the vocabulary-sized inputs is an InputError."""
    from palm_rlhf.errors import InputError
    from palm_rlhf.rl.grpo import GRPOHyperparams, grpo_loss
    from palm_rlhf.rl.rollout import Rollout
    logp = torch.tensor([[0.5]])
    mb = Rollout(prompts=torch.ones(1, 1, dtype=torch.long), prompt_lengths=torch.ones(1, dtype=torch.long),
                 responses=torch.ones(1, 1, dtype=torch.long), mask=torch.ones(1, 1, dtype=torch.bool),
                 old_log_probs=torch.zeros(1, 1), ref_log_probs=logp.clone(), scores=torch.zeros(1),
                 advantages=torch.ones(1, 1))
    ent = torch.tensor([[0.5]])
    loss = lambda **kw: float(grpo_loss(logp, ent, mb, GRPOHyperparams(group_size=2, kl_coef=0.0, **kw))[0])
    assert loss() == pytest.approx(-1.2)
    assert loss(policy_loss="spo") == pytest.approx(-0.596624, abs=1e-5)
    assert loss(entropy_scale=0.4, entropy_kappa=2.0) == pytest.approx(-1.44)
    with pytest.raises(InputError, match="score_centering"):
        loss(policy_loss="score_centering")
