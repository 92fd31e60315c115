"""Fixtures for every test directory. Helpers to import live in tests/helpers/."""

from __future__ import annotations

import functools

import pytest

from tests.helpers.models import FAMILIES, make_model


@pytest.fixture(params=FAMILIES)
def model_factory(request):
    """`model_factory(seed=0, randomized=True, **overrides)` builds a tiny model of one family
    (tests.helpers.models.make_model); a test that takes this fixture runs once per family in
    tests.helpers.models.FAMILIES (PaLM, a Llama and a Qwen configuration), its id naming the family
    (`[palm]`, `[llama]`, `[qwen]`)."""
    return functools.partial(make_model, request.param)
