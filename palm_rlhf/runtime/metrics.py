"""Metric sinks: `RUN_DIR/metrics.jsonl` always, TensorBoard when the package is installed.

One JSON object per line: `{"step": 10, "time": 12.3, "train/loss": 2.1, "lr": 0.0003, ...}`.
Only the main process writes (pass `is_main=False` elsewhere and every call is a no-op).
On resume, `MetricsLogger(run_dir, resume_step=k)` drops rows logged after step k by the
interrupted run, so the file reads as one uninterrupted run; TensorBoard
(`tensorboard --logdir RUN_DIR/tensorboard`) hides the same steps through `purge_step`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from ..model.checkpoint import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = ["MetricsLogger", "read_metrics", "METRICS_NAME"]

METRICS_NAME = "metrics.jsonl"


def _jsonable(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


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


class MetricsLogger:
    def __init__(self, run_dir, is_main: bool = True, resume_step: int | None = None, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_NAME
        self.is_main = is_main
        self._start = time.time()
        self._writer = None
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
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                try:
                    # TensorBoard hides events at steps >= purge_step; the checkpoint at resume_step
                    # includes that step's row (as the JSONL keeps it), so purging starts one later
                    purge = None if resume_step is None else resume_step + 1
                    self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge)
                except Exception as e:  # noqa: BLE001 - TensorBoard is optional
                    log.warning("TensorBoard disabled: %s", e)

    def log(self, step: int, metrics: dict) -> None:
        """Append one row; numeric values also go to TensorBoard."""
        if not self.is_main:
            return
        row = {"step": int(step), "time": round(time.time() - self._start, 3)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._writer is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._writer.add_scalar(k, v, step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        """A text sample (e.g. generated text): a JSONL row and a TensorBoard text entry."""
        self.log(step, {tag: text})
        if self._writer is not None:
            self._writer.add_text(tag, text, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            try:
                os.fsync(self._file.fileno())
            except OSError:
                pass
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
