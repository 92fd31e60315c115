"""`ops.linear` (fp32 CPU projections through oneDNN) and `causal_attention`'s hand-written
backward: the same functions, values and gradients, as the plain PyTorch ops."""

import pytest
import torch
import torch.nn.functional as F

from palm_rlhf import ops
from palm_rlhf.model import layers
from palm_rlhf.model.layers import causal_attention

needs_onednn = pytest.mark.skipif(not ops.onednn_works(torch.float32), reason="torch built without oneDNN")


def _count_onednn_calls(monkeypatch) -> list:
    calls = []
    real = ops.onednn_linear

    def counted(x, w):
        calls.append(tuple(x.shape))
        return real(x, w)
    monkeypatch.setattr(ops, "onednn_linear", counted)
    return calls


@needs_onednn
@pytest.mark.parametrize("transposed_weight", [False, True])
def test_linear_matches_f_linear_with_gradients(monkeypatch, transposed_weight):
    calls = _count_onednn_calls(monkeypatch)
    torch.manual_seed(0)
    x = torch.randn(4, 70, 12, requires_grad=True)  # 280 rows >= ops.ONEDNN_MIN_ROWS
    w = (torch.randn(12, 5).t() if transposed_weight else torch.randn(5, 12)).requires_grad_()
    y = ops.linear(x, w)
    ref = F.linear(x, w)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w), g)
    ref_grads = torch.autograd.grad(ref, (x, w), g)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    assert calls == [(4, 70, 12), (4, 70, 5)]  # forward, input gradient (the weight gradient is torch.mm)


@needs_onednn
def test_linear_weight_gradient_only(monkeypatch):
    calls = _count_onednn_calls(monkeypatch)
    x, w = torch.randn(300, 4), torch.randn(3, 4, requires_grad=True)
    (gw,) = torch.autograd.grad(ops.linear(x, w).sum(), w)
    torch.testing.assert_close(gw, torch.ones(300, 3).t() @ x)
    assert calls == [(300, 4)]  # no input gradient asked for, none computed


@needs_onednn
def test_linear_without_grad_is_one_onednn_product(monkeypatch):
    calls = _count_onednn_calls(monkeypatch)
    x, w = torch.randn(256, 8), torch.randn(2, 8, requires_grad=True)
    with torch.no_grad():
        y = ops.linear(x, w)
    assert not y.requires_grad and calls == [(256, 8)]
    torch.testing.assert_close(y, x @ w.detach().t())


def test_linear_falls_back_to_f_linear(monkeypatch):
    """bf16 autocast, fp64, fewer than ONEDNN_MIN_ROWS rows, and PALM_RLHF_ONEDNN=0 take
    F.linear, bit for bit."""
    calls = _count_onednn_calls(monkeypatch)
    torch.manual_seed(1)
    x, w = torch.randn(2, 200, 8), torch.randn(3, 8)
    small = x[:, :ops.ONEDNN_MIN_ROWS // 2 - 1]  # one row short
    assert torch.equal(ops.linear(small, w), F.linear(small, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.linear(x, w)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, F.linear(x, w))
    assert torch.equal(ops.linear(x.double(), w.double()), F.linear(x.double(), w.double()))
    monkeypatch.setenv("PALM_RLHF_ONEDNN", "0")
    assert torch.equal(ops.linear(x, w), F.linear(x, w))
    assert calls == []


def _autograd_blocks(q, k, v, heads):
    """The blocks of `causal_attention` differentiated by autograd (no hand-written backward)."""
    return torch.cat(layers._attention_blocks_forward(q, k, v, heads)[0], dim=1)


@pytest.mark.parametrize("autocast", [False, True])
def test_hand_written_attention_backward_equals_autograd(autocast):
    torch.manual_seed(3)
    b, n, h, d = 2, 130, 3, 8  # 3 blocks
    q = (0.3 * torch.randn(b, n * h, d)).requires_grad_()
    k, v = torch.randn(b, n, d, requires_grad=True), torch.randn(b, n, d, requires_grad=True)
    g = torch.randn(b, n * h, d)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = causal_attention(q, k, v, h)
        ref = _autograd_blocks(q, k, v, h)
    assert out.grad_fn.name().startswith("_BlockCausalAttention")
    assert out.dtype == ref.dtype == (torch.bfloat16 if autocast else torch.float32)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # the same forward ops
    grads = torch.autograd.grad(out, (q, k, v), g.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.to(out.dtype))
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    for a, r in zip(grads, ref_grads):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a, r, **tol)


@pytest.mark.parametrize("where", ["attn_dropout", "ff_dropout"])
def test_fused_path_applies_dropout_in_training_only(where):
    from palm_rlhf.model import PaLM

    torch.manual_seed(0)
    model = PaLM(num_tokens=64, dim=32, depth=2, heads=4, dim_head=8, **{where: 0.3})
    x = torch.randint(0, 64, (2, 50))
    model.eval()
    clean = model.logits(x)
    torch.testing.assert_close(model.logits(x), clean, rtol=0, atol=0)
    model.train()
    torch.manual_seed(1)
    dropped = model.logits(x)
    torch.manual_seed(1)
    torch.testing.assert_close(model.logits(x), dropped, rtol=0, atol=0)  # same RNG, same masks
    assert not torch.allclose(dropped, clean, atol=1e-3)
    dropped.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
