"""Prompts packed into one forward (`PackedPrompts`) give what each prompt gives prefilled alone."""

from __future__ import annotations

import pytest
import torch

from palm_rlhf.errors import InputError
from palm_rlhf.generation import PackedPrompts
from tests.helpers.models import tiny_palm


@pytest.mark.parametrize("scope", [None, "actor"])
def test_packed_prefill_equals_one_prompt_at_a_time(scope):
    """Prompts of 1, 7, 3 and 12 tokens in one packed forward: each prompt's last-token logits
    (`at=`: projected at those positions only, the same as every position's logits indexed there)
    and its keys/values equal a prefill of that prompt alone in a KV cache of the same length
    (same xpos centre), with and without a LoRA scope."""
    model = tiny_palm(seed=0)
    if scope:
        model.add_finetune_params(scope, lora_r=2)
        with torch.no_grad():
            for p in model.finetune_parameters(scope):
                p.normal_(0, 0.3)
    prompts = [torch.randint(0, 64, (n,)) for n in (1, 7, 3, 12)]
    alone = model.new_kv_cache(1, 48)
    packed = PackedPrompts.like(alone, [len(p) for p in prompts])
    assert packed.center == alone.center == 24
    with torch.inference_mode():
        logits = model.forward_cached(torch.cat(prompts)[None], packed, finetune_scope=scope,
                                      at=packed.last_index())[0]  # (4, V): the vocabulary projection at 4 tokens only
        again = PackedPrompts.like(alone, [len(p) for p in prompts])
        every = model.forward_cached(torch.cat(prompts)[None], again, finetune_scope=scope, last_only=False)
        torch.testing.assert_close(logits, every[0, packed.last_index()], rtol=1e-6, atol=1e-6)
        for i, prompt in enumerate(prompts):
            alone.reset()
            expected = model.forward_cached(prompt[None], alone, finetune_scope=scope)[0]
            torch.testing.assert_close(logits[i], expected, rtol=1e-5, atol=1e-5)
            k, v = packed.prompt(i)
            assert k.shape == (2, len(prompt), 16)
            torch.testing.assert_close(k, alone.k[:, 0, :len(prompt)], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, alone.v[:, 0, :len(prompt)], rtol=1e-5, atol=1e-5)
        assert not torch.equal(logits[0], logits[1])


def test_packed_prompts_mask_and_positions():
    packed = PackedPrompts([2, 3], depth=1, dim_head=4, center=8)
    assert packed.positions(5).tolist() == [[0, 1, 0, 1, 2]]
    assert packed.attention_mask(5)[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1]]
    assert packed.last_index().tolist() == [1, 4]
    with pytest.raises(InputError, match="one call of all 5 tokens"):
        packed.positions(4)
    with pytest.raises(InputError, match="at least one token"):
        PackedPrompts([2, 0], depth=1, dim_head=4, center=8)
