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


def test_label_puts_the_rules_choice_first_and_drops_ties():
    prompts = ["p1", "p2", "p3"]
    first = ["the cat sat", "x = 1", "one two"]
    second = ["X.y z", "the end", "two one"]  # the last pair ties (both all good)
    records = alignment.label("word", prompts, first, second)
    assert [(r.prompt, r.chosen, r.rejected) for r in records] == [("p1", "the cat sat", "X.y z"),
                                                                   ("p2", "the end", "x = 1")]
    assert all(r.annotator == "rule:word" for r in records)


def test_more_table_reports_accuracies_with_their_standard_errors():
    result = {"rule": "word", "seed": 1, "rm_accuracy": 0.95,
              "dpo": {"heldout_accuracy": 0.85, "train_accuracy": 0.92},
              "more": {"held_more": {"n": 1600, "rm_accuracy": 0.975, "dpo_accuracy": 0.8},
                       "train_new": {"n": 400, "rm_accuracy": 0.9, "dpo_accuracy": 0.75}}}
    row = alignment.more_table([result])[-1]
    # sqrt(p (1 - p) / n): 0.975 of 1,600 -> 0.0039, 0.8 of 1,600 -> 0.010, 0.75 of 400 -> 0.0217
    assert row == ("| word | 1 | 0.950 | 0.975 ± 0.004 (1600) | 0.850 | 0.800 ± 0.010 | 0.920 | "
                   "0.750 ± 0.022 (400) |")
    assert alignment.more_table([{**result, "more": {}}]) == []  # results cached before these pairs existed


def test_residual_agreement_between_seeds():
    def run(seed, residuals, rule="word"):
        return {"rule": rule, "seed": seed, "dpo": {"unit_fit": {"residuals": residuals}}}
    same, flipped = [1.0, -2.0, 0.5, 3.0], [-1.0, 2.0, -0.5, -3.0]
    lines = alignment.residual_agreement([run(0, same), run(1, same), run(2, flipped), run(0, same, "format")])
    assert lines[-1] == "- word: seeds 0-1 1.00, seeds 0-2 -1.00, seeds 1-2 -1.00"  # format: one seed, no line
    assert alignment.residual_agreement([{"rule": "word", "seed": 0, "dpo": {}}]) == []
