"""MetricsLogger: JSONL rows, resume drops rows past the resumed step, non-main writes nothing."""

import json
import time
from pathlib import Path

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


# ---------------------------------------------------------------- report_to: which sinks, and trackers


def test_report_to_default_validation_and_missing_packages(monkeypatch):
    import importlib.util

    from palm_rlhf.errors import ConfigError
    from palm_rlhf.runtime.metrics import check_report_to, default_report_to

    tb = importlib.util.find_spec("tensorboard") is not None
    assert default_report_to() == (["jsonl", "tensorboard"] if tb else ["jsonl"])
    assert check_report_to(None) == default_report_to()
    assert check_report_to([]) == ["jsonl"]  # the JSONL is always written
    assert check_report_to("jsonl, jsonl") == ["jsonl"]
    with pytest.raises(ConfigError, match="report_to='neptune': unknown sink; use a list of jsonl, tensorboard, wandb, mlflow"):
        check_report_to(["jsonl", "neptune"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("wandb", "mlflow") else real(n, *a))
    with pytest.raises(ConfigError, match=r"report_to=wandb needs the 'wandb' package: pip install wandb"):
        check_report_to(["wandb"])
    with pytest.raises(ConfigError, match=r"report_to=mlflow needs .*pip install mlflow-skinny"):
        MetricsLogger("unused", is_main=False, report_to=["mlflow"])  # every rank checks, not only rank 0


def _wandb_history(run_dir, runs: int) -> tuple[list[dict], dict]:
    """The history rows and config of the offline W&B runs under RUN_DIR/wandb, read from their
    `run-ID.wandb` files once `runs` of them hold their exit record (W&B's service writes them
    after `finish()` returns): a 7-byte header, then LevelDB-log records (7-byte header: CRC,
    length, type 1 full / 2 first / 3 middle / 4 last) in 32 KiB blocks, each a protobuf `Record`."""
    for _ in range(600):  # the service finishes writing within moments; give a loaded machine 60 s
        rows, config, exits = _read_wandb_files(run_dir)
        if exits >= runs:
            return rows, config
        time.sleep(0.1)
    raise AssertionError(f"{run_dir}: {exits} of {runs} offline W&B runs were written out")


def _read_wandb_files(run_dir):
    import struct

    pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    rows, config, exits = [], {}, 0
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, part = path.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:
                break
            part += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(part)
                part = b""
                which = record.WhichOneof("record_type")
                if which == "history":
                    rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
                elif which in ("config", "run"):
                    cfg = record.config if which == "config" else record.run.config
                    config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in cfg.update})
                exits += which == "exit"
    return rows, config, exits


def test_wandb_offline_run_reads_back_and_resume_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with MetricsLogger(tmp_path, report_to=["wandb"], config={"lr": 0.01, "optim": {"beta": 0.9}}) as m:
        assert m.report_to == ["jsonl", "wandb"]
        for step in (1, 2):
            m.log(step, {"train/loss": 1.0 / step, "lr": 0.25 * step, "note": "text is not a scalar"})
    run_id = (tmp_path / ".wandb_run_id").read_text().strip()
    rows, config = _wandb_history(tmp_path, runs=1)
    assert [(r["_step"], r["train/loss"], r["lr"]) for r in rows] == [(1, 1.0, 0.25), (2, 0.5, 0.5)]
    assert all("note" not in r for r in rows)
    assert config["lr"] == 0.01 and config["optim"] == {"beta": 0.9}

    with MetricsLogger(tmp_path, resume_step=2, report_to=["wandb"]) as m:
        m.log(3, {"train/loss": 0.125})
    assert (tmp_path / ".wandb_run_id").read_text().strip() == run_id  # the same W&B run goes on
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # W&B names a run directory offline-run-TIME-ID, with "-1" appended when a resume starts in the same second
    assert len(runs) == 2 and all(r.name.endswith((run_id, f"{run_id}-1")) for r in runs)
    assert [(r["_step"], r["train/loss"]) for r in _wandb_history(tmp_path, runs=2)[0]] == [(1, 1.0), (2, 0.5), (3, 0.125)]


def test_mlflow_file_store_reads_back_and_resume_continues_the_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
    run_dir = tmp_path / "runs" / "ppo"
    with MetricsLogger(run_dir, report_to=["mlflow"], config={"lr": 0.01, "optim": {"beta": 0.9}}) as m:
        for step in (1, 2):
            m.log(step, {"train/loss": 1.0 / step, "lr": 0.25 * step, "skipped": True})
        m.log_text(2, "samples", "| reward | prompt |")
    client = MlflowClient(tracking_uri=store)
    run_id = (run_dir / ".mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "ppo"
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    assert run.data.params == {"lr": "0.01", "optim.beta": "0.9"}
    assert sorted(run.data.metrics) == ["lr", "train/loss"]  # numbers only
    history = lambda key: [(x.step, x.value) for x in sorted(client.get_metric_history(run_id, key),  # noqa: E731
                                                             key=lambda x: x.step)]
    assert history("train/loss") == [(1, 1.0), (2, 0.5)] and history("lr") == [(1, 0.25), (2, 0.5)]
    text = client.download_artifacts(run_id, "samples/step_00000002.md", str(tmp_path))
    assert Path(text).read_text() == "| reward | prompt |"

    with pytest.raises(RuntimeError, match="boom"):
        with MetricsLogger(run_dir, resume_step=2, report_to=["mlflow"]) as m:
            m.log(3, {"train/loss": 0.125})
            raise RuntimeError("boom")
    assert (run_dir / ".mlflow_run_id").read_text().strip() == run_id
    assert history("train/loss") == [(1, 1.0), (2, 0.5), (3, 0.125)]
    assert client.get_run(run_id).info.status == "FAILED"


def test_trackers_on_non_main_ranks_write_nothing(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    m = MetricsLogger(tmp_path / "r", is_main=False, report_to=["wandb", "tensorboard"])
    m.log(1, {"x": 1.0})
    m.close()
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_training_command_reports_the_same_numbers_to_every_sink(tmp_path, monkeypatch):
    """`palm-rlhf dpo ... report_to=[wandb,mlflow]`: W&B's and MLflow's histories hold exactly the
    numbers metrics.jsonl holds, step for step (the runtime's one sink feeds them all)."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    import torch
    from mlflow.tracking import MlflowClient

    from palm_rlhf.cli.main import main
    from palm_rlhf.data.preferences import write_preferences
    from palm_rlhf.data.synthetic import rule_preference_pairs
    from palm_rlhf.model import PaLM

    store = (tmp_path / "mlruns").as_uri()
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": store,
                       "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
        monkeypatch.setenv(key, value)
    torch.manual_seed(0)
    PaLM(num_tokens=256, dim=32, depth=1, heads=2, dim_head=16).save_pretrained(tmp_path / "base")
    write_preferences(tmp_path / "prefs.jsonl", rule_preference_pairs(16, seed=0))
    out = tmp_path / "dpo"
    assert main(["dpo", f"model={tmp_path / 'base'}", f"data={tmp_path / 'prefs.jsonl'}", f"out_dir={out}",
                 "max_steps=2", "batch_size=4", "max_len=24", "progress=false", "report_to=[wandb,mlflow]"]) == 0
    jsonl = {r["step"]: r for r in read_metrics(out)}
    assert sorted(jsonl) == [1, 2]
    keys = [k for k, v in jsonl[1].items() if isinstance(v, float) and k not in ("step", "time")]
    assert "loss" in keys and "grad_norm" in keys

    wandb_rows = {r["_step"]: r for r in _wandb_history(out, runs=1)[0]}
    run_id = (out / ".mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri=store)
    for key in keys:
        mlflow_values = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        for step in (1, 2):
            assert wandb_rows[step][key] == pytest.approx(jsonl[step][key], rel=1e-12), key
            assert mlflow_values[step] == pytest.approx(jsonl[step][key], rel=1e-12), key
    assert client.get_run(run_id).data.params["max_steps"] == "2"
