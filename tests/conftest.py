"""Fixtures for every test directory. Helpers to import live in tests/helpers/."""

from __future__ import annotations

import functools

import pytest

from tests.helpers.models import FAMILIES, make_model, make_palm


@pytest.fixture
def palm():
    """A tiny PaLM with randomized weights (tests.helpers.models.make_palm(seed=0)), in eval mode."""
    return make_palm()


@pytest.fixture(params=FAMILIES)
def model_factory(request):
    """`model_factory(seed=0, randomized=True, **overrides)` builds a tiny model of one family; a test
    that takes this fixture runs once per family in tests.helpers.models.FAMILIES (PaLM for now)."""
    return functools.partial(make_model, request.param)
