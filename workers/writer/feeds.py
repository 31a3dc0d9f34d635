"""Feeding each destination from the spool, in order, at its own pace.

The writer appends every batch to the spool and wakes the feeds; each feed hands its
sink the next record it has not handed yet (from the in-memory cache when it is recent,
else read back from disk) and the sink acknowledges records once delivered. A slow or
dead destination therefore holds back nobody else: its backlog waits on disk, bounded,
while the others keep up.

Events are counted `written.<destination>` / `failed.<destination>` when the cursor passes
their record, in the same commit that records the cursor in the writer's shared counter
block: a writer killed at any instant has counted exactly the records its successor will
not send again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import msgspec

from shared import counternames as names
from shared.config import Config
from shared.counters import SharedCounters
from shared.events import EncodedBatch, decode_spooled
from workers.writer.destinations import Destination, make_sink
from workers.writer.sinks.base import Ack
from workers.writer.spool import Dropped, Spool, SpoolCorrupt

log = logging.getLogger("senseflow.writer")

CACHE_BATCHES = 256


class BatchCache:
    """Recent batches, decoded, so that feeds keeping up never read the disk."""

    def __init__(self, limit: int = CACHE_BATCHES) -> None:
        self.limit = limit
        self.batches: dict[int, EncodedBatch] = {}

    def put(self, seq: int, batch: EncodedBatch) -> None:
        self.batches[seq] = batch
        while len(self.batches) > self.limit:
            del self.batches[next(iter(self.batches))]

    def forget_before(self, seq: int) -> None:
        for old in [s for s in self.batches if s < seq]:
            del self.batches[old]


Delivered = Callable[[str, Sequence[int]], None]
"""Told the receive times of the events a destination delivered (the latency histogram)."""
TakeNow = Callable[[EncodedBatch, int], bool]
"""A sink's `offer(batch, seq)`: takes the batch if it can without waiting (True)."""


class Feed:
    """One destination's sink, fed from the spool; the sink acknowledges to `acknowledged`."""

    def __init__(
        self,
        destination: Destination,
        config: Config,
        spool: Spool,
        cache: BatchCache,
        counters: SharedCounters,
        delivered: Delivered,
    ) -> None:
        self.name = destination.name
        self.sink = make_sink(destination, config, counters, self.acknowledged)
        self.delivered = delivered
        self.spool = spool
        self.cache = cache
        self.counters = counters
        self.next = spool.cursors[self.name]
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()
        self.handing = False  # run() waits for the sink to take a batch
        self.take_now: TakeNow | None = getattr(self.sink, "offer", None)
        # Records given up while the sink had them: {seq: events}, counted at their ack;
        # their events are in the block's `_limbo.<destination>` until then.
        self.handed_then_dropped: dict[int, int] = {}
        self.written_key = names.written(self.name)
        self.failed_key = names.failed(self.name)
        self.dropped_key = names.destination_full(self.name)
        self.cursor_key = names.cursor(self.name)
        self.limbo_key = names.limbo(self.name)

    def acknowledged(self, acks: list[Ack]) -> None:
        """The sink's one acknowledgement callback: count, move the cursor, and measure
        the delivery latency of what it delivered (one sample set per call: per InfluxDB
        write, MQTT batch, New Relic request, as the batch-size histogram shows them)."""
        self.measure(acks)
        written = failed = limbo = 0
        cursor = None
        for seq, done, rejected, _ in acks:
            passed = self.spool.ack(self.name, seq, done, rejected)
            if passed is not None:
                written, failed = written + passed.written, failed + passed.failed
                cursor = passed.cursor
            elif seq in self.handed_then_dropped:  # behind the cursor, but ours to count
                limbo += self.handed_then_dropped.pop(seq)
                written, failed = written + done, failed + rejected
        if written or failed or cursor is not None:
            adds = {self.written_key: written, self.failed_key: failed, self.limbo_key: -limbo}
            sets = {} if cursor is None else {self.cursor_key: cursor}
            self.counters.commit(adds, sets)
            self.spool.persist()

    def measure(self, acks: list[Ack]) -> None:
        if len(acks) == 1:
            if acks[0].received_ns:
                self.delivered(self.name, acks[0].received_ns)
            return
        received_ns = [ns for ack in acks for ns in ack.received_ns]
        if received_ns:
            self.delivered(self.name, received_ns)

    @property
    def backlog(self) -> int:
        """Records not yet handed to the sink."""
        return max(0, self.spool.next_seq - max(self.next, self.spool.cursors[self.name]))

    @property
    def pending_batches(self) -> int:
        """Records not yet acknowledged by the destination."""
        return sum(1 for _ in self.spool.pending(self.name))

    async def run(self) -> None:
        while True:
            seq = self._next_pending()
            if seq is None:
                self.idle.set()
                self.wake.clear()
                await self.wake.wait()
                continue
            self.idle.clear()
            batch = self.cache.batches.get(seq) or read_batch(self.spool, seq, self.counters)
            self.next = seq + 1
            if batch is None:  # damaged on disk: counted, passed over
                self.acknowledged([Ack(seq, 0, 0)])
                continue
            self.handing = True
            try:
                await self.sink.write_batch(batch, seq)
            finally:
                self.handing = False
            # A backlog (replay, catch-up after an outage) goes over batch by batch: the
            # channel and the other sinks get their turn between two (a batch read back
            # from disk costs a read, a checksum and a decode).
            await asyncio.sleep(0)

    def offer(self, seq: int, batch: EncodedBatch) -> bool:
        """Hand the batch just spooled as `seq` to the sink at once, without a turn of the
        feed's task, if everything before it is handed over and the sink takes it without
        waiting (its `offer`). False: the feed's task hands it over, in order."""
        if self.take_now is None or self.handing:
            return False
        if max(self.next, self.spool.cursors[self.name]) != seq or not self.take_now(batch, seq):
            return False
        self.next = seq + 1
        return True

    def _next_pending(self) -> int | None:
        seq = max(self.next, self.spool.cursors[self.name])
        while seq < self.spool.next_seq:
            if seq in self.spool.index:
                return seq
            seq += 1
        self.next = seq
        return None

    def count_dropped(self, dropped: Dropped, adds: dict[str, int], sets: dict[str, int]) -> int:
        """What the spool gave up for this destination, into one commit: records never
        handed over are dropped, those acknowledged ahead of the cursor written or failed,
        those still with the sink wait for their ack. Returns the events dropped."""
        lost = sum(events for seq, events in dropped.unacked.items() if seq >= self.next)
        handed = {seq: events for seq, events in dropped.unacked.items() if seq < self.next}
        self.handed_then_dropped.update(handed)
        adds[self.dropped_key] = lost
        adds[self.written_key] = dropped.written
        adds[self.failed_key] = dropped.failed
        adds[self.limbo_key] = sum(handed.values())
        sets[self.cursor_key] = dropped.cursor
        self.next = max(self.next, dropped.cursor)
        return lost

    def give_up_handed(self) -> int:
        """At exit: records the spool gave up while the sink held them, and the sink did
        not deliver, are dropped for this destination. Returns their events."""
        lost = sum(self.handed_then_dropped.values())
        if lost:
            self.handed_then_dropped.clear()
            self.counters.commit({self.dropped_key: lost, self.limbo_key: -lost})
        return lost


def read_batch(spool: Spool, seq: int, counters: SharedCounters) -> EncodedBatch | None:
    """A record from disk; None when it no longer reads back, counted `dropped.spool_corrupt`
    (in records) once, whoever finds it, and never handed to anyone."""
    try:
        return decode_spooled(spool.read(seq))
    except (SpoolCorrupt, msgspec.DecodeError) as exc:
        log.error("spool: record %d is unreadable (%s); skipped", seq, exc)
    spool.forget(seq)
    counters.commit({names.DROPPED_SPOOL_CORRUPT: 1})
    return None
