"""Peak resident memory that one call adds (Linux)."""

from __future__ import annotations

from pathlib import Path

import pytest


def _status_mib(key: str) -> float:
    return int(Path("/proc/self/status").read_text().split(f"{key}:")[1].split()[0]) / 1024


def peak_mib_added(fn) -> float:
    """MiB that fn() adds to this process's peak resident memory: VmHWM is reset to the current RSS
    through /proc/self/clear_refs first (the test is skipped where that cannot be written)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    before = _status_mib("VmRSS")
    fn()
    return _status_mib("VmHWM") - before
