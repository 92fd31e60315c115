"""Comparing two training runs that should be the same run (1 process against 2, DDP against FSDP,
one batch against micro-batches): the steps they logged, and every number they logged at each."""

from __future__ import annotations

import math

import pytest


def is_timing(key: str) -> bool:
    """A wall-clock metric (never equal between two runs)."""
    return key == "time" or key.startswith("seconds") or "per_s" in key


def assert_same_metrics(rows_a: list[dict], rows_b: list[dict], *, rel: float, abs: float, skip=(), what="") -> None:
    """The same steps (rows), and at each every finite float of `rows_a` (metrics.jsonl rows) within
    rel/abs in `rows_b`, timing keys and `skip` aside."""
    assert [r.get("step") for r in rows_a] == [r.get("step") for r in rows_b] and rows_a, what
    for i, (a, b) in enumerate(zip(rows_a, rows_b)):
        for key, value in a.items():
            if isinstance(value, float) and math.isfinite(value) and not is_timing(key) and key not in skip:
                assert b[key] == pytest.approx(value, rel=rel, abs=abs), (what, a.get("step", i), key)
