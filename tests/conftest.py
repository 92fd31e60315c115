"""Fixtures for every test directory. Helpers to import live in tests/helpers/."""

from __future__ import annotations

import functools
import os

import pytest

from tests.helpers.models import FAMILIES, make_model

MAX_WORKERS = 4  # `-n auto` (pyproject's addopts): one test process per core, at most this many


def pytest_xdist_auto_num_workers(config):
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def pytest_configure(config):
    """Under pytest-xdist each worker is one of several processes sharing the cores: one torch thread
    each (two threads per worker on two cores would wait for each other), in-process and in the
    commands a test launches."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(params=FAMILIES)
def model_factory(request):
    """`model_factory(seed=0, randomized=True, **overrides)` builds a tiny model of one family
    (tests.helpers.models.make_model); a test that takes this fixture runs once per family in
    tests.helpers.models.FAMILIES (PaLM, a Llama and a Qwen configuration), its id naming the family
    (`[palm]`, `[llama]`, `[qwen]`)."""
    return functools.partial(make_model, request.param)
