"""MetricsLogger: JSONL rows, resume drops rows past the resumed step, non-main writes nothing."""

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
