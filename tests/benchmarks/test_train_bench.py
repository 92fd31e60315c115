"""The training benchmarks' bookkeeping: FLOP count, matched model sizes, clean skip without data."""

import pytest

from tests.helpers.scripts import BENCHMARKS, load_script

train = load_script(BENCHMARKS / "train.py")
quality = load_script(BENCHMARKS / "quality.py")  # imports train by that name: load it first


def test_flops_per_token_by_hand():
    """Config S, per block: fused projection 384 x (384 + 64 + 64 + 2 * 1536) = 1,376,256,
    attention out 384 x 384 = 147,456, feedforward out 1536 x 384 = 589,824 -> 2,113,536.
    N = 6 * 2,113,536 + 256 x 384 (tied output projection) = 12,779,520.
    6N = 76,677,120; attention 12 L H Q T = 12 * 6 * 6 * 64 * 256 = 7,077,888; sum 83,755,008."""
    assert train.matmul_weights() == 12_779_520
    assert train.flops_per_token() == 83_755_008


@pytest.mark.slow
def test_all_three_systems_have_the_counted_matmul_weights():
    """Every matrix parameter takes part in a matmul (the tied embedding is counted once), so
    summing them must give N for ours, the seed package and the matched Llama alike."""
    from palm_rlhf_pytorch import PaLM as SeedPaLM

    models = [train._ours_model(),
              SeedPaLM(dim=train.DIM, num_tokens=train.VOCAB, depth=train.DEPTH, heads=train.HEADS,
                       dim_head=train.DIM_HEAD),
              train.build_llama()]
    for model in models:
        assert sum(p.numel() for p in model.parameters() if p.ndim == 2) == train.matmul_weights()


def test_quality_skips_cleanly_without_data(tmp_path, capsys):
    assert quality.main(["--data", str(tmp_path / "missing.txt")]) == 0
    assert "skipped" in capsys.readouterr().out
