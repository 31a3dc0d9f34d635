"""The bounded search for the highest rate a trial passes at (benchmarks/suite.py).

Pure logic, no service: `search` calls `run(rate)` for trials and decides the next rate.

1. Bracket: step up from `start` while trials pass (never above `cap`), or down while they
   fail, until one rate passed and one failed; the n-th step is a factor `step ** n`, so a
   start far from the answer costs a few trials, not many.
2. Bisect between the highest passing rate `lo` and the lowest failing one `hi` until
   (hi - lo) / lo <= `precision`, or the rate grid (`round_rate`) leaves nothing between
   them, or the trial budget is spent.

A trial without loss that only drained too slowly is repeated once (the machine may have
been busy for a second); the repeat counts against the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar


class TrialLike(Protocol):
    @property
    def zero_loss(self) -> bool: ...

    @property
    def steady(self) -> bool: ...

    def describe(self) -> str: ...


T = TypeVar("T", bound=TrialLike)

PRECISION = "precision"
"""Why the search stopped: the bracket is within the precision asked for ..."""
RATE_GRID = "rate grid"
"""... no grid rate lies between `lo` and `hi` (`round_rate`) ..."""
CAP = "cap"
"""... the cap passed: the highest rate is at least the cap ..."""
FLOOR = "floor"
"""... even the lowest grid rate failed ..."""
BUDGET = "budget"
"""... or the trial budget ran out."""


def round_rate(rate: float) -> float:
    """Rates are tried on a grid: 100/s steps below 10,000/s, 500/s steps above."""
    step = 100 if rate < 10_000 else 500
    return float(max(step, round(rate / step) * step))


@dataclass
class SearchResult(Generic[T]):
    lo: float
    """Highest rate that passed (0.0: none did)."""
    hi: float | None
    """Lowest rate above `lo` that failed (None: none did, within the cap)."""
    trials: list[T]
    target_precision: float
    budget: int
    stopped: str = BUDGET
    rates: list[float] = field(default_factory=list)
    """The rate of each trial, in order."""

    @property
    def precision(self) -> float | None:
        """(hi - lo) / lo: how well the highest passing rate is known (None: unbounded)."""
        if not self.lo or self.hi is None:
            return None
        return (self.hi - self.lo) / self.lo

    @property
    def within_target(self) -> bool:
        precision = self.precision
        return precision is not None and precision <= self.target_precision + 1e-9

    def as_dict(self) -> dict[str, Any]:
        precision = self.precision
        return {
            "lo": self.lo,
            "hi": self.hi,
            "precision": None if precision is None else round(precision, 4),
            "target_precision": self.target_precision,
            "within_target": self.within_target,
            "stopped": self.stopped,
            "trials": len(self.trials),
            "budget": self.budget,
            "rates": self.rates,
        }


def next_rate(
    lo: float, hi: float | None, cap: float, step: float, precision: float, steps: int = 1
) -> tuple[float | None, str]:
    """The next rate to try given the bracket so far, or (None, why the search stops);
    `steps`: how many rates the bracketing has tried so far (the step grows with it)."""
    factor = step ** max(1, steps)
    if hi is None:  # everything passed so far: step up
        if lo >= round_rate(cap):
            return None, CAP
        up = round_rate(min(lo * factor, cap))
        return (up, "") if up > lo else (None, CAP)
    if not lo:  # everything failed so far: step down
        down = round_rate(hi / factor)
        return (down, "") if down < hi else (None, FLOOR)
    if (hi - lo) / lo <= precision + 1e-9:
        return None, PRECISION
    middle = round_rate((lo + hi) / 2)
    return (middle, "") if lo < middle < hi else (None, RATE_GRID)


def search(
    run: Callable[[float], T],
    start: float,
    cap: float,
    precision: float,
    max_trials: int,
    log: Callable[[str], None] = print,
    step: float = 2.0,
) -> SearchResult[T]:
    """Highest rate whose trial passes (zero loss and steady), known within `precision`
    when the budget of `max_trials` allows (see the module's docstring)."""
    result: SearchResult[T] = SearchResult(0.0, None, [], precision, max_trials)
    rate = round_rate(min(start, cap))
    retried = False
    while len(result.trials) < max_trials:
        trial = run(rate)
        result.trials.append(trial)
        result.rates.append(rate)
        log(trial.describe())
        if trial.zero_loss and not trial.steady and not retried:
            retried = True  # slow to drain once may be the machine: confirm it, once
            continue
        retried = False
        if trial.zero_loss and trial.steady:
            result.lo = max(result.lo, rate)
        else:
            result.hi = rate if result.hi is None else min(result.hi, rate)
        tried = len(set(result.rates))
        following, why = next_rate(result.lo, result.hi, cap, step, precision, tried)
        if following is None:
            result.stopped = why
            break
        rate = following
    else:
        result.stopped = BUDGET
    return result
