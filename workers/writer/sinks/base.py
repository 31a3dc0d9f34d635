"""What every destination offers the writer: `start`, `write_batch`, `flush`, `close`."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from shared import counternames as names
from shared.counters import Counting
from shared.events import EncodedBatch


class DestinationUnreachable(Exception):
    """A destination could not be reached at start."""


class Ack(NamedTuple):
    """A batch a destination has finished with: every event delivered or rejected."""

    seq: int
    """Its spool sequence number (-1 without a spool)."""
    written: int
    failed: int
    received_ns: Sequence[int] = ()
    """The receive times of the events delivered, for the latency histogram; empty when
    not measured (a batch delivered in parts, or partly rejected)."""


Acknowledge = Callable[[list[Ack]], None]
"""Told the batches a destination has finished with, in any order: the writer's feed
counts them (written, failed, spool cursor) and measures their delivery latency."""


def counting_acks(counters: Counting, name: str) -> Acknowledge:
    """The acknowledgement callback of a sink used without a spool: count right away."""

    def acknowledge(acks: list[Ack]) -> None:
        written = sum(ack.written for ack in acks)
        failed = sum(ack.failed for ack in acks)
        if written:
            counters.add(names.written(name), written)
        if failed:
            counters.add(names.failed(name), failed)

    return acknowledge


def share_failures(
    seqs: list[int], events: list[int], failed: int, received_ns: Sequence[int] = ()
) -> list[Ack]:
    """Acks for batches delivered together, `failed` of their events rejected: failures
    are attributed to the first batches, so that each batch's written + failed is exact.
    `received_ns` (all batches' receive times, in order) is shared out when none failed
    (a partly rejected delivery was split: its latency is not measured)."""
    measured = received_ns if not failed else ()
    acks = []
    start = 0
    for seq, count in zip(seqs, events, strict=True):
        rejected = min(failed, count)
        failed -= rejected
        times = measured[start : start + count] if measured else ()
        start += count
        acks.append(Ack(seq, count - rejected, rejected, times))
    return acks


class Sink(Protocol):
    """Built as `Sink(config, counters, on_ack)`; `on_ack` None counts acks right away."""

    name: str

    async def start(self) -> None:
        """Connect and check the destination; raise DestinationUnreachable if it cannot."""

    async def write_batch(self, batch: EncodedBatch, seq: int = -1) -> None:
        """Take a batch; waits (backpressure) only while the sink's own bound is reached.

        Once every event of the batch is delivered or rejected, `on_ack([Ack(seq, written,
        failed, received_ns)])` is called; acknowledgements come in any order. The sink counts its
        retries; written and failed events are counted by whoever receives the acks."""

    async def flush(self) -> None:
        """Send everything taken so far and wait until it is acknowledged."""

    async def close(self) -> None:
        """Flush, then release connections."""


class Countable(Protocol):
    @property
    def count(self) -> int: ...


C = TypeVar("C", bound=Countable)


class ChunkQueue(Generic[C]):
    """Chunks of events waiting for their senders, in order.

    Events go into `current` until the owner `cut()`s it (full, or on its flush timer).
    One sender takes `await next()`, which stays first in `ready` while it is delivered,
    then `done()`. Several senders instead `await take()` (which also cuts `current` when
    nothing is ready: a free sender sends what waits, `gap` after the previous take at
    the earliest) and `finish()` each chunk, which
    hands back the finished chunks in order: a chunk finished early waits for those taken
    before it. Chunks numbered up to `serial_through` (1 is the first cut) go alone:
    taken only when none is in flight, and nothing is taken while one is
    (`one_at_a_time()`).
    `flush()` waits until everything taken so far is done. `pending` counts the events in
    it, for the owner's bound."""

    def __init__(
        self, new_chunk: Callable[[], C], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.new_chunk = new_chunk
        self.clock = clock
        self.last_take = -math.inf
        self.current = new_chunk()
        self.ready: deque[C] = deque()
        self.taken: deque[list[Any]] = deque()  # [chunk, result or NOT_FINISHED], in order
        self.cuts = 0
        self.takes = 0
        self.serial_through = 0
        self.pending = 0
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()

    def cut(self) -> None:
        if self.current.count:
            self.ready.append(self.current)
            self.current = self.new_chunk()
            self.cuts += 1
            self.wake.set()

    async def next(self) -> C:
        while not self.ready:
            self.idle.set()
            self.wake.clear()
            await self.wake.wait()
        self.idle.clear()
        return self.ready[0]

    def done(self) -> C:
        chunk = self.ready.popleft()
        self.pending -= chunk.count
        return chunk

    async def take(self, gap: float = 0.0) -> C:
        """The next chunk; the one being filled only `gap` seconds after the last take
        (a full or flushed chunk at once), so that a trickle of events is not one write
        each. No timer runs while nothing waits."""
        while (wait := self._wait_before_take(gap)) != 0.0:
            if not self.taken:
                self.idle.set()
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self.wake.wait()
        self.idle.clear()
        if not self.ready:
            self.cut()
        chunk = self.ready.popleft()
        self.takes += 1
        self.last_take = self.clock()
        self.taken.append([chunk, NOT_FINISHED])
        return chunk

    def _wait_before_take(self, gap: float) -> float | None:
        """0.0: take now; else seconds to wait (None: until woken)."""
        first_in_flight = self.takes - len(self.taken) + 1
        if self.taken and first_in_flight <= self.serial_through:
            return None
        if self.ready:
            return 0.0
        if not self.current.count:
            return None
        return max(0.0, self.last_take + gap - self.clock())

    def one_at_a_time(self) -> None:
        """The chunks waiting now, the one being filled included, are taken one at a time."""
        self.serial_through = self.cuts + (1 if self.current.count else 0)

    def finish(self, chunk: C, result: object) -> list[tuple[C, Any]]:
        """Record a taken chunk's result; returns the chunks now finished in order."""
        for entry in self.taken:
            if entry[0] is chunk:
                entry[1] = result
                break
        released: list[tuple[C, Any]] = []
        while self.taken and self.taken[0][1] is not NOT_FINISHED:
            first, outcome = self.taken.popleft()
            self.pending -= first.count
            released.append((first, outcome))
        self.wake.set()  # a slot is free
        if not self.taken and not self.ready:
            self.idle.set()
        return released

    async def flush(self) -> None:
        self.cut()
        while self.ready or self.taken:
            self.idle.clear()
            await self.idle.wait()


NOT_FINISHED = object()
