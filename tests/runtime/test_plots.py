"""Run pictures: the series extraction skips rows without a number, and PNGs are written only when
there is something to draw."""

import pytest

from palm_rlhf.errors import DataError
from palm_rlhf.runtime.metrics import MetricsLogger
from palm_rlhf.runtime.plots import plot_run, plot_series, series


def test_series_keeps_only_numeric_points():
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": "nan"}, {"step": 3}, {"step": 4, "loss": 1.5},
            {"step": 5, "loss": True}]
    assert series(rows, "loss") == ([1, 4], [2.0, 1.5])


def test_plot_series_and_plot_run(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in range(1, 6):
        logger.log(step, {"train/loss": 3.0 / step, "lr": 1e-3})
    logger.close()
    assert plot_series([{"step": 1, "x": 1.0}, {"step": 2, "x": 2.0}], ("x",), "x", tmp_path / "x.png")
    assert (tmp_path / "x.png").stat().st_size > 1000
    assert not plot_series([{"step": 1}], ("x",), "x", tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    assert plot_run(tmp_path).stat().st_size > 1000
    with pytest.raises(DataError, match="no metrics.jsonl rows"):
        plot_run(tmp_path / "empty")


def test_plot_run_draws_the_kl_of_rl_and_dpo_runs(tmp_path):
    """A run that logs kl_ref (DPO every eval_every, PPO/GRPO every step) gets a third panel."""
    from matplotlib.image import imread

    plain, dpo = tmp_path / "plain", tmp_path / "dpo"
    for run, extra in ((plain, {}), (dpo, {"kl_ref": 4.5, "kl_budget": 10.0})):
        logger = MetricsLogger(run)
        for step in range(1, 4):
            logger.log(step, {"loss": 0.7 / step, "lr": 1e-3, **extra})
        logger.close()
    assert imread(plot_run(dpo)).shape[0] == 1000  # 10 in x 100 dpi: loss, KL, learning rate
    assert imread(plot_run(plain)).shape[0] == 700  # 7 in: loss, learning rate
