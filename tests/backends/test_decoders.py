"""Every decode engine computes the same function as the full (uncached) forward.

The uncached reference re-runs the whole sequence through `PaLM.logits` every
step (the seed's way); the cached path is prefill (`forward_cached`) + a decoder's
`step`: the plain engine (`PaLM.forward_cached`, the model's one block forward),
its static-shape form (`KVCache.at(slot)`, what `generate(compile=True)` compiles)
and the CPU backend's `Decoder` (weight layouts, oneDNN). Greedy tokens must agree
for 200 steps and the logits within 1e-4 at every step.
"""

from __future__ import annotations

import pytest
import torch

from palm_rlhf.backends import PlainDecoder, decoder_for
from palm_rlhf.backends.cpu import Decoder, FamilyDecoder, decode, onednn_packed
from palm_rlhf.generation import PackedPrompts
from tests.helpers.models import tiny_palm as tiny

STEPS = 200


def set_xpos(model, on: bool):
    for layer in model.layers:
        layer.fn.rotary_emb.use_xpos = on


def add_trained_lora(model, scope="sft"):
    model.add_finetune_params(scope)
    with torch.no_grad():
        for p in model.finetune_parameters(scope):
            p.normal_(std=0.05)  # B starts at zero; make the adapter actually change the outputs


def greedy_uncached(model, prompt, steps, **scope):
    seq, all_logits = prompt, []
    for _ in range(steps):
        logits = model.logits(seq, **scope)[:, -1]
        all_logits.append(logits)
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=-1)
    return seq[:, prompt.shape[1]:], torch.stack(all_logits, 1)


class StaticEager(PlainDecoder):
    """The compiled engine's step, uncompiled: the slot as a tensor, attention over all slots."""

    def step(self, tokens):
        slot = torch.tensor(self.cache.length)
        logits = self.model.forward_cached(tokens[:, None], self.cache.at(slot), **self.scope)
        self.cache.advance(1)
        return logits


def cpu_engine(model, cache, **scope):
    """The CPU backend's decode step for the model's block kind."""
    return (FamilyDecoder if model.block == "sequential" else Decoder)(model, cache, **scope)


ENGINES = {"plain": PlainDecoder, "static": StaticEager, "cpu": cpu_engine}


def greedy_cached(model, prompt, steps, engine="cpu", **scope):
    b, n = prompt.shape
    cache = model.new_kv_cache(b, n + steps)
    logits = model.forward_cached(prompt, cache, **scope)
    decoder = ENGINES[engine](model, cache, **scope)
    tokens, all_logits = [], []
    for _ in range(steps):
        all_logits.append(logits)
        tok = logits.argmax(-1)
        tokens.append(tok)
        logits = decoder.step(tok)
    return torch.stack(tokens, 1), torch.stack(all_logits, 1)


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("xpos", [True, False])
@pytest.mark.parametrize("lora", [False, True])
@torch.no_grad()
def test_cached_greedy_equals_uncached_over_200_tokens(xpos, lora, engine):
    model = tiny(seed=1)
    set_xpos(model, xpos)
    scope = {}
    if lora:
        add_trained_lora(model)
        scope = dict(finetune_scope="sft")
    prompt = torch.randint(1, 64, (2, 5))
    ref_tokens, ref_logits = greedy_uncached(model, prompt, STEPS, **scope)
    tokens, logits = greedy_cached(model, prompt, STEPS, engine, **scope)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("rows", [1, 4])
@torch.no_grad()
def test_cached_greedy_equals_uncached_for_other_batch_sizes(rows, model_factory):
    """The decode step's weight layouts depend on the batch size (`Decoder._layout`); every family."""
    model = model_factory(seed=2, randomized=False)
    add_trained_lora(model)
    prompt = torch.randint(1, 64, (rows, 5))
    ref_tokens, ref_logits = greedy_uncached(model, prompt, STEPS, finetune_scope="sft")
    tokens, logits = greedy_cached(model, prompt, STEPS, finetune_scope="sft")
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(384, 3584), (384, 384), (1536, 384), (96, 10), (30, 7)])
@pytest.mark.parametrize("rows", [1, 2, 8])
def test_every_decode_weight_layout_computes_the_same_product(shape, rows):
    torch.manual_seed(0)
    w_t, x, residual = torch.randn(shape), torch.randn(rows, shape[0]), torch.randn(rows, shape[1])
    weight = Decoder._layout(w_t, rows)
    expected = x @ w_t
    torch.testing.assert_close(Decoder._project(x, weight), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(Decoder._project(x, weight, residual.clone()), expected + residual,
                               atol=1e-4, rtol=1e-5)


def test_decode_weight_layouts_follow_the_shape_rules():
    kinds = {(shape, rows): Decoder._layout(torch.zeros(shape), rows)[0]
             for shape in [(384, 3584), (1536, 384), (30, 7)] for rows in (1, 2, 8)}
    assert kinds[((384, 3584), 1)] == "rows" and kinds[((384, 3584), 2)] == "rows"
    assert kinds[((1536, 384), 1)] == "cols_t" and kinds[((1536, 384), 2)] == "cols_t"
    many = "onednn" if torch.backends.mkldnn.is_available() else "cols"
    assert kinds[((384, 3584), 8)] == many and kinds[((1536, 384), 8)] == many
    assert kinds[((30, 7), 1)] == "mm"  # odd sizes: one product
    single = {Decoder._layout(torch.zeros(384, 3584), rows, sliced=False)[0] for rows in (1, 2)}
    assert single == {"onednn" if torch.backends.mkldnn.is_available() else "mm"}  # one thread: no slices
    assert Decoder._layout(torch.zeros(384, 3584), 1)[1].shape == (4, 96, 3584)


@torch.no_grad()
def test_lora_scope_changes_cached_logits_and_disable_lora_restores_base():
    model = tiny(seed=2)
    prompt = torch.randint(1, 64, (1, 6))
    _, base = greedy_cached(model, prompt, 8)
    add_trained_lora(model)
    _, tuned = greedy_cached(model, prompt, 8, finetune_scope="sft")
    _, disabled = greedy_cached(model, prompt, 8, finetune_scope="sft", disable_lora=True)
    assert (tuned - base).abs().max() > 1e-3  # the adapter is really applied in the fast step
    torch.testing.assert_close(disabled, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["auto", "plain", "cpu"])
@torch.no_grad()
def test_backend_setting_picks_the_engine_and_engines_agree(backend):
    """`model.backend` is the one setting; on a CPU "auto" means the CPU backend."""
    model = tiny(seed=3)
    model.backend = backend
    cache = model.new_kv_cache(2, 34)
    expected = PlainDecoder if backend == "plain" else Decoder
    assert type(decoder_for(model, cache)) is expected
    prompt = torch.randint(1, 64, (2, 4))
    t_plain, l_plain = greedy_cached(model, prompt, 30, "plain")
    t_cpu, l_cpu = greedy_cached(model, prompt, 30, "cpu")
    assert torch.equal(t_plain, t_cpu)
    torch.testing.assert_close(l_cpu, l_plain, atol=1e-5, rtol=0)


def test_unknown_backend_is_a_config_error():
    from palm_rlhf.errors import ConfigError

    model = tiny()
    model.backend = "gpu"
    with pytest.raises(ConfigError, match="auto, plain, cpu"):
        decoder_for(model, model.new_kv_cache(1, 4))


@torch.no_grad()
def test_qk_rmsnorm_cached_matches_uncached():
    model = tiny(seed=4, qk_rmsnorm=True)
    prompt = torch.randint(1, 64, (1, 3))
    ref_tokens, ref_logits = greedy_uncached(model, prompt, 20)
    tokens, logits = greedy_cached(model, prompt, 20)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("engine", list(ENGINES))
@torch.no_grad()
def test_left_padded_rows_decode_like_unpadded_rows(engine):
    """Row 0 is left-padded by 3 slots; its logits equal running it alone.

    Left padding keeps every row writing to the same slot; `pad` hides the pad
    slots and shifts positions so row 0's first real token is position 0.
    """
    model = tiny(seed=5)
    short, long = torch.randint(1, 64, (4,)), torch.randint(1, 64, (7,))
    batch = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), short]), long])  # (2, 7)
    cache = model.new_kv_cache(2, 7 + 10, pad=torch.tensor([3, 0]))
    logits = model.forward_cached(batch, cache)
    decoder = ENGINES[engine](model, cache)
    alone = {0: short[None], 1: long[None]}
    for _ in range(10):
        for row in (0, 1):
            ref = model.logits(alone[row])[:, -1]
            torch.testing.assert_close(logits[row: row + 1], ref, atol=1e-4, rtol=0)
        tok = logits.argmax(-1)
        alone = {r: torch.cat([alone[r], tok[r].view(1, 1)], dim=1) for r in (0, 1)}
        logits = decoder.step(tok)


@torch.no_grad()
def test_full_cache_raises_a_clear_error():
    model = tiny()
    cache = model.new_kv_cache(1, 3)
    logits = model.forward_cached(torch.tensor([[1, 2]]), cache)
    decoder = Decoder(model, cache)
    decoder.step(logits.argmax(-1))
    with pytest.raises(Exception, match="KV cache is full"):
        decoder.step(logits.argmax(-1))


def test_xpos_tables_stay_finite_in_bf16_for_long_caches():
    """xpos factors are s**(+-(t - c) / 512) with s in [0.4/1.4, 1] = [0.286, 1];
    centring on the cache (c = max_len // 2) keeps |t - c| <= 4096 for 8192 slots,
    so every factor lies in [0.286**8, 0.286**-8] = [4.5e-5, 2.2e4], far inside
    bf16's range (no inf, no flush to 0). Centring on 0 instead would need
    0.286**-16 ~ 5e8 for the keys."""
    model = tiny(dim_head=64).to(torch.bfloat16)
    cache = model.new_kv_cache(1, 8192)
    decoder = Decoder(model, cache)
    assert torch.isfinite(decoder.cos).all() and torch.isfinite(decoder.sin).all()
    assert (decoder.cos.abs().amax(-1) > 0).all()


def test_bf16_decode_uses_onednn_packed_weights_and_matches_the_uncached_forward():
    """On a CPU, bf16 decode weights are prepacked for oneDNN (`onednn_packed`); the step's
    logits stay within bf16 rounding of the uncached forward's."""
    model = tiny(seed=4).to(torch.bfloat16)
    torch.manual_seed(0)
    w_t, x, r = torch.randn(32, 48).bfloat16(), torch.randn(3, 32).bfloat16(), torch.randn(3, 48).bfloat16()
    packed = onednn_packed(w_t, 3)
    if packed is None:
        pytest.skip("this torch build has no oneDNN linear")
    torch.testing.assert_close(Decoder._project(x, ("onednn", packed), r.clone()).float(),
                               (x.float() @ w_t.float() + r.float()), atol=0.1, rtol=0.02)
    prompt = torch.randint(1, 64, (1, 6))
    with torch.no_grad():
        cache = model.new_kv_cache(1, 6 + 8)
        logits = model.forward_cached(prompt, cache)
        decoder = Decoder(model, cache)
        assert decoder.weights[0][2][0] == "onednn"
        seq = prompt
        for _ in range(8):
            ref = model.logits(seq)[:, -1]
            assert (logits.float() - ref.float()).abs().max() < 0.1  # two bf16 roundings of the same function
            tok = ref.argmax(-1)
            seq = torch.cat([seq, tok[:, None]], dim=1)
            logits = decoder.step(tok)


def test_column_slices_where_onednn_is_missing(monkeypatch):
    monkeypatch.setattr(decode, "onednn_packed", lambda w_t, rows: None)
    torch.manual_seed(0)
    w_t, x = torch.randn(384, 3584), torch.randn(8, 384)
    weight = Decoder._layout(w_t, 8)
    assert weight[0] == "cols"
    torch.testing.assert_close(Decoder._project(x, weight), x @ w_t, atol=1e-4, rtol=1e-5)
    assert Decoder._layout(torch.zeros(30, 7), 8)[0] == "mm"


@pytest.mark.parametrize("engine", ["plain", "cpu"])
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("variant", ["plain", "lora", "qk_rmsnorm"])
@torch.no_grad()
def test_packed_prefill_equals_each_prompt_prefilled_alone(engine, rows, variant):
    """`decoder.prefill` of prompts of 1, 9, 4 and 17 tokens packed into one row gives each
    prompt's last-token logits and keys/values as `forward_cached` of that prompt alone; the
    CPU decoder's weight layouts depend on its cache's rows (1: slices, 4: oneDNN)."""
    model = tiny(seed=4, qk_rmsnorm=variant == "qk_rmsnorm")
    scope = {}
    if variant == "lora":
        add_trained_lora(model)
        scope = dict(finetune_scope="sft")
    prompts = [torch.randint(1, 64, (n,)) for n in (1, 9, 4, 17)]
    cache = model.new_kv_cache(rows, 40)
    decoder = ENGINES[engine](model, cache, **scope)
    packed = PackedPrompts.like(cache, [len(p) for p in prompts])
    logits = decoder.prefill(torch.cat(prompts), packed)
    assert logits.shape == (4, 64)
    alone = model.new_kv_cache(1, 40)
    for i, prompt in enumerate(prompts):
        alone.reset()
        expected = model.forward_cached(prompt[None], alone, **scope)[0]
        torch.testing.assert_close(logits[i], expected, atol=1e-4, rtol=0)
        k, v = packed.prompt(i)
        torch.testing.assert_close(k, alone.k[:, 0, :len(prompt)], atol=1e-4, rtol=0)
        torch.testing.assert_close(v, alone.v[:, 0, :len(prompt)], atol=1e-4, rtol=0)
