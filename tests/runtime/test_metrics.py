"""MetricsLogger: JSONL rows, resume drops rows past the resumed step, non-main writes nothing."""

import pytest

from palm_rlhf.runtime.metrics import MetricsLogger, read_metrics


def test_rows_and_resume_truncation(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as m:
        for step in (1, 2, 3):
            m.log(step, {"train/loss": 1.0 / step, "nan": float("nan")})
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["train/loss"] == 0.5 and rows[0]["nan"] == "nan"
    with MetricsLogger(tmp_path, resume_step=2, tensorboard=False) as m:
        m.log(3, {"train/loss": 0.3})
    assert [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 0.5), (3, 0.3)]
    MetricsLogger(tmp_path, tensorboard=False).close()  # a fresh run starts a fresh log
    assert read_metrics(tmp_path) == []


def test_non_main_is_a_no_op(tmp_path):
    m = MetricsLogger(tmp_path / "r", is_main=False)
    m.log(1, {"x": 1})
    m.close()
    assert not (tmp_path / "r").exists()


def _tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_read_back_and_resume_purges_later_steps(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    with MetricsLogger(tmp_path) as m:
        assert m._writer is not None
        for step in (1, 2, 3):
            m.log(step, {"train/loss": 1.0 / step, "lr": 0.25 * step, "note": "text is not a scalar",
                         "skipped": True})
    scalars = _tensorboard_scalars(tmp_path)
    assert sorted(scalars) == ["lr", "train/loss"]  # numbers only: no strings, no booleans, no step/time
    assert scalars["train/loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert scalars["lr"] == [(1, 0.25), (2, 0.5), (3, 0.75)]

    # the interrupted run had logged step 3; the resumed one continues after step 2, as the JSONL does
    with MetricsLogger(tmp_path, resume_step=2) as m:
        m.log(3, {"train/loss": 0.125})
        m.log(4, {"train/loss": 0.0625})
    assert _tensorboard_scalars(tmp_path)["train/loss"] == [(1, 1.0), (2, 0.5), (3, 0.125), (4, 0.0625)]
    assert [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 0.5), (3, 0.125),
                                                                               (4, 0.0625)]
    assert _tensorboard_scalars(tmp_path)["lr"] == [(1, 0.25), (2, 0.5)]  # step 3's lr was the old run's
