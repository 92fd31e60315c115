"""The PPO and GRPO minibatch losses on a tiny PaLM: every term is there, with the right sign.

The rollout is built by hand with old log-probs equal to the current policy's, so the ratio is
exactly 1 and the policy term is -(aggregate of A): a number worked by hand. The entropy, value
and KL terms are then checked by switching each coefficient on and comparing with the term
computed independently, and by gradient identities.
"""

import math

import pytest
import torch

from palm_rlhf.model.palm import PaLM
from palm_rlhf.rl.actor_critic import ActorCritic
from palm_rlhf.rl.grpo import GRPOHyperparams, grpo_loss
from palm_rlhf.rl.losses import aggregate
from palm_rlhf.rl.ppo import PPOHyperparams, ppo_loss
from palm_rlhf.rl.rollout import Rollout
from palm_rlhf.generation.scoring import Scorer, pack_sequences, response_log_probs

# two rows: prompt [3, 4, 5] + response [5, 6, 2]; prompt [7] + response [8, 9] (+ padding)
MASK = torch.tensor([[True, True, True], [True, True, False]])
# PPO advantages: real tokens sum to 1 - 2 + 3 + 0.5 + 1.5 = 4 over 5 tokens -> policy term -4/5 = -0.8
ADV = torch.tensor([[1.0, -2.0, 3.0], [0.5, 1.5, 0.0]])


def packed():
    return pack_sequences(torch.tensor([[3, 4, 5], [7, 0, 0]]), torch.tensor([3, 1]),
                          torch.tensor([[5, 6, 2], [8, 9, 0]]), MASK)


@pytest.fixture
def actor_critic():
    torch.manual_seed(0)
    palm = PaLM(dim=16, num_tokens=24, depth=1, heads=2, dim_head=8)
    ac = ActorCritic(palm, actor_lora_r=4, critic_lora_r=4)
    with torch.no_grad():  # peaked next-token distributions (entropy well below ln 24), non-zero adapters and
        palm.token_emb.weight.mul_(15)  # value head, so every gradient path is live
        for p in ac.actor_parameters() + ac.critic_parameters():
            p.normal_(0, 0.2)
    return ac


def scorer(ac):
    return Scorer(ac.actor_palm, ac.actor_lora_scope, critic=ac)


def ppo_loss_of(ac, mb, hp):
    """The PPO trainer's `_loss`: score the minibatch under the current weights, then the pure loss."""
    logp, entropy = scorer(ac).policy(packed(), with_entropy=True)
    return ppo_loss(logp, entropy, scorer(ac).values(packed()), mb, hp)


def grpo_loss_of(palm, mb, hp):
    logp, entropy = Scorer(palm, "actor").policy(packed(), with_entropy=True)
    return grpo_loss(logp, entropy, mb, hp)


def rollout(logp, **kw):
    """A minibatch whose old log-probs are `logp` (detached): ratio 1 under the same weights."""
    p = packed()
    return Rollout(prompts=torch.tensor([[3, 4, 5], [7, 0, 0]]), prompt_lengths=torch.tensor([3, 1]),
                   responses=p.responses, mask=MASK, old_log_probs=logp.detach(),
                   ref_log_probs=kw.pop("ref", logp.detach()), scores=torch.zeros(2), **kw)


def ppo_minibatch(ac, returns=None, advantages=ADV):
    with torch.no_grad():
        logp, _ = scorer(ac).policy(packed())
        values = scorer(ac).values(packed())
    returns = values + 1.0 if returns is None else returns
    return rollout(logp, values=values, advantages=advantages.masked_fill(~MASK, 0), returns=returns)


def grads(params, loss):
    for p in params:
        p.grad = None
    loss.backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


def test_ppo_loss_is_policy_plus_value_minus_entropy(actor_critic):
    """At ratio 1 the policy term is -0.8 (see ADV). Returns = V + 1 with no value clip: the value term is
    0.5 * 1^2 = 0.5 per token. So loss(vf 0.5, ent 0) = -0.8 + 0.25 = -0.55, and switching on ent_coef 0.1
    changes it by exactly -0.1 * (mean entropy): the bonus lowers the loss where entropy is high."""
    ac = actor_critic
    mb = ppo_minibatch(ac)
    no_ent, stats = ppo_loss_of(ac, mb, PPOHyperparams(vf_coef=0.5, ent_coef=0.0, value_clip=None))
    assert no_ent.item() == pytest.approx(-0.55, abs=1e-5)
    assert float(stats["policy_loss"]) == pytest.approx(-0.8, abs=1e-5)
    assert float(stats["value_loss"]) == pytest.approx(0.5, abs=1e-5)
    no_vf, _ = ppo_loss_of(ac, mb, PPOHyperparams(vf_coef=0.0, ent_coef=0.0, value_clip=None))
    assert no_vf.item() == pytest.approx(-0.8, abs=1e-5)
    _, entropy = scorer(ac).policy(packed(), with_entropy=True)
    mean_entropy = aggregate(entropy, MASK).item()
    assert 0.5 < mean_entropy < 2.5  # 24 tokens: at most ln 24 = 3.18
    with_ent, _ = ppo_loss_of(ac, mb, PPOHyperparams(vf_coef=0.5, ent_coef=0.1, value_clip=None))
    assert (with_ent - no_ent).item() == pytest.approx(-0.1 * mean_entropy, rel=1e-5)


def test_ppo_value_loss_gradient_reaches_the_critic_only(actor_critic):
    """A = 0 and ent_coef 0: only the value term is left. Its gradient on the value head's bias is
    vf_coef * mean(V - R) = 0.5 * (-1) = -0.5 (returns = V + 1); the critic adapter gets a gradient,
    the actor none."""
    ac = actor_critic
    mb = ppo_minibatch(ac, advantages=torch.zeros(2, 3))
    loss, _ = ppo_loss_of(ac, mb, PPOHyperparams(vf_coef=0.5, value_clip=None))
    loss.backward()
    assert float(ac.value_head.bias.grad) == pytest.approx(-0.5, abs=1e-5)
    critic_lora = list(ac.critic.finetune_parameters(ac.critic_lora_scope))
    assert any(float(p.grad.abs().max()) > 1e-6 for p in critic_lora if p.grad is not None)
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in ac.actor_parameters())


def test_ppo_loss_gradient_at_ratio_one_is_reinforce(actor_critic):
    """vf_coef 0, ent_coef 0, ratio 1: grad ppo_loss = grad token_mean(-A * logp) on the actor."""
    ac = actor_critic
    mb = ppo_minibatch(ac)
    params = ac.actor_parameters()
    ppo = grads(params, ppo_loss_of(ac, mb, PPOHyperparams(vf_coef=0.0))[0])
    logp, _ = scorer(ac).policy(packed())
    reinforce = grads(params, aggregate(-mb.advantages * logp, MASK))
    assert any(float(g.abs().max()) > 1e-6 for g in ppo)
    for a, b in zip(ppo, reinforce):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)


def entropy_after_step(params, score, loss_fn, lr=0.05):
    """Mean entropy after one plain gradient-descent step on `params` (the actor adapter); `score` is
    the scorer of that actor."""
    g = grads(params, loss_fn())
    with torch.no_grad():
        for p, gp in zip(params, g):
            p.sub_(lr * gp)
        _, entropy = score.policy(packed(), with_entropy=True)
    return aggregate(entropy, MASK).item()


def test_ppo_entropy_bonus_gradient_raises_entropy(actor_critic):
    """A = 0, vf_coef 0, ent_coef 1: the loss is -entropy, so a descent step raises the entropy."""
    ac = actor_critic
    mb = ppo_minibatch(ac, advantages=torch.zeros(2, 3))
    with torch.no_grad():
        before = float(aggregate(scorer(ac).policy(packed(), with_entropy=True)[1], MASK))
    after = entropy_after_step(ac.actor_parameters(), scorer(ac), lambda: ppo_loss_of(ac, mb, PPOHyperparams(vf_coef=0.0, ent_coef=1.0))[0])
    assert after > before + 1e-4, (before, after)


# ---------------------------------------------------------------- GRPO

def grpo_minibatch(palm, advantages, ratio=1.0, ref_shift=0.0):
    """Old log-probs = current - log(ratio) (so the ratio is `ratio` on every token); reference =
    current - ref_shift (so logp - ref = ref_shift on every token)."""
    with torch.no_grad():
        logp, _ = response_log_probs(palm, packed(), finetune_scope="actor")
    adv = torch.tensor(advantages)[:, None].expand(2, 3).masked_fill(~MASK, 0)
    return rollout(logp - math.log(ratio), ref=logp - ref_shift, advantages=adv)


@pytest.fixture
def grpo_palm(actor_critic):
    return actor_critic.actor_palm


def test_grpo_loss_terms_and_signs(grpo_palm):
    """seq_mean over rows of 3 and 2 tokens. A = [1, -0.5] at ratio 1: policy term (-1 + 0.5) / 2 = -0.25.
    Reference ln 2 below the policy on every token: k3 = e^-ln2 + ln2 - 1 = 0.193147 per token, seq mean
    0.193147; kl_coef 0.1 adds +0.0193147. ent_coef 0.1 adds -0.1 * seq_mean(entropy)."""
    mb = grpo_minibatch(grpo_palm, [1.0, -0.5], ref_shift=math.log(2))
    base, stats = grpo_loss_of(grpo_palm, mb, GRPOHyperparams(group_size=2, kl_coef=0.0))
    assert base.item() == pytest.approx(-0.25, abs=1e-5)
    with_kl, stats = grpo_loss_of(grpo_palm, mb, GRPOHyperparams(group_size=2, kl_coef=0.1))
    assert with_kl.item() == pytest.approx(-0.25 + 0.1 * (0.5 + math.log(2) - 1), abs=1e-5)
    _, entropy = response_log_probs(grpo_palm, packed(), finetune_scope="actor", with_entropy=True)
    seq_entropy = aggregate(entropy, MASK, "seq_mean").item()
    with_ent, _ = grpo_loss_of(grpo_palm, mb, GRPOHyperparams(group_size=2, kl_coef=0.0, ent_coef=0.1))
    assert (with_ent - base).item() == pytest.approx(-0.1 * seq_entropy, rel=1e-5)


def test_grpo_uses_clip_eps_high(grpo_palm):
    """Ratio 1.5 everywhere, A = [1, -1], eps 0.2, eps_high 0.28, seq_mean:
    row 0: max(-1.5, -1.28) = -1.28; row 1: max(1.5, 1.28) = 1.5 -> (-1.28 + 1.5) / 2 = 0.11
    (a symmetric clip would give (-1.2 + 1.5) / 2 = 0.15)."""
    mb = grpo_minibatch(grpo_palm, [1.0, -1.0], ratio=1.5)
    hp = GRPOHyperparams(group_size=2, kl_coef=0.0, clip_eps=0.2, clip_eps_high=0.28)
    loss, stats = grpo_loss_of(grpo_palm, mb, hp)
    assert loss.item() == pytest.approx(0.11, abs=1e-5)
    assert float(stats["clip_frac"]) == pytest.approx(3 / 5, abs=1e-6)


def test_grpo_entropy_bonus_gradient_raises_entropy(grpo_palm):
    """A = 0, kl_coef 0, ent_coef 1: a descent step on the GRPO loss raises the entropy."""
    score = Scorer(grpo_palm, "actor")
    mb = grpo_minibatch(grpo_palm, [0.0, 0.0])
    with torch.no_grad():
        before = float(aggregate(score.policy(packed(), with_entropy=True)[1], MASK))
    hp = GRPOHyperparams(group_size=2, kl_coef=0.0, ent_coef=1.0, aggregation="token_mean")
    after = entropy_after_step(list(grpo_palm.finetune_parameters("actor")), score,
                               lambda: grpo_loss_of(grpo_palm, mb, hp)[0])
    assert after > before + 1e-4, (before, after)
