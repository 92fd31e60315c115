"""Invariants of rollout collection and the policy-gradient loss on a tiny PaLM."""

import pytest
import torch

from palm_rlhf.generation import SamplingConfig
from palm_rlhf.generation.scoring import Scorer, pack_sequences, response_log_probs
from palm_rlhf.model.palm import PaLM
from palm_rlhf.rl.actor_critic import ActorCritic
from palm_rlhf.rl.collect import collect_rollout, rollout_packed
from palm_rlhf.rl.kl import kl_per_token
from palm_rlhf.rl.losses import aggregate, ppo_policy_terms
from palm_rlhf.rl.reference import Reference
from palm_rlhf.rl.rewards import as_reward_source


def tiny_palm(seed=0):
    torch.manual_seed(seed)
    return PaLM(dim=32, num_tokens=20, depth=1, heads=2, dim_head=16)


def prompts():
    return [torch.tensor([3, 4, 5, 6]), torch.tensor([7]), torch.tensor([8, 9])]


def count_of_token_5(prompts, completions):
    return [float((c == 5).float().mean()) if c.numel() else 0.0 for c in completions]


@pytest.fixture(params=[None, 64.0], ids=["seed-lora", "alpha-64"])
def setup(request):
    palm = tiny_palm()
    ac = ActorCritic(palm, lora_alpha=request.param)  # the frozen reference scope copies the alpha
    # a non-zero actor adapter, so the actor differs from the reference base
    with torch.no_grad():
        for p in ac.actor_parameters():
            p.normal_(0, 0.3)
    return palm, ac


def collect(palm, prompts, cfg, reward, ref, actor_critic=None):
    """collect_rollout with the scorer a trainer builds: the actor scope, the sampling temperature."""
    scorer = Scorer(palm, "actor", temperature=cfg.temperature, reference=ref, critic=actor_critic)
    return collect_rollout(scorer, prompts, cfg, reward)


def test_pack_sequences_layout():
    """prompt [3, 4] + response [5, 6] and prompt [7] + response [8] (+ pad):
    rows [3, 4, 5, 6] and [7, 8, 0, 0]; inputs drop the last column; response j of row i is
    predicted at p_i + j - 1: [[1, 2], [0, 1 (padding, any valid index)]]."""
    packed = pack_sequences(torch.tensor([[3, 4], [7, 0]]), torch.tensor([2, 1]), torch.tensor([[5, 6], [8, 0]]),
                            torch.tensor([[True, True], [True, False]]))
    assert packed.inputs.tolist() == [[3, 4, 5], [7, 8, 0]]
    assert packed.index[0].tolist() == [1, 2] and packed.index[1, 0] == 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recomputed_log_probs_equal_rollout_and_kl_starts_at_zero(temperature):
    """Learning-phase log-probs equal the generation engine's (<= 1e-5), for variable prompt lengths
    and EOS-stopped rows, and a fresh actor scope has exactly zero KL to the reference."""
    palm = tiny_palm()
    ac = ActorCritic(palm)
    ref = Reference(palm, ac.actor_lora_scope)
    assert ref.kind == "disabled_lora"
    cfg = SamplingConfig(max_new_tokens=12, temperature=temperature, eos_token=2, seed=0)
    ro = collect(palm, prompts() * 3, cfg, as_reward_source(count_of_token_5), ref, actor_critic=ac)
    assert ro.mask.any(-1).all()
    palm.train()
    with torch.no_grad():
        logp, _ = Scorer(palm, "actor", temperature=temperature).policy(rollout_packed(ro))
    assert (logp - ro.old_log_probs).abs().max() <= 1e-5
    assert kl_per_token(ro.old_log_probs, ro.ref_log_probs)[ro.mask].abs().max() <= 1e-5
    assert bool((ro.values[~ro.mask] == 0).all())


def test_frozen_scope_reference_for_pretrained_adapter(setup):
    """A non-zero actor adapter is snapshotted into a frozen sibling scope (no model copy): the
    reference equals the actor at the start, and stays put when the actor changes."""
    palm, ac = setup
    ref = Reference(palm, "actor")
    assert ref.kind == "frozen_scope" and ref.model is palm
    cfg = SamplingConfig(max_new_tokens=6, seed=1)
    ro = collect(palm, prompts(), cfg, as_reward_source(count_of_token_5), ref)
    torch.testing.assert_close(ro.ref_log_probs, ro.old_log_probs, atol=1e-5, rtol=0)
    with torch.no_grad():
        for p in ac.actor_parameters():
            p.add_(0.1)
    ref_logp = Scorer(palm, "actor", reference=ref).reference_log_probs(rollout_packed(ro))
    assert (ref_logp - ro.ref_log_probs).abs().max() <= 1e-6


def test_ppo_gradient_at_ratio_one_is_reinforce(setup):
    """With old = current log-probs the clipped loss's gradient is that of -A * logp (REINFORCE)."""
    palm, ac = setup
    ref = Reference(palm, "actor")
    ro = collect(palm, prompts() * 2, SamplingConfig(max_new_tokens=8, eos_token=2, seed=3),
                 as_reward_source(count_of_token_5), ref)
    adv = torch.randn(ro.mask.shape, generator=torch.Generator().manual_seed(0)).masked_fill(~ro.mask, 0)
    packed = rollout_packed(ro)

    def grads(loss_fn):
        for p in ac.actor_parameters():
            p.grad = None
        logp, _ = Scorer(palm, "actor").policy(packed)
        loss_fn(logp).backward()
        return [p.grad.clone() for p in ac.actor_parameters()]

    ppo = grads(lambda lp: aggregate(ppo_policy_terms(lp, ro.old_log_probs, adv, ro.mask).loss, ro.mask))
    reinforce = grads(lambda lp: aggregate(-adv * lp, ro.mask))
    for a, b in zip(ppo, reinforce):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_padding_gets_zero_gradient_and_cannot_change_the_loss(setup):
    """Gradients w.r.t. per-token log-probs are exactly 0 on padding, and garbage written into
    padded response slots changes neither the loss nor the parameter gradients."""
    palm, ac = setup
    ro = collect(palm, prompts() * 2, SamplingConfig(max_new_tokens=10, eos_token=2, seed=4),
                 as_reward_source(count_of_token_5), Reference(palm, "actor"))
    assert (~ro.mask).any(), "need some padding for this test"
    adv = torch.ones(ro.mask.shape)
    leaf = ro.old_log_probs.clone().requires_grad_(True)
    aggregate(ppo_policy_terms(leaf, ro.old_log_probs, adv, ro.mask).loss, ro.mask).backward()
    assert bool((leaf.grad[~ro.mask] == 0).all())

    def loss_and_grads(responses):
        for p in ac.actor_parameters():
            p.grad = None
        packed = pack_sequences(ro.prompts, ro.prompt_lengths, responses, ro.mask)
        logp, ent = response_log_probs(palm, packed, finetune_scope="actor", with_entropy=True)
        loss = aggregate(ppo_policy_terms(logp, ro.old_log_probs, adv, ro.mask).loss - 0.01 * ent, ro.mask)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in ac.actor_parameters()]

    garbage = ro.responses.masked_fill(~ro.mask, 17)
    l1, g1 = loss_and_grads(ro.responses)
    l2, g2 = loss_and_grads(garbage)
    torch.testing.assert_close(l1, l2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_filtered_sampling_recomputes_old_log_probs():
    """With top-k sampling the stored old log-probs are those of the unfiltered policy (ratio starts at 1)."""
    palm = tiny_palm(1)
    ac = ActorCritic(palm)
    ref = Reference(palm, "actor")
    ro = collect(palm, prompts(), SamplingConfig(max_new_tokens=6, top_k=3, seed=0),
                 as_reward_source(count_of_token_5), ref)
    with torch.no_grad():
        logp, _ = Scorer(palm, "actor").policy(rollout_packed(ro))
    assert (logp - ro.old_log_probs).abs().max() <= 1e-6
