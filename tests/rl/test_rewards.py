"""Python reward callables: the (prompts, completions) form, and the stop reasons for those
that declare `stop_reasons` or `finished`."""

from __future__ import annotations

import torch

from palm_rlhf.rl.rewards import MissingEOSPenalty, as_reward_source

PROMPTS = [torch.tensor([1, 2]), torch.tensor([3])]
COMPLETIONS = [torch.tensor([4, 5, 6]), torch.tensor([7])]
REASONS = ["eos", "length"]


def test_two_argument_callable_still_works():
    source = as_reward_source(lambda prompts, completions: [float(len(c)) for c in completions])
    assert source(PROMPTS, COMPLETIONS, REASONS).tolist() == [3.0, 1.0]


def test_callable_receives_stop_reasons_or_finished():
    seen = {}

    def by_reason(prompts, completions, stop_reasons):
        seen["stop_reasons"] = stop_reasons
        return [1.0 if r == "eos" else -1.0 for r in stop_reasons]

    def by_flag(prompts, completions, *, finished):
        seen["finished"] = finished
        return [2.0 * f for f in finished]

    assert as_reward_source(by_reason)(PROMPTS, COMPLETIONS, REASONS).tolist() == [1.0, -1.0]
    assert as_reward_source(by_flag)(PROMPTS, COMPLETIONS, REASONS).tolist() == [2.0, 0.0]
    assert seen == {"stop_reasons": ["eos", "length"], "finished": [True, False]}
    # through a weighted sum and a penalty wrapper the reasons still arrive
    mixed = MissingEOSPenalty([(by_reason, 2.0), (lambda p, c: [0.5, 0.5], 1.0)], penalty=1.0)
    assert mixed(PROMPTS, COMPLETIONS, REASONS).tolist() == [2.5, -2.5]


def test_kwargs_only_callable_gets_the_two_argument_form():
    """**kwargs may mean something else to the caller's function: only named parameters get extras."""
    def fn(prompts, completions, **options):
        assert options == {}
        return [0.0] * len(completions)

    assert as_reward_source(fn)(PROMPTS, COMPLETIONS, REASONS).tolist() == [0.0, 0.0]
