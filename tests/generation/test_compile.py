"""`generate(..., compile=True)`: same tokens as eager; falls back with a warning."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from palm_rlhf.generation import SamplingConfig, compiled, generate
from tests.helpers.models import tiny_palm


def tiny():
    return tiny_palm(depth=1)


@pytest.fixture(autouse=True)
def fresh_compile_state(monkeypatch):
    monkeypatch.setattr(compiled, "_FAILED", set())
    monkeypatch.setattr(compiled, "_STATE", compiled.weakref.WeakKeyDictionary())


PROMPTS = [torch.tensor([5, 6, 7]), torch.tensor([9])]
CFG = SamplingConfig(max_new_tokens=12, temperature=0)


def test_compile_failure_warns_and_falls_back_to_eager(monkeypatch):
    def broken(fn):
        def raise_on_call(*args):
            raise RuntimeError("no C++ compiler")
        return raise_on_call
    monkeypatch.setattr(compiled, "_compile_fn", broken)
    model = tiny()
    eager = generate(model, PROMPTS, CFG)
    with pytest.warns(RuntimeWarning, match="falling back to the eager decode step"):
        out = generate(model, PROMPTS, CFG, compile=True)
    assert torch.equal(out.tokens, eager.tokens)
    assert compiled._FAILED  # remembered: the next call goes straight to eager
    assert torch.equal(generate(model, PROMPTS, CFG, compile=True).tokens, eager.tokens)


def test_static_cache_is_reused_across_calls_with_different_padding(monkeypatch):
    """The static-cache path without the compiler (identity 'compile'): the same
    decoder and cache serve two calls whose padding differs, and both match eager."""
    monkeypatch.setattr(compiled, "_compile_fn", lambda fn: fn)
    model = tiny()
    a = generate(model, PROMPTS, CFG, compile=True)
    b = generate(model, PROMPTS[::-1], CFG, compile=True)
    assert len(compiled._STATE[model]) == 1
    assert torch.equal(a.tokens, generate(model, PROMPTS, CFG).tokens)
    assert torch.equal(b.tokens, generate(model, PROMPTS[::-1], CFG).tokens)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_real_torch_compile_matches_eager():
    model = tiny()
    eager = generate(model, PROMPTS, CFG)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would be a failure here
        out = generate(model, PROMPTS, CFG, compile=True)
    assert not compiled._FAILED and len(compiled._STATE[model]) == 1
    assert torch.equal(out.tokens, eager.tokens)
    torch.testing.assert_close(out.log_probs, eager.log_probs, atol=1e-4, rtol=0)
