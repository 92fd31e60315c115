"""The blocks' fused causal path (`ParallelTransformerBlock._forward_causal`, taken by
every causal forward without a cache) computes the same function as the general path:
logits and gradients agree in fp32, with LoRA scopes, with qk_rmsnorm and under bf16
autocast; models with padding masks, caches or SDPA never take it."""

import pytest
import torch

from palm_rlhf.model import PaLM
from palm_rlhf.model.layers import FoldedRotary, ParallelTransformerBlock


def _logits_and_grads(model, x, fused, **kwargs):
    model.fused_causal = fused
    model.zero_grad(set_to_none=True)
    logits = model(x, **kwargs)
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("options", [{}, {"qk_rmsnorm": True}, {"finetune_scopes": ("actor",)}])
def test_fused_path_equals_general_path_fp32(options):
    torch.manual_seed(0)
    model = PaLM(num_tokens=64, dim=32, depth=2, heads=4, dim_head=8, **options)
    kwargs = {}
    if "finetune_scopes" in options:
        for p in model.finetune_parameters("actor"):
            torch.nn.init.normal_(p, std=0.1)  # B starts at zero: make the scope matter
        kwargs = {"finetune_scope": "actor"}
    x = torch.randint(0, 64, (3, 17))
    ref_logits, ref_grads = _logits_and_grads(model, x, False, **kwargs)
    logits, grads = _logits_and_grads(model, x, True, **kwargs)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_path_under_bf16_autocast_stays_close():
    torch.manual_seed(0)
    model = PaLM(num_tokens=64, dim=32, depth=2, heads=4, dim_head=8)
    x = torch.randint(0, 64, (2, 33))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.fused_causal = False
        ref = model(x).float()
        model.fused_causal = True
        out = model(x).float()
    assert (out - ref).abs().max() < 0.05  # two bf16 roundings of the same function


def test_fused_path_is_taken_only_where_it_applies(monkeypatch):
    calls = []
    original = ParallelTransformerBlock._forward_causal

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ParallelTransformerBlock, "_forward_causal", spy)
    x = torch.randint(0, 64, (2, 9))
    PaLM(num_tokens=64, dim=32, depth=2, heads=4, dim_head=8)(x)
    assert len(calls) == 2  # one per layer
    calls.clear()
    PaLM(num_tokens=64, dim=32, depth=2, heads=4, dim_head=8, flash_attn=True)(x)
    PaLM(num_tokens=64, dim=32, depth=2, heads=4, dim_head=8, causal=False)(x)
    assert calls == []


def test_folded_tables_fold_scale_and_sign():
    model = PaLM(num_tokens=64, dim=32, depth=1, heads=4, dim_head=8)
    rotary = model.layers[0].fn.rotary_emb
    folded = rotary.folded_tables(5, "cpu", torch.float32)
    assert isinstance(folded, FoldedRotary)
    q_cos, q_sin, k_cos, k_sin = rotary.tables(torch.arange(5), 2, torch.float32)
    torch.testing.assert_close(folded[0][:, 0], q_cos * 8 ** -0.5)
    sign = torch.tensor([-1.0] * 4 + [1.0] * 4)
    torch.testing.assert_close(folded[1][:, 0], q_sin * 8 ** -0.5 * sign)
    torch.testing.assert_close(folded[2], k_cos)
    torch.testing.assert_close(folded[3], k_sin * sign)
