"""Counters kept per process and sent to the supervisor as deltas (SPEC 4).

Names are dotted: `received`, `invalid.<reason>`, `excluded`, `dropped.<reason>`,
`dropped.destination_full.<destination>` (given up on by one destination only, so not
part of the `dropped` that balances `received`),
`written.<destination>`, `failed.<destination>`. The supervisor sums the deltas of
every process; nobody shares mutable state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class Counters:
    def __init__(self) -> None:
        self._values: dict[str, int] = {}
        self._reported: dict[str, int] = {}

    def add(self, name: str, amount: int = 1) -> None:
        self._values[name] = self._values.get(name, 0) + amount

    def add_all(self, amounts: Mapping[str, int]) -> None:
        for name, amount in amounts.items():
            self._values[name] = self._values.get(name, 0) + amount

    def get(self, name: str) -> int:
        return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        return dict(self._values)

    def take_delta(self) -> dict[str, int]:
        """What changed since the last call; empty when nothing did."""
        delta = {
            name: value - self._reported.get(name, 0)
            for name, value in self._values.items()
            if value != self._reported.get(name, 0)
        }
        self._reported.update((name, self._values[name]) for name in delta)
        return delta


def total(values: Mapping[str, int], prefix: str) -> int:
    """Sum of every counter named `prefix` or `prefix.<anything>`."""
    return sum(v for k, v in values.items() if k == prefix or k.startswith(prefix + "."))


def received_side_drops(values: Mapping[str, int]) -> int:
    """Drops of datagrams before they became events: received = events + invalid +
    excluded + this (kernel drops are counted too, though never `received`)."""
    return (
        total(values, "dropped")
        - total(values, "dropped.destination_full")
        - values.get("dropped.kernel", 0)
    )


def summary_line(values: Mapping[str, int], destinations: Iterable[str]) -> str:
    """One log line that shows whether the counters add up."""
    parts = [
        f"received={values.get('received', 0)}",
        f"events={values.get('events', 0)}",
        f"invalid={total(values, 'invalid')}",
        f"excluded={values.get('excluded', 0)}",
        f"dropped={received_side_drops(values)}",
    ]
    for destination in destinations:
        parts.append(f"written.{destination}={values.get('written.' + destination, 0)}")
        parts.append(f"failed.{destination}={values.get('failed.' + destination, 0)}")
    details = [
        f"{k}={v}" for k, v in sorted(values.items()) if k.startswith(("invalid.", "dropped."))
    ]
    return " ".join(parts + details)
