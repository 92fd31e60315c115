"""Bad input raises the right PalmRLHFError subclass with a message that says what to change."""

from __future__ import annotations

import pytest
import torch

from palm_rlhf.errors import ConfigError, InputError, PalmRLHFError
from palm_rlhf.model import PaLM
from tests.helpers.models import TINY, make_palm


@pytest.fixture(scope="module")
def model():
    return make_palm()


@pytest.mark.parametrize("bad_id, causal", [(64, True), (1000, True), (-1, True), (64, False)])
def test_ids_outside_vocab(bad_id, causal):
    model = make_palm(causal=causal)
    x = torch.randint(0, 64, (2, 8))
    x[1, 3] = bad_id
    with pytest.raises(InputError, match=rf"token id {bad_id} is outside \[0, 64\).*num_tokens=64"):
        model(x)


def test_negative_ids_are_padding_only_when_non_causal():
    model = make_palm(causal=False)
    x = torch.randint(0, 64, (2, 8))
    x[0, -2:] = -1
    assert model(x).shape == (2, 8, 64)


@pytest.mark.parametrize("x, pattern", [
    (torch.rand(2, 8), r"integer tensor, got dtype torch.float32; use x.long\(\)"),
    (torch.ones(2, 8, dtype=torch.bool), "integer tensor"),
    (torch.zeros(2, 0, dtype=torch.long), r"too short: need seq_len >= 1"),
    (torch.zeros(0, 8, dtype=torch.long), r"too short"),
    (torch.zeros(8, dtype=torch.long), r"shape \(batch, seq_len\).*unsqueeze\(0\)"),
    ([[1, 2, 3]], "must be a torch.Tensor, got list"),
])
def test_bad_token_tensors(model, x, pattern):
    for call in (model, model.logits, model.embed, lambda t: model(t, return_only_embedding=True)):
        with pytest.raises(InputError, match=pattern):
            call(x)


def test_return_loss_needs_two_tokens(model):
    with pytest.raises(InputError, match="seq_len >= 2 for return_loss"):
        model(torch.ones(3, 1, dtype=torch.long), return_loss=True)
    assert model(torch.ones(3, 2, dtype=torch.long), return_loss=True).ndim == 0


@pytest.mark.parametrize("shape", [(2, 8, 31), (3, 8, 32), (2, 5, 32), (2, 8, 32, 1)])
def test_wrong_extra_embed_shape(model, shape):
    with pytest.raises(InputError, match=r"extra_embed of shape .* \(batch, seq_len, dim=32\)"):
        model(torch.ones(2, 8, dtype=torch.long), extra_embed=torch.zeros(shape))


@pytest.mark.parametrize("shape", [(2, 8, 32), (1, 8, 32), (32,)])
def test_broadcastable_extra_embed_is_fine(model, shape):
    x = torch.ones(2, 8, dtype=torch.long)
    assert model(x, extra_embed=torch.zeros(shape)).shape == (2, 8, 64)


@pytest.mark.parametrize("field, value, pattern", [
    ("dim", 0, r"dim=0\): dim must be a positive integer"),
    ("dim", -8, "dim must be a positive integer"),
    ("dim", 32.0, "dim must be a positive integer"),
    ("dim_head", 0, "dim_head must be a positive integer"),
    ("dim_head", 15, r"even dim_head; use 16"),
    ("heads", 0, "heads must be a positive integer"),
    ("depth", True, "depth must be a positive integer"),
    ("num_tokens", -1, "num_tokens must be a positive integer"),
    ("lora_r", 0, "lora_r must be a positive integer"),
    ("attn_dropout", 1.0, r"dropout must be in \[0, 1\)"),
    ("ff_dropout", -0.1, r"dropout must be in \[0, 1\)"),
    ("rotary_xpos_scale_base", 0, "must be > 0"),
])
def test_invalid_config(field, value, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        PaLM(**{**TINY, field: value})
    assert field in str(info.value)


def test_all_errors_share_one_base():
    assert issubclass(InputError, PalmRLHFError) and issubclass(ConfigError, PalmRLHFError)
    assert issubclass(InputError, ValueError)  # code written against plain Python still catches them
