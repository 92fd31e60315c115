"""Ours == palm-rlhf-pytorch 0.8.0 on the same weights (max abs diff <= 1e-5, fp32).

0.8.0 stores each LayerNorm gain as an offset from 1 (it computes
`layer_norm(x, gamma + 1)`); ours stores the gain itself, as the seed does, so
its state dict goes through `v08_to_ours` (gain + 1) and then loads with
strict=True. Weights are drawn with std 0.2 (logits of order 10) so that a
wrong rotary centre, mask or LoRA placement would show up far above 1e-5.
"""

from __future__ import annotations

import warnings

import pytest
import palm_rlhf_pytorch as ref_pkg  # the [test] extra, which also brings pytest: never skipped
import torch

from palm_rlhf.model import PaLM
from palm_rlhf.model.convert import ours_to_v08, v08_to_ours
from tests.helpers.models import randomize


TOL = 1e-5
CFG = dict(dim=48, num_tokens=97, depth=2, heads=3, dim_head=16)


def pair(scopes=(), **overrides):
    """A randomized reference model and ours with the converted weights."""
    cfg = {**CFG, **overrides}
    torch.manual_seed(0)
    ref = ref_pkg.PaLM(**cfg)
    for scope in scopes:
        ref.add_finetune_params(scope)
    randomize(ref, std=0.2)  # LoRA B becomes non-zero too, so the scope really acts
    ref.eval()
    ours = PaLM(**cfg)
    for scope in scopes:
        ours.add_finetune_params(scope)
    ours.load_state_dict(v08_to_ours(ref.state_dict()), strict=True)
    return ref.eval(), ours.eval()


def run_ref(ref, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 0.8.0's flash path uses the deprecated sdp_kernel context
        return ref(*args, **kwargs)


def tokens(b=3, n=29, vocab=97, seed=1):
    return torch.randint(1, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("flash_attn", [False, True])
def test_causal_logits(flash_attn):
    ref, ours = pair(flash_attn=flash_attn)
    x = tokens()
    expected = run_ref(ref, x)
    assert expected.abs().max() > 1.0  # the weights are large enough for the test to mean something
    assert (ours(x) - expected).abs().max() <= TOL


@pytest.mark.parametrize("flash_attn", [False, True])
def test_non_causal_with_masked_negative_ids(flash_attn):
    ref, ours = pair(causal=False, flash_attn=flash_attn)
    x = tokens()
    x[0, -7:] = -1  # padding at the end of row 0
    x[2, :3] = -1  # and at the start of row 2
    expected = run_ref(ref, x)
    got = ours(x)
    keep = x >= 0  # padded positions are not defined outputs; compare real tokens only
    assert (got - expected)[keep].abs().max() <= TOL


@pytest.mark.parametrize("flash_attn", [False, True])
def test_qk_rmsnorm(flash_attn):
    ref, ours = pair(qk_rmsnorm=True, flash_attn=flash_attn)
    x = tokens()
    assert (ours(x) - run_ref(ref, x)).abs().max() <= TOL


@pytest.mark.parametrize("flash_attn", [False, True])
def test_lora_scope(flash_attn):
    ref, ours = pair(scopes=("actor", "critic"), flash_attn=flash_attn)
    x = tokens()
    for scope in ("actor", "critic"):
        expected = run_ref(ref, x, finetune_scope=scope)
        assert (expected - run_ref(ref, x)).abs().max() > 0.1  # the adapter changes the outputs
        assert (ours(x, finetune_scope=scope) - expected).abs().max() <= TOL
    assert (ours(x, finetune_scope="actor", disable_lora=True) - run_ref(ref, x)).abs().max() <= TOL


@pytest.mark.parametrize("flash_attn", [False, True])
def test_return_loss_and_embeddings(flash_attn):
    ref, ours = pair(flash_attn=flash_attn)
    x = tokens()
    x[:, 5] = 0  # label 0 is the default cross_entropy_ignore_index in both
    assert abs(ours(x, return_loss=True).item() - run_ref(ref, x, return_loss=True).item()) <= TOL
    ref_logits, ref_embeds = run_ref(ref, x, return_logits_with_embedding=True)
    logits, embeds = ours(x, return_logits_with_embedding=True)
    assert (logits - ref_logits).abs().max() <= TOL and (embeds - ref_embeds).abs().max() <= TOL
    assert (ours(x, return_only_embedding=True) - run_ref(ref, x, return_only_embedding=True)).abs().max() <= TOL


def test_extra_embed():
    ref, ours = pair()
    x = tokens()
    extra = torch.randn(*x.shape, CFG["dim"], generator=torch.Generator().manual_seed(3))
    assert (ours(x, extra_embed=extra) - run_ref(ref, x, extra_embed=extra)).abs().max() <= TOL


def test_names_match_and_seed_format_loads_strict():
    """Same parameter/buffer names as 0.8.0; a seed-format (absolute gain) dict loads strictly."""
    ref, ours = pair(scopes=("default",))
    assert list(ours.state_dict()) == list(ref.state_dict())
    seed_format = ours.state_dict()  # absolute gains, the seed's convention
    fresh = PaLM(**CFG)
    fresh.add_finetune_params("default")
    assert fresh.load_state_dict(seed_format, strict=True)  # no missing/unexpected keys
    fresh.eval()
    x = tokens()
    assert torch.equal(fresh(x, finetune_scope="default"), ours(x, finetune_scope="default"))


def test_conversion_round_trip():
    ref, _ = pair()
    state = ref.state_dict()
    back = ours_to_v08(v08_to_ours(state))
    assert state.keys() == back.keys()
    for key in state:  # (g + 1) - 1 is g up to one fp32 rounding of values near 1
        assert torch.allclose(state[key], back[key], rtol=0, atol=1.2e-7), key
    gains = [k for k in state if k.endswith("norm.gamma")]
    assert len(gains) == CFG["depth"] + 1  # one per block + the final norm
    assert torch.equal(v08_to_ours(state)[gains[0]], state[gains[0]] + 1)
