"""What every destination offers the writer: `start`, `write_batch`, `flush`, `close`."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, NamedTuple, Protocol, TypeVar

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
    """Chunks of events waiting for one sender, in order.

    Events go into `current` until the owner `cut()`s it (full, or on its flush timer);
    the sender takes `await next()`, which stays first in `ready` while it is delivered,
    then `done()`; `flush()` waits until everything taken so far is done. `pending`
    counts the events in it, for the owner's bound."""

    def __init__(self, new_chunk: Callable[[], C]) -> None:
        self.new_chunk = new_chunk
        self.current = new_chunk()
        self.ready: deque[C] = deque()
        self.pending = 0
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()

    def cut(self) -> None:
        if self.current.count:
            self.ready.append(self.current)
            self.current = self.new_chunk()
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

    async def flush(self) -> None:
        self.cut()
        while self.ready:
            self.idle.clear()
            await self.idle.wait()
