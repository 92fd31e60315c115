"""Sampling filters and draws on hand-made distributions."""

from __future__ import annotations

import math

import pytest
import torch

from palm_rlhf.errors import ConfigError
from palm_rlhf.generation import SamplingConfig, apply_repetition_penalty, process_logits, sample
from palm_rlhf.ops import filter_min_p, filter_top_k, filter_top_p, top_k, top_p

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
LOGITS = PROBS.log()


def kept(logits):
    return torch.isfinite(logits)[0].tolist()


def test_top_k_is_a_count():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0]])
    assert kept(filter_top_k(logits, 2)) == [False, True, False, True]  # 4 and 3
    assert kept(filter_top_k(logits, 0)) == [True] * 4  # 0 = off


@pytest.mark.parametrize("p, expected", [
    (0.5, [True, False, False, False]),   # 0.5 alone reaches 0.5
    (0.8, [True, True, False, False]),    # 0.5 + 0.3 = 0.8 reaches 0.8
    (0.81, [True, True, True, False]),    # needs 0.15 too: 0.95
    (1e-6, [True, False, False, False]),  # the top token is always kept
    (1.0, [True, True, True, True]),
])
def test_top_p_keeps_smallest_nucleus_reaching_p(p, expected):
    assert kept(filter_top_p(LOGITS, p)) == expected


def test_min_p_is_relative_to_top_token():
    # threshold 0.4 * 0.5 = 0.2: keeps 0.5 and 0.3
    assert kept(filter_min_p(LOGITS, 0.4)) == [True, True, False, False]
    # threshold 0.09 * 0.5 = 0.045: everything is kept
    assert kept(filter_min_p(LOGITS, 0.09)) == [True, True, True, True]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 3.0]])
    seen = torch.tensor([[True, True, False]])
    # 2 / 2 = 1, -1 * 2 = -2, unseen 3 unchanged
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 3.0]]


def test_process_order_penalty_temperature_then_filters():
    """logits [2, 1, 0, -1], seen token 0, penalty 4, temperature 0.5, top_k 2:
    penalty -> [0.5, 1, 0, -1]; /0.5 -> [1, 2, 0, -2]; top-2 keeps tokens 1 and 0."""
    cfg = SamplingConfig(temperature=0.5, top_k=2, repetition_penalty=4.0)
    out = process_logits(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), cfg, torch.tensor([[True, False, False, False]]))
    assert out[0, :2].tolist() == [1.0, 2.0]
    assert kept(out) == [True, True, False, False]


def test_greedy_is_argmax():
    assert sample(torch.tensor([[0.1, 3.0, 2.9]]), greedy=True).tolist() == [1]


def test_draws_follow_the_filtered_distribution():
    """20000 draws from top_p=0.8 of [0.5, 0.3, 0.15, 0.05] -> renormalised [0.625, 0.375, 0, 0]."""
    cfg = SamplingConfig(top_p=0.8)
    logits = process_logits(LOGITS.expand(20000, -1), cfg)
    draws = sample(logits, greedy=False, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert freq[2] == 0 and freq[3] == 0
    assert abs(freq[0].item() - 0.625) < 0.015


def test_inverse_cdf_draws_match_the_probabilities_and_skip_zero_probability_ids():
    """Many draws from a distribution with zeros at the start, middle and end: frequencies
    within 4 standard errors of p, a zero-probability id never drawn, even by the
    extreme u's 0 and 1 - 2**-53."""
    p = torch.tensor([0.0, 0.1, 0.0, 0.2, 0.3, 0.4, 0.0])
    logits = p.log().expand(40000, -1)
    draws = sample(logits, greedy=False, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=7).double() / draws.numel()
    se = (p.double() * (1 - p.double()) / draws.numel()).sqrt()
    assert ((freq - p.double()).abs() <= 4 * se + 1e-12).all(), freq
    edges = sample(p.log().expand(2, -1), False, uniform=torch.tensor([0.0, 1 - 2 ** -53], dtype=torch.float64))
    assert edges.tolist() == [1, 5]


def test_two_level_inverse_cdf_over_a_large_vocabulary():
    """Past 256 entries `sample` searches block sums, then one block: the same draw as the full
    cumulative sum for the same u (vocabularies that are and are not multiples of 256), mass spread
    over several blocks drawn in proportion, and zero-probability ids never drawn, also at block
    edges, before the first id with mass and after the last, with u = 0 and u = 1 - 2**-53."""
    from palm_rlhf.generation.sampling import SAMPLE_BLOCK

    gen = torch.Generator().manual_seed(3)
    for vocab in (SAMPLE_BLOCK + 1, 1000, 32000):
        logits = torch.randn(64, vocab, generator=gen) * 3
        logits[:, ::7] = float("-inf")
        u = torch.rand(64, generator=gen, dtype=torch.float64)
        cdf = logits.softmax(-1).double().cumsum(-1)
        full = torch.searchsorted(cdf, torch.minimum(u[:, None] * cdf[:, -1:], torch.nextafter(
            cdf[:, -1:], torch.zeros(()).double())), right=True).squeeze(-1)
        assert torch.equal(sample(logits, False, uniform=u), full)
    ids = torch.tensor([3, 255, 256, 700, 1999])  # the first and last ids with mass, two of them at a block edge
    p = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    logits = torch.full((2000,), float("-inf"))
    logits[ids] = p.log()
    draws = sample(logits.expand(40000, -1), False, generator=torch.Generator().manual_seed(2))
    counts = torch.bincount(draws, minlength=2000).double()
    assert counts.sum() == counts[ids].sum()  # nothing else drawn
    freq, se = counts[ids] / draws.numel(), (p.double() * (1 - p.double()) / draws.numel()).sqrt()
    assert ((freq - p.double()).abs() <= 4 * se).all(), freq
    edges = sample(logits.expand(2, -1), False, uniform=torch.tensor([0.0, 1 - 2 ** -53], dtype=torch.float64))
    assert edges.tolist() == [3, 1999]


def test_seeded_generator_repeats_draws():
    logits = torch.randn(4, 50)
    a = sample(logits, False, torch.Generator().manual_seed(7))
    b = sample(logits, False, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_legacy_filters_match_the_seed_package():
    utils = pytest.importorskip("palm_rlhf_pytorch.utils")
    torch.manual_seed(0)
    logits = torch.randn(5, 64) * 3
    for thres in (0.5, 0.9, 0.99):
        assert torch.equal(top_k(logits, thres=thres), utils.top_k(logits, thres=thres))
        assert torch.equal(top_p(logits, thres=thres), utils.top_p(logits, thres=thres))


def test_legacy_semantics_are_inverted():
    """Seed top_k(thres=0.9) keeps ceil(0.1 * 20) = 2 of 20 tokens; seed top_p(thres=0.9)
    keeps a nucleus of mass 0.1, i.e. only the 0.5 token here."""
    assert torch.isfinite(top_k(torch.randn(1, 20), thres=0.9)).sum() == 2
    assert kept(top_p(LOGITS, thres=0.9)) == [True, False, False, False]
    assert kept(top_p(LOGITS, thres=0.25)) == [True, True, False, False]  # keeps while mass before <= 0.75


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0), ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.1), ("temperature", -1.0),
    ("top_k", -1), ("top_k", 2.5), ("min_p", 1.0), ("repetition_penalty", 0.0), ("temperature", math.nan),
    ("stop_sequences", "\n\n"), ("stop_sequences", [[]]), ("eos_token", -1), ("eos_token", []),
    ("eos_token", [1, -2]), ("eos_token", [1.0]),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SamplingConfig(**{field: value})


def test_stop_sequences_are_normalised_to_tuples():
    assert SamplingConfig(stop_sequences=[[1, 2], 3]).stop_sequences == ((1, 2), (3,))
