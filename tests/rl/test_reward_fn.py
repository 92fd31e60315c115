"""reward_fn=module:function: found in the working directory, and checked for the (prompts, completions) shape."""

from __future__ import annotations

import sys

import pytest
import torch

from palm_rlhf.data.tokenizer import ByteTokenizer
from palm_rlhf.errors import ConfigError
from palm_rlhf.rl.rewards import as_reward_source, import_reward_function

RULES = '''
def score(prompts, completions):
    return [float(c.count("a")) for c in completions]


def with_reasons(prompts, completions, stop_reasons=None):
    return [len(c) + (100.0 if r == "eos" else 0.0) for c, r in zip(completions, stop_reasons)]


def with_finished(prompts, completions, *, finished):
    return [float(f) for f in finished]


def trl_style(completions, **kwargs):
    return [0.0 for _ in completions]
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory holding a reward module, as a user's project would."""
    name = f"my_rewards_{tmp_path.name}"  # unique: sys.modules caches imports across tests
    (tmp_path / f"{name}.py").write_text(RULES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    return tmp_path, name


def _ids(text):
    return torch.tensor(ByteTokenizer().encode(text))


def test_module_in_the_working_directory(workdir):
    _, name = workdir
    fn = import_reward_function(f"{name}:score")
    source = as_reward_source(fn, ByteTokenizer())
    scores = source([_ids("p"), _ids("p")], [_ids("banana"), _ids("xyz")])
    assert scores.tolist() == [3.0, 0.0]


def test_file_path_form(workdir):
    path, name = workdir
    fn = import_reward_function(f"{path / name}.py:score")
    assert fn(["p"], ["aa"]) == [2.0]


def test_optional_extra_arguments_are_given_their_values(workdir):
    """A function that declares stop_reasons (optional) or finished (keyword-only) is called with each
    completion's: "xy" stopped at eos -> 2 + 100; "abc" ran out of tokens -> 3. Without stop reasons
    the source calls every completion finished (eos)."""
    _, name = workdir
    source = as_reward_source(import_reward_function(f"{name}:with_reasons"), ByteTokenizer())
    prompts, completions = [_ids("p"), _ids("q")], [_ids("xy"), _ids("abc")]
    assert source(prompts, completions, ["eos", "max_new_tokens"]).tolist() == [102.0, 3.0]
    assert source(prompts, completions).tolist() == [102.0, 103.0]
    finished = as_reward_source(import_reward_function(f"{name}:with_finished"), ByteTokenizer())
    assert finished(prompts, completions, ["stop_sequence", "eos"]).tolist() == [0.0, 1.0]


def test_wrong_signature_is_a_config_error_showing_the_expected_one(workdir):
    """TRL's f(completions, **kwargs) used to fail mid-run as `internal error: TypeError`."""
    _, name = workdir
    fn = import_reward_function(f"{name}:trl_style")
    with pytest.raises(ConfigError) as e:
        as_reward_source(fn, ByteTokenizer())
    message = str(e.value)
    assert "trl_style(completions, **kwargs)" in message
    assert "def trl_style(prompts, completions) -> list[float]" in message and "strings" in message


@pytest.mark.parametrize("spec, expect", [
    ("nonexistent_mod_xyz:score", "cannot be imported"),
    ("no_colon", "must look like 'module:function'"),
    ("missing_file.py:score", "no such file"),
])
def test_bad_specs(workdir, spec, expect):
    with pytest.raises(ConfigError, match=expect):
        import_reward_function(spec)


def test_missing_function_lists_what_is_there(workdir):
    _, name = workdir
    with pytest.raises(ConfigError, match="has no 'scorer'; its functions: score, trl_style, with_finished, with_reasons"):
        import_reward_function(f"{name}:scorer")
