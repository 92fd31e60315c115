"""The CPU backend's decode step for the Llama family (`FamilyDecoder`) against the plain engine
(the model's own block forward): same logits at every step, left-padded rows, a LoRA scope on
every projection folded into the bound weights, grouped-query attention, biases, q/k norm."""

from __future__ import annotations

import pytest
import torch

from palm_rlhf import PaLM
from palm_rlhf.backends import PlainDecoder, decoder_for
from palm_rlhf.backends.cpu import FamilyDecoder

from tests.helpers.families import make_hf_checkpoint

pytest.importorskip("transformers")


@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("case", ["llama-linear-bias", "qwen3"])
def test_family_decoder_equals_the_plain_engine(tmp_path, case, rows):
    make_hf_checkpoint(case, tmp_path)
    model = PaLM.from_pretrained(tmp_path).eval()
    model.add_finetune_params("actor", lora_r=4, lora_alpha=8.0, targets=["q", "k", "v", "o", "gate", "up", "down"])
    with torch.no_grad():
        for p in model.finetune_parameters("actor"):
            p.normal_(0, 0.05)
    gen = torch.Generator().manual_seed(rows)
    pad = torch.tensor([0, 3, 1, 0, 2][:rows])
    prompt = torch.randint(3, model.num_tokens, (rows, 8), generator=gen)
    steps = torch.randint(3, model.num_tokens, (12, rows), generator=gen)
    outs = {}
    for engine in ("plain", "cpu"):
        model.backend = engine
        cache = model.new_kv_cache(rows, 32, pad=pad)
        decoder = decoder_for(model, cache, finetune_scope="actor")
        assert isinstance(decoder, FamilyDecoder if engine == "cpu" else PlainDecoder)
        with torch.no_grad():
            logits = [model.forward_cached(prompt, cache, finetune_scope="actor")]
            logits += [decoder.step(tokens) for tokens in steps]
        outs[engine] = torch.stack(logits)
    for r in range(rows):  # a padded row's logits before its first token are never read
        torch.testing.assert_close(outs["cpu"][1:, r], outs["plain"][1:, r], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 4])
def test_frozen_weight_layouts_are_reused_across_decoders_until_a_weight_changes(tmp_path, rows):
    """RL builds a decoder per rollout: the frozen base weights a LoRA scope leaves alone keep their
    bound layout (the same tensor), the folded LoRA projections are rebuilt, and a base weight changed in
    place (an optimizer step, load_state_dict) or replaced gets a new layout: every decoder equals
    the plain engine after each change."""
    make_hf_checkpoint("llama-linear-bias", tmp_path)
    model = PaLM.from_pretrained(tmp_path).eval()
    model.add_finetune_params("actor", lora_r=4, lora_alpha=8.0, targets=["q", "v"])
    model.requires_grad_(False)  # a frozen base, as LoRA training leaves it
    gen = torch.Generator().manual_seed(rows)
    prompt = torch.randint(3, model.num_tokens, (rows, 6), generator=gen)
    tokens = torch.randint(3, model.num_tokens, (rows,), generator=gen)

    def logits(engine):
        model.backend = engine
        cache = model.new_kv_cache(rows, 16)
        decoder = decoder_for(model, cache, finetune_scope="actor")
        with torch.no_grad():
            model.forward_cached(prompt, cache, finetune_scope="actor")
            return decoder, decoder.step(tokens)

    first, _ = logits("cpu")
    with torch.no_grad():
        for p in model.finetune_parameters("actor"):
            p.normal_(0, 0.05)  # the scope trains: folded projections change
    second, out = logits("cpu")
    torch.testing.assert_close(out, logits("plain")[1], atol=1e-4, rtol=1e-4)
    assert second.weights[0][4][1] is first.weights[0][4][1]  # the feedforward's layout, kept
    assert second.logits_weight_t[1] is first.logits_weight_t[1]
    assert second.weights[0][0][1] is not first.weights[0][0][1]  # q/k/v: LoRA folded in anew
    with torch.no_grad():
        model.layers[0].ff_down.weight.mul_(1.5)  # in place: a new version
        model.to_logits.weight.data = model.to_logits.weight.data * 0.5  # a new tensor
    third, out = logits("cpu")
    assert third.weights[0][6][1] is not second.weights[0][6][1]
    assert third.logits_weight_t[1] is not second.logits_weight_t[1]
    torch.testing.assert_close(out, logits("plain")[1], atol=1e-4, rtol=1e-4)
    # a trained weight is never cached: fused AdamW changes it in place without a new version
    down = model.layers[0].ff_down.weight
    down.requires_grad_(True)
    down.grad = torch.randn_like(down)
    torch.optim.AdamW([down], lr=0.1, fused=True).step()
    fourth, out = logits("cpu")
    torch.testing.assert_close(out, logits("plain")[1], atol=1e-4, rtol=1e-4)
    assert fourth.weights[0][6][1] is not third.weights[0][6][1]


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("case", ["llama-linear-bias", "qwen3"])
@torch.no_grad()
def test_family_packed_prefill_equals_each_prompt_prefilled_alone(tmp_path, case, rows):
    """`FamilyDecoder.prefill` of prompts of 1, 9, 4 and 17 tokens packed into one row (the
    server's prefill: a block-diagonal causal mask, grouped-query keys) gives each prompt's
    last-token logits and keys/values as `forward_cached` of that prompt alone, with a LoRA scope
    on every projection."""
    from palm_rlhf.generation import PackedPrompts

    make_hf_checkpoint(case, tmp_path)
    model = PaLM.from_pretrained(tmp_path).eval()
    model.add_finetune_params("actor", lora_r=4, lora_alpha=8.0, targets=["q", "k", "v", "o", "gate", "up", "down"])
    for p in model.finetune_parameters("actor"):
        p.normal_(0, 0.05)
    gen = torch.Generator().manual_seed(rows)
    prompts = [torch.randint(3, model.num_tokens, (n,), generator=gen) for n in (1, 9, 4, 17)]
    cache = model.new_kv_cache(rows, 40)
    decoder = FamilyDecoder(model, cache, finetune_scope="actor")
    packed = PackedPrompts.like(cache, [len(p) for p in prompts])
    logits = decoder.prefill(torch.cat(prompts), packed)
    assert logits.shape == (4, model.num_tokens)
    alone = model.new_kv_cache(1, 40)
    for i, prompt in enumerate(prompts):
        alone.reset()
        expected = model.forward_cached(prompt[None], alone, finetune_scope="actor")[0]
        torch.testing.assert_close(logits[i], expected, atol=1e-4, rtol=0)
        k, v = packed.prompt(i)
        torch.testing.assert_close(k, alone.k[:, 0, :len(prompt)], atol=1e-4, rtol=0)
        torch.testing.assert_close(v, alone.v[:, 0, :len(prompt)], atol=1e-4, rtol=0)


def test_a_servers_buckets_share_one_layout_per_weight(tmp_path, monkeypatch):
    """The server's decoders (one per bucket of rows: 1, 2, 4, ... 64) of a frozen model share the
    one oneDNN-packed (or plain) copy of each weight from 3 rows on, and `load_for_inference`
    freezes the model so that they can; a model past `gemv_copy_limit` keeps no sliced copies for
    one or two rows either. Every bucket still equals the plain engine."""
    from palm_rlhf.serving.batch import DecodeBatch
    from palm_rlhf.serving.loading import load_for_inference

    make_hf_checkpoint("llama", tmp_path)
    model = load_for_inference(tmp_path).model
    assert not any(p.requires_grad for p in model.parameters())
    batch = DecodeBatch(model, 16, 64)
    decoders = {cap: batch._entry(cap)[1] for cap in (1, 2, 4, 16, 64)}
    many = [decoders[cap] for cap in (4, 16, 64)]
    assert all(d.logits_weight_t[1] is many[0].logits_weight_t[1] for d in many)
    assert all(d.weights[0][6][1] is many[0].weights[0][6][1] for d in many)  # the feedforward's output
    if torch.get_num_threads() >= 2:  # sliced copies for one and two rows, each its own
        assert decoders[1].logits_weight_t[1] is not many[0].logits_weight_t[1]
    monkeypatch.setattr(FamilyDecoder, "gemv_copy_limit", 0)  # as if the model were large
    big = DecodeBatch(model, 16, 64)
    one, four = big._entry(1)[1], big._entry(4)[1]
    assert one.logits_weight_t[1] is four.logits_weight_t[1]  # one copy for every bucket
    prompt = torch.randint(3, model.num_tokens, (1, 5))
    for decoder in (one, decoders[1], decoders[16]):
        rows = decoder.cache.batch
        tokens = torch.randint(3, model.num_tokens, (rows,))
        outs = []
        for engine in (decoder, None):
            cache = decoder.cache if engine is not None else model.new_kv_cache(rows, 16)
            cache.reset()
            with torch.no_grad():
                model.forward_cached(prompt.expand(rows, -1), cache)
                outs.append(engine.step(tokens) if engine is not None else model.forward_cached(tokens[:, None], cache))
        torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
