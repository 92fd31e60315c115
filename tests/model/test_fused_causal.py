"""The blocks' fused causal path (`ParallelTransformerBlock._forward_causal`, taken by
every causal forward without a cache) computes the same function as the general path:
logits and gradients agree in fp32, with LoRA scopes, with qk_rmsnorm and under bf16
autocast; models with padding masks, caches or SDPA never take it."""

import pytest
import torch

from palm_rlhf.model import PaLM
from palm_rlhf.model import layers
from palm_rlhf.model.layers import FoldedRotary, ParallelTransformerBlock, attention_blocks, causal_attention, merge_lora


def assert_same_grads(grads: dict, ref_grads: dict) -> None:
    """Same parameters, same gradients up to fp32 rounding, which scales with the gradient (the
    token embedding's entries reach ~200 here; in fp64 the paths agree to 1e-13)."""
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        atol = 1e-6 * max(1.0, float(ref_grads[name].abs().max()))
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


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
    assert_same_grads(grads, ref_grads)


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("frozen_base", [True, False])
def test_lora_scope_merged_into_the_weights_or_applied_thin_gives_the_same_grads(merge, frozen_base, monkeypatch):
    """The fused path either adds A @ B to the weights or applies x @ A @ B (`merge_lora`);
    both give the general path's logits and LoRA (and, when trained, base) gradients."""
    monkeypatch.setattr(layers, "merge_lora", lambda modules: merge)
    torch.manual_seed(1)
    model = PaLM(num_tokens=64, dim=32, depth=2, heads=4, dim_head=8, finetune_scopes=("actor",))
    for p in model.finetune_parameters("actor"):
        torch.nn.init.normal_(p, std=0.1)
    if frozen_base:
        model.requires_grad_(False)
        for p in model.finetune_parameters("actor"):
            p.requires_grad_(True)
    x = torch.randint(0, 64, (2, 13))
    ref_logits, ref_grads = _logits_and_grads(model, x, False, finetune_scope="actor")
    logits, grads = _logits_and_grads(model, x, True, finetune_scope="actor")
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert any(".A" in n for n in grads)
    assert_same_grads(grads, ref_grads)


def test_merge_lora_rule():
    small = PaLM(num_tokens=64, dim=128, depth=1, heads=4, dim_head=32, finetune_scopes=("a",))
    large = PaLM(num_tokens=64, dim=384, depth=1, heads=6, dim_head=64, finetune_scopes=("a",))
    modules = lambda m: m.finetune_modules["a"][0]  # noqa: E731  (layer 0's q, k, v, o LoRAs)
    assert merge_lora(modules(small)) and not merge_lora(modules(large))  # flop ratio 4 vs 12
    with torch.no_grad():
        assert merge_lora(modules(large))  # no backward: merging always wins
    large.finetune_modules["a"].requires_grad_(False)
    assert merge_lora(modules(large))  # a frozen scope (e.g. a reference) has no backward either


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


@pytest.mark.parametrize("n", [5, 81, 170, 333])
def test_block_causal_attention_equals_full_masked_attention(n):
    """Scoring query blocks only against the keys up to their end (1, 2, 4 and 8 blocks here)
    gives full masked attention's outputs and gradients."""
    torch.manual_seed(n)
    b, h, d = 2, 3, 8
    q = torch.randn(b, n * h, d, requires_grad=True)
    k, v = torch.randn(b, n, d, requires_grad=True), torch.randn(b, n, d, requires_grad=True)
    out = causal_attention(q, k, v, h)
    qh = q.view(b, n, h, d).transpose(1, 2)  # (b, h, n, d)
    sim = qh @ k[:, None].transpose(-1, -2)  # (b, h, n, n)
    sim = sim.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    ref = (sim.softmax(-1) @ v[:, None]).transpose(1, 2).reshape(b, n * h, d)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    assert attention_blocks(n) == {5: 1, 81: 2, 170: 4, 333: 8}[n]


def test_fused_path_with_several_attention_blocks_equals_general_path():
    torch.manual_seed(0)
    model = PaLM(num_tokens=64, dim=32, depth=2, heads=4, dim_head=8, finetune_scopes=("actor",))
    for p in model.finetune_parameters("actor"):
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randint(0, 64, (2, 130))  # 3 blocks
    ref_logits, ref_grads = _logits_and_grads(model, x, False, finetune_scope="actor")
    logits, grads = _logits_and_grads(model, x, True, finetune_scope="actor")
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert_same_grads(grads, ref_grads)


@pytest.mark.parametrize("options", [{}, {"qk_rmsnorm": True}, {"flash_attn": True}])
@pytest.mark.parametrize("merge", [True, False])
def test_hidden_at_positions_equals_full_hidden_gathered(options, merge, monkeypatch):
    """`_hidden(x, positions=...)` (the last block computes only those positions on the fused
    path) equals the full forward gathered there, with a LoRA scope applied either way, and
    so do the gradients (positions repeat, and the last one is the clamped RL padding index)."""
    monkeypatch.setattr(layers, "merge_lora", lambda modules: merge)
    torch.manual_seed(2)
    model = PaLM(num_tokens=64, dim=32, depth=3, heads=4, dim_head=8, finetune_scopes=("actor",), **options)
    for p in model.finetune_parameters("actor"):
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randint(0, 64, (2, 90))
    positions = torch.tensor([[3, 4, 5, 88, 88], [0, 40, 41, 87, 88]])
    g = torch.randn(2, 5, 32)

    def run(**kw):
        model.zero_grad(set_to_none=True)
        out = model._hidden(x, "actor", False, **kw)
        if "positions" not in kw:
            out = out.gather(1, positions[..., None].expand(-1, -1, 32))
        (out * g).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, ref_grads = run()
    out, grads = run(positions=positions)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert_same_grads(grads, ref_grads)
