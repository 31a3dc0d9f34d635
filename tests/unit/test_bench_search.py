"""The benchmark suite's bounded search for the highest passing rate (benchmarks/ratesearch.py).

Trials are stand-ins: a rate passes when it is at or below a known limit, so what is
checked is where the search ends, how well it knows it, and how many trials it spends.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from benchmarks.ratesearch import (
    BUDGET,
    CAP,
    FLOOR,
    PRECISION,
    RATE_GRID,
    SearchResult,
    next_rate,
    round_rate,
    search,
)


@dataclass
class FakeTrial:
    rate: float
    zero_loss: bool
    steady: bool

    def describe(self) -> str:
        return f"{self.rate:,.0f}/s"


class Machine:
    """Passes every rate up to `limit`; the first `slow` trials are lossless but slow."""

    def __init__(self, limit: float, slow: int = 0) -> None:
        self.limit = limit
        self.slow = slow
        self.rates: list[float] = []

    def __call__(self, rate: float) -> FakeTrial:
        self.rates.append(rate)
        if self.slow:
            self.slow -= 1
            return FakeTrial(rate, True, False)
        return FakeTrial(rate, rate <= self.limit, rate <= self.limit)


def run(limit: float, start: float, **kwargs: float) -> tuple[SearchResult[FakeTrial], Machine]:
    machine = Machine(limit)
    options: dict[str, float] = {"cap": 120_000, "precision": 0.05, "max_trials": 8, **kwargs}
    result = search(
        machine,
        start,
        options["cap"],
        options["precision"],
        int(options["max_trials"]),
        log=lambda _: None,
        step=options.get("step", 1.25),
    )
    return result, machine


@pytest.mark.parametrize("limit", [23_400.0, 28_000.0, 41_000.0, 45_200.0, 52_000.0, 74_900.0])
def test_the_highest_passing_rate_is_known_within_5_percent(limit: float) -> None:
    result, _ = run(limit, start=50_000)
    assert result.hi is not None
    assert result.lo <= limit < result.hi
    assert result.precision is not None and result.precision <= 0.05
    assert result.within_target and result.stopped in (PRECISION, RATE_GRID)
    assert len(result.trials) <= 8


def test_the_old_coarse_steps_are_refined() -> None:
    """The issue's example: 25,000 -> 50,000 -> 37,500 -> 31,000 left 31,000 and 37,500."""
    result, machine = run(33_000, start=25_000, step=2.0)
    assert machine.rates[:4] == [25_000, 50_000, 37_500, 31_000]
    assert result.lo >= 31_500 and result.hi is not None and result.hi <= 34_500


def test_a_close_hint_brackets_in_a_few_trials() -> None:
    result, machine = run(40_800, start=40_000, step=1.1)
    assert machine.rates[:2] == [40_000, 44_000]
    assert result.within_target and len(machine.rates) <= 4


def test_a_hint_too_high_steps_down() -> None:
    result, machine = run(30_000, start=40_000, step=1.1)
    assert machine.rates[:3] == [40_000, 36_500, 30_000]  # steps of 1.1, then 1.1 ** 2
    assert result.lo <= 30_000 < (result.hi or 0) and result.within_target


def test_a_start_far_above_closes_in_on_it_with_growing_steps() -> None:
    result, machine = run(8_700, start=50_000)
    assert machine.rates[:5] == [50_000, 40_000, 25_500, 13_000, 5_300]
    assert result.lo <= 8_700 < (result.hi or 0) and result.stopped == BUDGET


def test_a_slow_but_lossless_trial_is_repeated_once() -> None:
    machine = Machine(20_000, slow=1)
    result = search(machine, 10_000, 50_000, 0.05, 8, log=lambda _: None, step=2.0)
    assert machine.rates[:2] == [10_000, 10_000]
    assert result.lo <= 20_000 < (result.hi or 0)
    assert len(result.trials) == len(machine.rates)


def test_a_spent_budget_says_how_wide_the_bracket_still_is() -> None:
    result, _ = run(33_000, start=25_000, step=2.0, max_trials=3)
    assert result.stopped == BUDGET and len(result.trials) == 3
    assert (result.lo, result.hi) == (25_000, 37_500)
    assert result.precision == pytest.approx(0.5) and not result.within_target
    assert result.as_dict()["precision"] == 0.5 and result.as_dict()["within_target"] is False


def test_passing_at_the_cap_leaves_the_top_open() -> None:
    result, machine = run(1e9, start=20_000, cap=50_000, step=2.0)
    assert machine.rates == [20_000, 40_000, 50_000]
    assert (result.lo, result.hi, result.stopped) == (50_000, None, CAP)
    assert result.precision is None and not result.within_target


def test_failing_down_to_the_grid_floor_stops() -> None:
    result, machine = run(0, start=400, step=2.0)
    assert machine.rates == [400, 200, 100]
    assert (result.lo, result.hi, result.stopped) == (0.0, 100, FLOOR)


def test_next_rate_bisects_on_the_grid() -> None:
    assert next_rate(30_000, 40_000, 1e6, 1.25, 0.05) == (35_000, "")
    assert next_rate(30_000, 31_500, 1e6, 1.25, 0.05) == (None, PRECISION)
    assert next_rate(9_900, 10_000, 1e6, 1.25, 0.0) == (None, RATE_GRID)
    assert next_rate(30_000, None, 1e6, 1.25, 0.05) == (37_500, "")
    assert next_rate(0.0, 30_000, 1e6, 1.25, 0.05) == (24_000, "")
    assert next_rate(0.0, 40_000, 1e6, 1.1, 0.05, steps=2) == (33_000, "")


def test_rates_are_on_a_grid() -> None:
    assert round_rate(8_749) == 8_700
    assert round_rate(37_720) == 37_500
    assert round_rate(10) == 100
