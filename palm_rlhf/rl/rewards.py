"""Reward sources behind one interface.

A reward source is called as ``source(prompts, completions, stop_reasons)`` with
lists of 1-D token-id tensors (completions without their final EOS) and the
generation's stop reasons, and returns float scores (b,). Build one with
`as_reward_source`, which accepts:

* a `RewardModel` (scored in eval mode, batched);
* any callable ``fn(prompts, completions) -> scores`` (a verifier, a rule, a remote
  judge); with `tokenizer=` it receives decoded strings instead of token ids. One of
  another shape (TRL's ``f(completions)``) is a ConfigError showing the expected one;
  `import_reward_function("module:function")` finds it as ``python script.py`` would,
  in the working directory first (or in a file: ``path/to/rewards.py:function``).
  A callable that declares a ``stop_reasons`` parameter also gets each completion's stop
  reason ("eos", "max_new_tokens", ...) by keyword, one that declares ``finished`` gets
  booleans (True = ended with EOS), so it can tell a finished answer from one cut short;
* a list of ``(source, weight)`` pairs: their weighted sum;
* an existing `RewardSource`.

`MissingEOSPenalty` wraps any source and subtracts a fixed penalty from responses that
hit the length limit instead of ending with EOS ("The N implementation details of
RLHF with PPO", detail 10).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError, InputError
from ..model.reward import RewardModel


class RewardSource:
    """Base class: subclasses implement `score`."""

    def score(self, prompts: Sequence[Tensor], completions: Sequence[Tensor], stop_reasons: Sequence[str]) -> Tensor:
        raise NotImplementedError

    def __call__(self, prompts, completions, stop_reasons=None) -> Tensor:
        if len(prompts) != len(completions):
            raise InputError(f"{len(prompts)} prompts but {len(completions)} completions")
        stop_reasons = list(stop_reasons) if stop_reasons is not None else ["eos"] * len(prompts)
        scores = self.score(prompts, completions, stop_reasons)
        scores = torch.as_tensor(scores, dtype=torch.float32).detach().cpu().reshape(-1)
        if scores.numel() != len(prompts):
            raise InputError(f"{type(self).__name__} returned {scores.numel()} scores for {len(prompts)} completions")
        if not bool(torch.isfinite(scores).all()):
            raise InputError(f"{type(self).__name__} returned a non-finite score: {scores.tolist()}")
        return scores


class ModelReward(RewardSource):
    """Scores from a `RewardModel` (its `score`, in eval mode)."""

    def __init__(self, model: RewardModel, batch_size: int = 32, max_len: int | None = None):
        self.model, self.batch_size, self.max_len = model, batch_size, max_len

    def score(self, prompts, completions, stop_reasons) -> Tensor:
        return self.model.score(list(prompts), list(completions), batch_size=self.batch_size, max_len=self.max_len)


class CallableReward(RewardSource):
    """Wraps ``fn(prompts, completions) -> scores``; with a tokenizer, fn receives strings."""

    def __init__(self, fn: Callable, tokenizer=None):
        if not callable(fn):
            raise ConfigError(f"reward function {fn!r} is not callable")
        self.extras = _declared(fn, ("stop_reasons", "finished"))
        _check_signature(fn, "strings" if tokenizer is not None else "token-id tensors", self.extras)
        self.fn, self.tokenizer = fn, tokenizer

    def score(self, prompts, completions, stop_reasons):
        if self.tokenizer is not None:
            prompts = [self.tokenizer.decode(p.tolist()) for p in prompts]
            completions = [self.tokenizer.decode(c.tolist()) for c in completions]
        given = {"stop_reasons": list(stop_reasons), "finished": [r == "eos" for r in stop_reasons]}
        return self.fn(prompts, completions, **{name: given[name] for name in self.extras})


def _declared(fn: Callable, names: Sequence[str]) -> list[str]:
    """Which of `names` fn declares as parameters (not via **kwargs: those may mean something else)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins have no signature: the (prompts, completions) form
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [n for n in names if n in params and params[n].kind in kinds]


def _check_signature(fn: Callable, items: str, extras: Sequence[str] = ()) -> None:
    """ConfigError unless `fn` can be called as fn(prompts, completions, **extras)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without introspectable parameters: trust it
        return
    try:
        signature.bind([], [], **{name: [] for name in extras})
    except TypeError:
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        raise ConfigError(f"reward function {name}{signature} cannot be called as fn(prompts, completions); "
                          f"write it as def {name.rsplit('.', 1)[-1]}(prompts, completions) -> list[float], "
                          f"taking two lists of {items} and returning one score per completion "
                          f"(wrap a TRL-style f(completions) as lambda prompts, completions: f(completions))") from None


def import_reward_function(spec: str) -> Callable:
    """`module:function` (or `path/to/file.py:function`), found as `python script.py` would find it: the
    working directory comes first on the import path."""
    module, _, name = str(spec).rpartition(":")
    if not module or not name:
        raise ConfigError(f"reward_fn={spec!r} must look like 'module:function' (e.g. my_rewards:score for a "
                          f"my_rewards.py in the working directory) or 'path/to/file.py:function'")
    try:
        if module.endswith(".py"):
            path = Path(module).expanduser()
            if not path.is_file():
                raise ConfigError(f"reward_fn={spec!r}: no such file {path} (relative to {os.getcwd()})")
            loader = importlib.util.spec_from_file_location(path.stem, path)
            loaded = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(loaded)
        else:
            cwd = os.getcwd()
            if cwd not in sys.path and "" not in sys.path:
                sys.path.insert(0, cwd)
            loaded = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"reward_fn={spec!r} cannot be imported: {e} (searched the working directory "
                          f"{os.getcwd()} and the installed packages)") from None
    except SyntaxError as e:
        raise ConfigError(f"reward_fn={spec!r}: {e.filename}:{e.lineno}: {e.msg}") from None
    fn = getattr(loaded, name, None)
    if fn is None:
        public = sorted(n for n, v in vars(loaded).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(f"reward_fn={spec!r}: {module} has no {name!r}; its functions: {', '.join(public) or 'none'}")
    if not callable(fn):
        raise ConfigError(f"reward_fn={spec!r}: {name} is a {type(fn).__name__}, not a function")
    return fn


class WeightedReward(RewardSource):
    """sum_i w_i * source_i."""

    def __init__(self, parts: Sequence[tuple[RewardSource, float]]):
        if not parts:
            raise ConfigError("a weighted reward needs at least one (source, weight) pair")
        self.parts = [(as_reward_source(s), float(w)) for s, w in parts]

    def score(self, prompts, completions, stop_reasons) -> Tensor:
        total = torch.zeros(len(prompts))
        for source, weight in self.parts:
            total += weight * source(prompts, completions, stop_reasons)
        return total


class MissingEOSPenalty(RewardSource):
    """`source` minus `penalty` for every completion whose stop reason is not "eos"."""

    def __init__(self, source, penalty: float = 1.0):
        self.source, self.penalty = as_reward_source(source), float(penalty)

    def score(self, prompts, completions, stop_reasons) -> Tensor:
        scores = self.source(prompts, completions, stop_reasons)
        missing = torch.tensor([r != "eos" for r in stop_reasons], dtype=torch.float32)
        return scores - self.penalty * missing


def as_reward_source(source, tokenizer=None) -> RewardSource:
    """Wrap a RewardModel, a callable, or a list of (source, weight) pairs as a `RewardSource`."""
    if isinstance(source, RewardSource):
        return source
    if isinstance(source, RewardModel):
        return ModelReward(source)
    if isinstance(source, (list, tuple)) and source and all(isinstance(p, tuple) and len(p) == 2 for p in source):
        return WeightedReward([(as_reward_source(s, tokenizer), w) for s, w in source])
    if callable(source):
        return CallableReward(source, tokenizer)
    raise ConfigError(f"cannot use {type(source).__name__} as a reward: pass a RewardModel, a callable "
                      f"(prompts, completions) -> scores, or a list of (source, weight) pairs")


__all__ = ["RewardSource", "ModelReward", "CallableReward", "WeightedReward", "MissingEOSPenalty",
           "as_reward_source", "import_reward_function"]
