"""Properties of the forward pass: causality, the non-causal padding mask,
flash (SDPA) == explicit math, dropout control, and the seed's forward flags."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from palm_rlhf.model import PaLM
from tests.helpers.models import TINY, make_palm

GEN = torch.Generator().manual_seed(0)
X = torch.randint(1, 64, (2, 24), generator=GEN)


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("qk_rmsnorm", [False, True])
def test_causality_is_exact(flash_attn, qk_rmsnorm):
    model = make_palm(flash_attn=flash_attn, qk_rmsnorm=qk_rmsnorm)
    base = model(X)
    for t in (0, 7, 23):
        changed = X.clone()
        changed[:, t] = (changed[:, t] + 17) % 64
        out = model(changed)
        assert torch.equal(out[:, :t], base[:, :t])  # bit-for-bit, not just close
        assert not torch.allclose(out[:, t], base[:, t])  # and position t itself does see it


@pytest.mark.parametrize("flash_attn", [False, True])
def test_non_causal_padding_is_invisible(flash_attn):
    """Right-padded rows (-1) give the same outputs at real positions as the unpadded rows."""
    model = make_palm(causal=False, flash_attn=flash_attn)
    real = X[:, :15]
    padded = torch.cat([real, torch.full((2, 9), -1)], dim=1)
    out = model(padded)
    assert (out[:, :15] - model(real)).abs().max() <= 1e-5
    # the mask is what does it: the same slots filled with token 0 change every position
    unmasked = model(torch.cat([real, torch.zeros(2, 9, dtype=torch.long)], dim=1))
    assert (unmasked[:, :15] - out[:, :15]).abs().max() > 1e-2
    # a padded slot's own id never leaks into other positions either
    other_pad = padded.clone()
    other_pad[:, 20] = -7
    assert torch.equal(model(other_pad)[:, :15], out[:, :15])


def test_non_causal_all_padding_row_is_finite():
    model = make_palm(causal=False)
    x = X.clone()
    x[1] = -1
    out = model(x)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0], model(x[:1])[0], atol=1e-5)  # other rows unaffected


@pytest.mark.parametrize("causal", [True, False])
def test_flash_matches_math(causal):
    math_model = make_palm(causal=causal, qk_rmsnorm=True)
    math_model.add_finetune_params("sft")
    flash_model = PaLM(**{**TINY, "causal": causal, "qk_rmsnorm": True, "flash_attn": True}).eval()
    flash_model.add_finetune_params("sft")
    with torch.no_grad():
        for p in math_model.finetune_parameters("sft"):
            p.normal_(std=0.05)
    flash_model.load_state_dict(math_model.state_dict())
    x = X.clone()
    if not causal:
        x[0, -5:] = -1
    keep = x >= 0
    for scope in (None, "sft"):
        diff = flash_model(x, finetune_scope=scope) - math_model(x, finetune_scope=scope)
        assert diff[keep].abs().max() <= 1e-5


@pytest.mark.parametrize("flash_attn", [False, True])
def test_set_dropout(flash_attn):
    model = make_palm(flash_attn=flash_attn)
    assert model.set_dropout(0.5) is model
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.5 for m in dropouts)
    model.train()
    torch.manual_seed(0)
    first = model(X)
    assert not torch.equal(first, model(X))  # dropout is active in training
    model.eval()
    assert torch.equal(model(X), model(X))  # and off in eval
    model.set_dropout(0.0).train()
    assert torch.equal(model(X), model(X))


def test_device_property():
    assert make_palm().device == torch.device("cpu")
    with torch.device("meta"):
        assert PaLM(**TINY).device.type == "meta"


def test_extra_embed_adds_to_token_embeddings():
    """Adding E[y] - E[x] to the embeddings of x must give the logits of y."""
    model = make_palm()
    y = torch.randint(1, 64, X.shape, generator=GEN)
    with torch.no_grad():
        shift = model.token_emb(y) - model.token_emb(X)
    assert (model(X, extra_embed=shift) - model(y)).abs().max() <= 1e-5


def test_flags_route_to_consistent_outputs():
    model = make_palm()
    logits, embeds = model(X, return_logits_with_embedding=True)
    assert embeds.shape == (2, 24, 32) and logits.shape == (2, 24, 64)
    assert torch.equal(logits, model(X))
    assert torch.equal(embeds, model(X, return_only_embedding=True))
    assert torch.equal(logits, model.to_logits(embeds))


def test_return_loss_ignores_index_zero():
    """loss = mean CE over next tokens whose label != cross_entropy_ignore_index (0 by default)."""
    model = make_palm()
    x = X.clone()
    x[:, 10:14] = 0
    logits = model(x[:, :-1])
    labels = x[:, 1:]
    keep = labels != 0
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    expected = per_token[keep].mean()
    assert torch.allclose(model(x, return_loss=True), expected, atol=1e-6)
    other = make_palm(cross_entropy_ignore_index=-100)
    assert torch.allclose(other(x, return_loss=True), per_token.mean(), atol=1e-6)
