"""The seed's `ActorCritic.generate(state, max_seq_len, eos_token, return_values, **kwargs)`:
the same call and named tuple, sampled by our batched KV-cached engine.

Proven here: it returns exactly what `palm_rlhf.generation.generate` samples with the seed's
default filter turned into a count (top_k(thres=0.9) over a 97-token vocabulary keeps
ceil(0.1 * 97) = 10 tokens), with the masks and logits recomputed over the whole sequence;
a custom filter callable takes the `PaLM.generate` path; and on the same weights with greedy
decoding it matches palm-rlhf-pytorch 0.8.0's ActorCritic.generate (actions, masks, logits).
"""

from __future__ import annotations

import math
import warnings

import palm_rlhf_pytorch as ref_pkg
import pytest
import torch

from palm_rlhf.errors import InputError
from palm_rlhf.generation import SamplingConfig, generate
from palm_rlhf.model import PaLM
from palm_rlhf.model.convert import v08_to_ours
from palm_rlhf.ops import top_p
from palm_rlhf.rl.actor_critic import ActorCritic

CFG = dict(dim=32, num_tokens=97, depth=1, heads=2, dim_head=16)


def randomize(module, std=0.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def actor_critic():
    torch.manual_seed(0)
    ac = ActorCritic(PaLM(**CFG))
    randomize(ac.actor_palm)  # non-zero LoRA B: the actor scope really changes the logits
    return ac


def state(b=3, n=5):
    return torch.randint(1, 97, (b, n), generator=torch.Generator().manual_seed(1))


def test_samples_through_the_generation_engine_with_the_seed_filter_as_a_count():
    ac, s = actor_critic(), state()
    eos = 7
    torch.manual_seed(3)
    got = ac.generate(s, max_seq_len=17, eos_token=eos, return_values=True)
    torch.manual_seed(3)
    cfg = SamplingConfig(max_new_tokens=12, eos_token=eos, top_k=math.ceil(0.1 * 97))
    ref = generate(ac.actor_palm, s, cfg, lengths=torch.full((3,), 5), finetune_scope="actor")
    assert torch.equal(got.actions, ref.tokens)  # padding after EOS is 0 (pad_value) in both
    assert torch.equal(got.sequence, torch.cat([s, ref.tokens], -1))
    T = got.actions.shape[1]
    assert torch.equal(got.prompt_mask, (torch.arange(5 + T) < 5).expand(3, -1))
    # mask: the prompt plus each row's real tokens (through its first generated EOS)
    assert torch.equal(got.mask, torch.cat([torch.ones(3, 5, dtype=torch.bool), ref.mask], -1))
    logits = ac.actor_palm.logits(got.sequence, finetune_scope="actor")
    assert torch.allclose(got.action_logits, logits, atol=1e-5)
    assert got.values.shape == (3, 5 + T)
    assert ac.training  # eval only during the call


def test_no_filter_no_eos_and_a_custom_filter():
    ac, s = actor_critic(), state(b=2, n=4)
    torch.manual_seed(5)
    got = ac.generate(s, max_seq_len=10, filter_logits_fn=None, temperature=0.7)
    torch.manual_seed(5)
    ref = generate(ac.actor_palm, s, SamplingConfig(max_new_tokens=6, temperature=0.7),
                   lengths=torch.full((2,), 4), finetune_scope="actor")
    assert torch.equal(got.actions, ref.tokens)
    assert got.mask is None and got.values is None  # the seed: no EOS -> no mask; values only when asked

    # any other filter callable is applied as given, through PaLM.generate
    torch.manual_seed(9)
    custom = ac.generate(s, max_seq_len=10, filter_logits_fn=top_p, filter_thres=0.5)
    torch.manual_seed(9)
    expected = ac.actor_palm.generate(10, prompt=s, filter_logits_fn=top_p, filter_thres=0.5, finetune_scope="actor")
    assert torch.equal(custom.actions, expected)


def test_bad_state_raises():
    with pytest.raises(InputError, match="state must be"):
        actor_critic().generate(torch.zeros(1, 0, dtype=torch.long), max_seq_len=4)


def test_greedy_matches_the_seed_package_on_the_same_weights():
    torch.manual_seed(0)
    ref_palm = ref_pkg.PaLM(**CFG)
    ref_ac = ref_pkg.ActorCritic(palm=ref_palm, pooled_values=False)
    randomize(ref_palm)
    ours = PaLM(**CFG)
    ours.add_finetune_params("actor")  # the seed's critic is a deep copy, so its palm holds the actor scope only
    ours.load_state_dict(v08_to_ours(ref_palm.state_dict()), strict=True)
    ac = ActorCritic(ours)
    s = state(b=2, n=6)
    # an EOS that greedy decoding of row 0 produces, so the post-EOS masking is exercised
    eos = int(ac.generate(s, max_seq_len=14, temperature=0.0).actions[0, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref_ac.generate(s, max_seq_len=14, eos_token=eos, temperature=0.0)
    got = ac.generate(s, max_seq_len=14, eos_token=eos, temperature=0.0)
    assert torch.equal(got.prompt_mask, expected.prompt_mask)
    assert torch.equal(got.mask, expected.mask)
    keep = got.mask  # (b, n + T): the prompt and each row's tokens through its first EOS
    assert not keep.all()  # some row did stop early
    # the seed leaves post-EOS tokens in place until every row has finished; we pad them with
    # pad_value (documented). Everything the mask keeps is identical.
    assert torch.equal(got.sequence[keep], expected.sequence[keep])
    assert torch.equal(got.sequence[~keep], torch.zeros_like(got.sequence[~keep]))
    assert (got.action_logits[keep] - expected.action_logits[keep]).abs().max() <= 1e-4
