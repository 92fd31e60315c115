import math

import pytest
import torch
from torch import nn

from palm_rlhf import ImplicitPRM, PaLM
from palm_rlhf.errors import ConfigError, InputError
from palm_rlhf.rl.reward_losses import (
    binned_rating_loss,
    bradley_terry_loss,
    implicit_prm_loss,
    pairwise_metrics,
    rating_metrics,
    rating_mse_loss,
)


def test_bradley_terry_hand_computed():
    """gaps: 2 - 1 = 1 -> -log sigma(1) = log(1 + e^-1) = 0.313262;
             0 - 0 = 0 -> log 2 = 0.693147;
             with margin 0.5 on row 0: gap 0.5 -> log(1 + e^-0.5) = 0.474077."""
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    per_pair = bradley_terry_loss(rc, rr, reduction="none")
    torch.testing.assert_close(per_pair, torch.tensor([0.313262, 0.693147]), atol=1e-6, rtol=0)
    assert bradley_terry_loss(rc, rr).item() == pytest.approx((0.313262 + 0.693147) / 2, abs=1e-6)
    with_margin = bradley_terry_loss(rc, rr, margin=torch.tensor([0.5, 0.0]), reduction="none")
    torch.testing.assert_close(with_margin, torch.tensor([0.474077, 0.693147]), atol=1e-6, rtol=0)
    # finite even for a huge wrong-way gap: -log sigma(-1000) = 1000
    assert bradley_terry_loss(torch.tensor([0.0]), torch.tensor([1000.0])).item() == pytest.approx(1000.0)
    with pytest.raises(InputError, match="same shape"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))


def test_binned_and_mse_hand_computed():
    """logits [0, ln 3] -> probs [1/4, 3/4]; label 1 -> -ln(3/4) = 0.287682, label 0 -> ln 4 = 1.386294.
    MSE of [1, 3] vs [0, 1]: (1 + 4) / 2 = 2.5."""
    logits = torch.tensor([[0.0, math.log(3)], [0.0, math.log(3)]])
    assert binned_rating_loss(logits, torch.tensor([1, 0])).item() == pytest.approx((0.287682 + 1.386294) / 2, abs=1e-6)
    assert binned_rating_loss(logits, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.836988, abs=1e-6)
    with pytest.raises(InputError, match="whole numbers"):
        binned_rating_loss(logits, torch.tensor([0.5, 1.0]))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        binned_rating_loss(logits, torch.tensor([2, 0]))
    assert rating_mse_loss(torch.tensor([1.0, 3.0]), torch.tensor([0, 1])).item() == pytest.approx(2.5)


def test_metrics_hand_computed():
    """gaps [1, -2, 0] -> accuracy (1 + 0 + 0.5) / 3 = 0.5, mean margin -1/3.
    ratings pred [0.6, 2.4, 3.0] vs [1, 2, 4]: rounded [1, 2, 3] -> accuracy 2/3; MAE (0.4 + 0.4 + 1) / 3 = 0.6."""
    m = pairwise_metrics(torch.tensor([1.0, 0.0, 5.0]), torch.tensor([0.0, 2.0, 5.0]))
    assert m["accuracy"] == pytest.approx(0.5) and m["mean_margin"] == pytest.approx(-1 / 3)
    r = rating_metrics(torch.tensor([0.6, 2.4, 3.0]), torch.tensor([1, 2, 4]))
    assert r["accuracy"] == pytest.approx(2 / 3) and r["mae"] == pytest.approx(0.6)


class FixedLogits(nn.Module):
    """Ignores its input; returns the same logits at every position (vocab of 2)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x):
        return self.logits.expand(*x.shape, -1)


def test_implicit_rewards_hand_computed():
    """policy logits [0, ln 3] -> p = [1/4, 3/4]; reference logits [0, 0] -> [1/2, 1/2]; beta 0.1.
    token 1: 0.1 * ln(0.75 / 0.5) = 0.0405465; token 0: 0.1 * ln(0.25 / 0.5) = -0.0693147.
    seq [0, 1, 0, -1]: targets [1, 0, -1] -> [0.0405465, -0.0693147, 0 (padding)].
    Loss with label 1: R = -0.0287682, -log sigma(R) = log(1 + e^0.0287682) = 0.707635;
    label 0: -log sigma(-R) = log(1 + e^-0.0287682) = 0.678867."""
    prm = ImplicitPRM(FixedLogits([0.0, math.log(3)]), ref_model=FixedLogits([0.0, 0.0]), beta=0.1)
    seq = torch.tensor([[0, 1, 0, -1]])
    rewards = prm(seq)
    torch.testing.assert_close(rewards, torch.tensor([[0.0405465, -0.0693147, 0.0]]), atol=1e-6, rtol=0)
    assert prm(seq, labels=torch.tensor([1.0])).item() == pytest.approx(0.707635, abs=1e-6)
    assert prm(seq, labels=torch.tensor([0.0])).item() == pytest.approx(0.678867, abs=1e-6)
    assert implicit_prm_loss(rewards, torch.tensor([1.0])).item() == pytest.approx(0.707635, abs=1e-6)
    # the loss trains the policy only: the reference gets no gradient
    prm(seq, labels=torch.tensor([1.0])).backward()
    assert prm.model.logits.grad is not None and prm.ref_model.logits.grad is None
    assert [id(p) for p in prm.parameters()] == [id(prm.model.logits)]


def test_default_reference_is_a_frozen_copy():
    model = FixedLogits([0.0, 1.0])
    prm = ImplicitPRM(model)
    assert prm.ref_model is not model and not prm.ref_model.logits.requires_grad
    assert torch.count_nonzero(prm(torch.tensor([[0, 1, 1]]))) == 0  # identical models: zero reward


def test_lora_scope_reference_needs_no_copy():
    """With finetune_scope, the reference is the same PaLM with the scope disabled: rewards are 0 while
    the LoRA update is zero, equal beta * (log pi_lora - log pi_base) once it is not, and only LoRA trains."""
    torch.manual_seed(0)
    palm = PaLM(num_tokens=32, dim=32, depth=1, heads=2, dim_head=16)
    prm = ImplicitPRM(palm, beta=0.5, finetune_scope="prm")
    assert prm.ref_model is None and "prm" in palm.finetune_modules
    seq = torch.randint(0, 32, (2, 6))
    assert torch.count_nonzero(prm(seq)) == 0  # LoRA B starts at zero
    with torch.no_grad():
        for p in palm.finetune_parameters("prm"):
            p.normal_(0, 0.5)
    lp = palm(seq[:, :-1], finetune_scope="prm").log_softmax(-1).gather(-1, seq[:, 1:, None])[..., 0]
    ref = palm(seq[:, :-1]).log_softmax(-1).gather(-1, seq[:, 1:, None])[..., 0]
    torch.testing.assert_close(prm(seq), 0.5 * (lp - ref), atol=1e-5, rtol=1e-5)
    lora_ids = {id(p) for p in palm.finetune_parameters("prm")}
    assert {id(p) for p in prm.parameters()} == lora_ids
    with pytest.raises(ConfigError, match="not both"):
        ImplicitPRM(palm, ref_model=palm, finetune_scope="prm")


def test_prm_mask_limits_rewards_to_the_response():
    prm = ImplicitPRM(FixedLogits([0.0, math.log(3)]), ref_model=FixedLogits([0.0, 0.0]), beta=0.1)
    seq = torch.tensor([[1, 1, 1, 0]])
    mask = torch.tensor([[True, True, False, False]])  # only target index 0 (seq position 1) is scored
    torch.testing.assert_close(prm(seq, mask=mask), torch.tensor([[0.0405465, 0.0, 0.0]]), atol=1e-6, rtol=0)
    with pytest.raises(InputError):
        prm(torch.tensor([[1]]))
