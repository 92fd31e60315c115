"""The run's one metrics sink: `RUN_DIR/metrics.jsonl` always, plus the trackers `report_to` names.

    report_to       where the numbers also go (rank 0 only)
    jsonl           RUN_DIR/metrics.jsonl, one JSON object per line (always written: resume, plots
                    and `read_metrics` read it); listing it is allowed
    tensorboard     RUN_DIR/tensorboard/ (`tensorboard --logdir RUN_DIR/tensorboard`)
    wandb           a Weights & Biases run (project $WANDB_PROJECT or "palm-rlhf"; WANDB_MODE=offline
                    writes RUN_DIR/wandb/ for `wandb sync` later)
    mlflow          an MLflow run in $MLFLOW_TRACKING_URI (experiment $MLFLOW_EXPERIMENT_NAME or
                    "palm-rlhf"); `mlflow-skinny` is enough

The default is jsonl plus tensorboard when it is installed. A tracker that is asked for but not
installed is a ConfigError naming the pip command, raised on every rank before any work.

A JSONL row: `{"step": 10, "time": 12.3, "train/loss": 2.1, "lr": 0.0003, ...}`. Only the main
process writes (pass `is_main=False` elsewhere and every call is a no-op). On resume,
`MetricsLogger(run_dir, resume_step=k)` drops rows logged after step k by the interrupted run, so
the file reads as one uninterrupted run; TensorBoard hides the same steps through `purge_step`;
W&B and MLflow continue the run they started (its id is kept in the run directory), where the
steps the interrupted run logged after its checkpoint are not erased.
"""

from __future__ import annotations

import html
import importlib.util
import json
import logging
import math
import os
import time
import uuid
from pathlib import Path

from ..errors import ConfigError
from ..files import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = ["MetricsLogger", "read_metrics", "METRICS_NAME", "SINKS", "default_report_to", "check_report_to"]

METRICS_NAME = "metrics.jsonl"
SINKS = ("jsonl", "tensorboard", "wandb", "mlflow")
# the module each tracker needs, and how to get it
_NEEDS = {"tensorboard": ("tensorboard", "pip install tensorboard"), "wandb": ("wandb", "pip install wandb"),
          "mlflow": ("mlflow", "pip install mlflow-skinny")}


def _installed(sink: str) -> bool:
    return sink not in _NEEDS or importlib.util.find_spec(_NEEDS[sink][0]) is not None


def default_report_to() -> list[str]:
    """jsonl, plus tensorboard when it is installed."""
    return ["jsonl"] + (["tensorboard"] if _installed("tensorboard") else [])


def check_report_to(report_to) -> list[str]:
    """The validated list of sinks (None: the default; a string may hold several, comma-separated).
    An unknown name or a tracker that is not installed raises ConfigError with the fix."""
    if report_to is None:
        return default_report_to()
    if isinstance(report_to, str):
        report_to = [s for s in report_to.replace(",", " ").split()]
    names = [str(s).strip().lower() for s in report_to]
    for name in names:
        if name not in SINKS:
            raise ConfigError(f"report_to={name!r}: unknown sink; use a list of {', '.join(SINKS)}")
        if not _installed(name):
            raise ConfigError(f"report_to={name} needs the {_NEEDS[name][0]!r} package: {_NEEDS[name][1]} "
                              f"(or drop {name} from report_to)")
    return list(dict.fromkeys(["jsonl", *names]))  # jsonl first and always; no sink twice


def _jsonable(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


def _scalars(metrics: dict) -> dict[str, float]:
    """The numbers of a metrics dict (no strings, no booleans), as trackers take them."""
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def read_metrics(path) -> list[dict]:
    """Rows of a metrics.jsonl file (or of RUN_DIR/metrics.jsonl); unreadable lines are skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _run_id(run_dir: Path, name: str, resume_step: int | None, new_id) -> tuple[str, bool]:
    """The tracker run id kept in RUN_DIR/NAME: the saved one when resuming, else a new one."""
    path = run_dir / name
    if resume_step is not None and path.is_file():
        return path.read_text().strip(), True
    run_id = new_id()
    atomic_write_bytes(path, (run_id + "\n").encode())
    os.chmod(path, 0o644)
    return run_id, False


class _TensorBoard:
    def __init__(self, run_dir: Path, resume_step: int | None, **_):
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard hides events at steps >= purge_step; the checkpoint at resume_step includes that
        # step's row (as the JSONL keeps it), so purging starts one later
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, step)

    def close(self, ok: bool) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run_dir: Path, resume_step: int | None, config: dict | None, name: str):
        import wandb

        self.wandb = wandb
        run_id, resumed = _run_id(run_dir, ".wandb_run_id", resume_step, lambda: uuid.uuid4().hex[:8])
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "palm-rlhf"), name=name, id=run_id,
                              dir=str(run_dir), config=config or {}, resume="allow" if resumed else None,
                              reinit="create_new")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class _Mlflow:
    def __init__(self, run_dir: Path, resume_step: int | None, config: dict | None, name: str):
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric = Metric
        try:
            self.client = MlflowClient()  # $MLFLOW_TRACKING_URI, else MLflow's default store
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "palm-rlhf")
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)

            def new_run() -> str:
                tags = {"mlflow.runName": name, "out_dir": str(run_dir.resolve())}
                return self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

            self.run_id, resumed = _run_id(run_dir, ".mlflow_run_id", resume_step, new_run)
        except Exception as e:  # noqa: BLE001 - any store failure is the user's tracking setup
            raise ConfigError(f"report_to=mlflow: cannot open the MLflow store ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); set MLFLOW_TRACKING_URI, e.g. "
                              f"http://localhost:5000") from e
        if resumed:
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            params = [Param(k[:250], str(v)[:6000]) for k, v in _flatten(config or {}).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, step) for k, v in scalars.items()])

    def text(self, step: int, tag: str, text: str) -> None:
        self.client.log_text(self.run_id, text, f"{tag}/step_{step:08d}.md")

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_TRACKERS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow}


class MetricsLogger:
    """`report_to` as in the module docstring; `config` (a dict) becomes the W&B config / MLflow
    params; `name` is the tracker run's name (default: the run directory's name).
    `tensorboard=False` is the older spelling of leaving tensorboard out of `report_to`."""

    def __init__(self, run_dir, is_main: bool = True, resume_step: int | None = None, *,
                 report_to=None, config: dict | None = None, name: str | None = None, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_NAME
        self.is_main = is_main
        # validated on every rank, so a missing package stops every process before any work
        self.report_to = [s for s in check_report_to(report_to) if tensorboard or s != "tensorboard"]
        self._start = time.time()
        self._sinks: dict[str, object] = {}
        self._file = None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            keep = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= resume_step]
            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())
            if keep and "time" in keep[-1]:
                self._start -= float(keep[-1]["time"])  # elapsed time continues across resumes
        elif resume_step is None and self.path.is_file():
            self.path.unlink()  # a fresh run in an existing directory starts a fresh log
        self._file = self.path.open("a")
        try:
            for sink in self.report_to:
                if sink in _TRACKERS:
                    self._sinks[sink] = _TRACKERS[sink](self.run_dir, resume_step, config=config,
                                                        name=name or self.run_dir.resolve().name)
        except BaseException:
            self.close(ok=False)
            raise

    @property
    def _writer(self):
        """The TensorBoard SummaryWriter, or None."""
        tb = self._sinks.get("tensorboard")
        return tb.writer if tb is not None else None

    def log(self, step: int, metrics: dict) -> None:
        """Append one JSONL row; its numbers also go to every tracker."""
        if not self.is_main:
            return
        row = {"step": int(step), "time": round(time.time() - self._start, 3)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        scalars = _scalars(metrics)
        if scalars:
            for sink in self._sinks.values():
                sink.log(int(step), scalars)

    def log_text(self, step: int, tag: str, text: str) -> None:
        """A text sample (e.g. generated text): a JSONL row and a text entry in every tracker."""
        self.log(step, {tag: text})
        if self.is_main:
            for sink in self._sinks.values():
                sink.text(int(step), tag, text)

    def close(self, ok: bool = True) -> None:
        """Flush and close every sink; `ok=False` marks the tracker runs as failed."""
        if self._file is not None:
            self._file.flush()
            try:
                os.fsync(self._file.fileno())
            except OSError:
                pass
            self._file.close()
            self._file = None
        sinks, self._sinks = self._sinks, {}
        for name, sink in sinks.items():
            try:
                sink.close(ok)
            except Exception as e:  # noqa: BLE001 - one tracker failing to close must not hide the others
                log.warning("closing the %s sink failed: %s", name, e)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(ok=exc_type is None)
