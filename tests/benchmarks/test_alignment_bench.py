"""benchmarks/alignment.py's bookkeeping: the rules' units and the fit of DPO's margins on them."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import alignment  # noqa: E402
from palm_rlhf.data.preferences import PairwiseRecord  # noqa: E402


def test_good_units_by_hand():
    assert alignment.good_units("word", "the cat Sat on mats.") == (2, 5)  # the, cat
    assert alignment.good_units("format", "f(x)\ng(y  \n") == (2, 3)  # "g(y  " unbalanced, trailing spaces
    assert alignment.rule_score("vowel", "abcde") == pytest.approx(2 / 5)


def test_unit_fit_recovers_a_per_unit_margin():
    """Margins that are exactly 1.5 per good word minus 0.25 per bad word: the fit finds both, explains
    all the variance and orders every pair as the margins do."""
    texts = ["alpha beta gamma", "alpha Beta gamma", "one two", "x y z w", "delta epsilon 7"]
    pairs = [(a, b) for a in texts for b in texts if a != b]
    records = [PairwiseRecord(prompt="", chosen=a, rejected=b) for a, b in pairs]

    def value(text):
        good, n = alignment.good_units("word", text)
        return 1.5 * good - 0.25 * (n - good)
    margins = torch.tensor([value(a) - value(b) for a, b in pairs])
    fit = alignment.unit_fit("word", records, margins)
    assert fit["per_good"] == pytest.approx(1.5) and fit["per_bad"] == pytest.approx(-0.25)
    assert fit["r2"] == pytest.approx(1.0) and fit["residual_sd"] == pytest.approx(0.0, abs=1e-9)
    assert fit["fit_accuracy"] == pytest.approx(float((margins > 0).double().mean()))

    noisy = margins + torch.tensor([(-1.0) ** i for i in range(len(pairs))])
    assert alignment.unit_fit("word", records, noisy)["r2"] < 1.0
