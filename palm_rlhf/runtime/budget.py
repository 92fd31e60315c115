"""Budgets as run control: stop when a measured quantity leaves its budget, and keep the last state
measured within it (DPO, PPO and GRPO with `kl_budget=` / `stop_at_kl_budget=`).

    budget = Budget("dpo", "kl_ref", c.kl_budget, c.stop_at_kl_budget, snapshot=..., restore=..., log=log,
                    advice="lower optim.lr or max_steps, raise beta", untrained_advice="...")
    budget.begin()                          # setup: the start is within (KL 0 from the reference)
    row.update(budget.measure(step, kl))    # after each measurement: warns once, may request the stop
    ... the run stops when `budget.stop_requested` (Run.train asks the trainer's `stop_requested`);
    budget.roll_back(step)                  # final/ only: back to the last state measured within it

Past the budget it warns once. With `stop` the run ends at the first measurement over it: the
checkpoint holds the state that passed it (what a resume continues from), final/ the last one
measured within it (the starting state if the first measurement was already over). The kept state
travels in the checkpoint (`state_dict`), so a resumed run that stops again keeps the same one.
"""

from __future__ import annotations

import logging
from typing import Callable

from ..errors import ConfigError

__all__ = ["Budget", "check_budget"]


def check_budget(limit: float | None, stop: bool, measured: bool = True, how: str = "") -> None:
    """Config checks for `kl_budget` / `stop_at_kl_budget` (a ConfigError naming the keys)."""
    if limit is not None and not limit > 0:
        raise ConfigError(f"kl_budget={limit} must be > 0 nats per sequence (or null: no budget)")
    if stop and (limit is None or not measured):
        raise ConfigError(f"stop_at_kl_budget=true needs kl_budget=NATS{how} (kl_ref is what is compared with "
                          f"the budget)")


class Budget:
    def __init__(self, who: str, key: str, limit: float | None, stop: bool, *, snapshot: Callable[[], dict],
                 restore: Callable[[dict], None], log: logging.Logger, advice: str, untrained_advice: str,
                 unit: str = "nats/sequence", limit_key: str = "kl_budget", stop_key: str = "stop_at_kl_budget"):
        self.who, self.key, self.limit, self.stop = who, key, limit, stop
        self.snapshot, self.restore, self.log = snapshot, restore, log
        self.advice, self.untrained_advice, self.unit = advice, untrained_advice, unit
        self.limit_key, self.stop_key = limit_key, stop_key
        self.stop_requested = False
        self.over_since: int | None = None
        self.within: dict | None = None

    def begin(self) -> None:
        """The starting state is within the budget (a fresh run's policy is its reference)."""
        self.within = self._keep(0, 0.0) if self.stop else None

    def _keep(self, step: int, value: float) -> dict:
        return {"step": step, self.key: value, "state": self.snapshot()}

    def measure(self, step: int, value: float, over: bool | None = None, row: int | None = None) -> dict:
        """Record a measurement of the state after `step` steps (logged in metrics row `row`, default
        `step`); returns what the metrics row gets (the budget)."""
        if self.limit is None:
            return {}
        over = value > self.limit if over is None else over
        if over and self.over_since is None:
            self.over_since = step
            self.log.warning("%s step %d: %s %.2f %s passed %s=%g%s", self.who, step if row is None else row,
                             self.key, value, self.unit,
                             self.limit_key, self.limit, f"; stopping here ({self.stop_key}=true)" if self.stop else
                             f"; {self.advice}, or set {self.stop_key}=true to stop at the budget")
        self.stop_requested = self.stop and over
        if self.stop and not over:
            self.within = self._keep(step, value)
        return {self.limit_key: self.limit}

    def state_dict(self) -> dict:
        return {"within_budget": self.within}

    def load_state_dict(self, state: dict) -> None:
        if self.stop:  # None from a run without the stop: nothing measured within yet
            self.within = state.get("within_budget")

    def roll_back(self, step: int) -> None:
        """At a stop over the budget: back to the last state measured within it (for final/)."""
        if not self.stop_requested:
            return
        kept = self.within
        if kept is None:
            self.log.warning("%s: no policy of this run was measured within %s=%g (resumed past it); final/ holds "
                             "step %d's", self.who, self.limit_key, self.limit, step)
            return
        self.restore(kept["state"])
        if kept["step"] == 0:  # nothing of the training is kept: say so, with the ways out
            self.log.warning("%s: no measurement after the start was within %s=%g (stopped at step %d), so final/ "
                             "holds the starting policy, untrained; %s, or raise %s", self.who, self.limit_key,
                             self.limit, step, self.untrained_advice, self.limit_key)
            return
        self.log.info("%s: final/ holds step %d's policy (%s %.2f, within %s=%g); step %d's passed the budget and "
                      "is in the checkpoint", self.who, kept["step"], self.key, kept[self.key], self.limit_key,
                      self.limit, step)

    def final_step(self, step: int) -> int:
        """The step whose state final/ holds: the kept one after a stop over the budget."""
        return self.within["step"] if self.stop_requested and self.within is not None else step
