"""Counters of every process, and how they reach the supervisor (SPEC 4).

Every name comes from shared/counternames.py (the catalogue).

Each child slot counts into its own `SharedCounters` block and the supervisor sums the
blocks, so counts survive the death of the process that made them. Per run:

    received = events + invalid + excluded + dropped (minus kernel and destination_full)
    events + recovered.D = written.D + failed.D + dropped.destination_full.D + still spooled

`Counters` is the plain in-process kind, for code that counts locally and publishes.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from shared import counternames as names


class Counting(Protocol):
    """What code that counts needs: `Counters` in a process, or a `SharedCounters` block."""

    def add(self, name: str, amount: int = 1) -> None: ...

    def add_all(self, amounts: Mapping[str, int]) -> None: ...

    def get(self, name: str) -> int: ...

    def snapshot(self) -> dict[str, int]: ...


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
        total(values, names.DROPPED)
        - total(values, names.dropped(names.DESTINATION_FULL))
        - values.get(names.DROPPED_KERNEL, 0)
        - values.get(names.DROPPED_SPOOL_CORRUPT, 0)
        - total(values, names.dropped(names.SPOOL_MISMATCH))
    )


def summary_line(values: Mapping[str, int], destinations: Iterable[str]) -> str:
    """One log line that shows whether the counters add up."""
    parts = [
        f"{names.RECEIVED}={values.get(names.RECEIVED, 0)}",
        f"{names.EVENTS}={values.get(names.EVENTS, 0)}",
        f"{names.INVALID}={total(values, names.INVALID)}",
        f"{names.EXCLUDED}={values.get(names.EXCLUDED, 0)}",
        f"{names.DROPPED}={received_side_drops(values)}",
    ]
    for destination in destinations:
        for key in (names.written(destination), names.failed(destination)):
            parts.append(f"{key}={values.get(key, 0)}")
        if recovered := values.get(names.recovered(destination)):
            parts.append(f"{names.recovered(destination)}={recovered}")
    prefixes = (names.INVALID_PREFIX, names.DROPPED + ".")
    details = [f"{k}={v}" for k, v in sorted(values.items()) if k.startswith(prefixes)]
    return " ".join(parts + details)


# -- counters that outlive the process that counts them ------------------------------------

BLOCK_SLOTS = 1024
"""Counter names one block can hold; far more than any process uses (about 40)."""
_NAME_BYTES = 48 * 1024
_GENERATION, _COUNT, _NAMES_USED = 0, 1, 2
_HEADER_WORDS = 4
_BLOCK_WORDS = _HEADER_WORDS + 2 * BLOCK_SLOTS + _NAME_BYTES // 8
HIDDEN = names.HIDDEN
"""Names starting with this are a process's own bookkeeping, never summed or shown."""


def new_block(context: Any) -> Any:
    """Shared memory for one child slot, made by the supervisor before the child starts."""
    return context.RawArray(ctypes.c_int64, _BLOCK_WORDS)


class SharedCounters:
    """Counters in a block of shared memory, written by one process at a time.

    The supervisor gives every child slot a block, and a restarted child attaches to its
    predecessor's block: a child killed with SIGKILL loses no count, because there is no
    delta waiting to be reported, and its successor finds the bookkeeping it left.

    The block holds two copies of the values. `add` and `set` change one value in the live
    copy (one aligned 8-byte store each). `commit` changes several values at once: it
    copies the live values to the other copy, changes them there, then flips the
    generation, so a process killed in the middle leaves either none or all of a commit.
    Readers (`snapshot`) retry when the generation moved while they read (a seqlock).
    """

    def __init__(self, block: Any) -> None:
        self._words = block
        self._bytes = memoryview(block).cast("B")
        self._names_at = (_HEADER_WORDS + 2 * BLOCK_SLOTS) * 8
        self._index: dict[str, int] = {}
        self._refresh_index()

    # -- writing (the one process that owns the block) -------------------------------------

    def add(self, name: str, amount: int = 1) -> None:
        words = self._words
        slot = self._value_slot(self._slot(name), words[_GENERATION])
        words[slot] += amount

    def set(self, name: str, value: int) -> None:
        words = self._words
        words[self._value_slot(self._slot(name), words[_GENERATION])] = value

    def add_all(self, amounts: Mapping[str, int]) -> None:
        self.commit(amounts)

    def commit(self, adds: Mapping[str, int], sets: Mapping[str, int] | None = None) -> None:
        """Apply every add and set, or (if killed meanwhile) none of them."""
        slots = [(self._slot(name), amount) for name, amount in adds.items()]
        assignments = [(self._slot(name), value) for name, value in (sets or {}).items()]
        words = self._words
        generation = words[_GENERATION]
        live = self._value_slot(0, generation)
        spare = self._value_slot(0, generation + 1)
        count = words[_COUNT]
        ctypes.memmove(
            ctypes.addressof(words) + spare * 8, ctypes.addressof(words) + live * 8, count * 8
        )
        for slot, amount in slots:
            words[spare + slot] += amount
        for slot, value in assignments:
            words[spare + slot] = value
        words[_GENERATION] = generation + 1

    def get(self, name: str) -> int:
        slot = self._index.get(name)
        if slot is None:
            self._refresh_index()
            slot = self._index.get(name)
            if slot is None:
                return 0
        words = self._words
        return int(words[self._value_slot(slot, words[_GENERATION])])

    def has(self, name: str) -> bool:
        self._refresh_index()
        return name in self._index

    def _slot(self, name: str) -> int:
        slot = self._index.get(name)
        if slot is None:
            slot = self._register(name)
        return slot

    def _register(self, name: str) -> int:
        self._refresh_index()
        if name in self._index:
            return self._index[name]
        words = self._words
        count = int(words[_COUNT])
        # From the names themselves: a name half registered by a killed owner is overwritten.
        used = sum(len(known.encode()) + 1 for known in self._names(count))
        encoded = name.encode() + b"\0"
        if count >= BLOCK_SLOTS or used + len(encoded) > _NAME_BYTES:
            raise RuntimeError(f"counter block full: cannot add {name!r}")
        start = self._names_at + used
        self._bytes[start : start + len(encoded)] = encoded
        words[_HEADER_WORDS + count] = 0  # both copies start at 0
        words[_HEADER_WORDS + BLOCK_SLOTS + count] = 0
        words[_NAMES_USED] = used + len(encoded)
        words[_COUNT] = count + 1  # last: a reader never sees a name half written
        self._index[name] = count
        return count

    @staticmethod
    def _value_slot(slot: int, generation: int) -> int:
        return _HEADER_WORDS + (generation & 1) * BLOCK_SLOTS + slot

    def _refresh_index(self) -> None:
        names = self._names(self._words[_COUNT])
        self._index = {name: slot for slot, name in enumerate(names)}

    def _names(self, count: int) -> list[str]:
        if not count:
            return []
        used = self._words[_NAMES_USED]
        raw = bytes(self._bytes[self._names_at : self._names_at + used])
        return raw.decode().split("\0")[:count]

    # -- reading (the supervisor, any time) --------------------------------------------------

    def snapshot(self) -> dict[str, int]:
        """Every value, consistent with one generation; hidden names included."""
        words = self._words
        while True:
            generation = words[_GENERATION]
            count = words[_COUNT]
            names = self._names(count)
            start = self._value_slot(0, generation)
            values = words[start : start + count]
            if words[_GENERATION] == generation:
                return dict(zip(names, map(int, values), strict=True))

    def visible(self) -> dict[str, int]:
        return {k: v for k, v in self.snapshot().items() if not k.startswith(HIDDEN) and v}


def sum_counters(blocks: Iterable[SharedCounters]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for block in blocks:
        for name, value in block.visible().items():
            totals[name] = totals.get(name, 0) + value
    return totals


# -- liveness --------------------------------------------------------------------------------


def beat(counters: SharedCounters) -> None:
    """A child's heartbeat: the time (system-wide monotonic clock, ms) into its block.
    Called from its event loop's report timer, so a wedged loop stops beating, and the
    supervisor kills and restarts it (senseflow/liveness.py)."""
    counters.set(names.HEARTBEAT, int(time.monotonic() * 1000))


def last_beat(counters: SharedCounters) -> float:
    """The monotonic time (s) of the block's last heartbeat; 0 when it never beat."""
    return counters.get(names.HEARTBEAT) / 1000
