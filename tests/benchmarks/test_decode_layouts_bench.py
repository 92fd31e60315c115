"""benchmarks/decode_layouts.py times the right thing: every layout computes x @ W + r."""

import torch

from tests.helpers.scripts import BENCHMARKS, load_script

decode_layouts = load_script(BENCHMARKS / "decode_layouts.py")


def test_every_benchmarked_layout_computes_the_same_product():
    torch.manual_seed(0)
    w_t = torch.randn(64, 32)
    for rows in (1, 3):
        x, r = torch.randn(rows, 64), torch.randn(rows, 32)
        for name, (fn, w) in decode_layouts.layouts(w_t, rows).items():
            torch.testing.assert_close(fn(x, r.clone(), w), x @ w_t + r, atol=1e-4, rtol=1e-5, msg=name)


def test_the_script_runs_and_prints_a_table(capsys, monkeypatch):
    monkeypatch.setattr(decode_layouts, "SHAPES", {"small": (64, 32)})
    decode_layouts.main(["--rows", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| 1 | 64 x 32 (small) |" in out
