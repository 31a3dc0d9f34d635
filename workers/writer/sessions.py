"""The writer's session state: a consumer of the spool with its own cursor (SPEC 3a).

Every spooled batch's session events are applied in spool order, through a reorder buffer
that puts the events of several workers (and readers) back in receive-time order: an event
is applied once an event `REORDER_NS` later has arrived (or at drain), so batches that
overtake each other by less than that change nothing.

The buffer holds runs, not events: one reader's batch is in receive-time order already and
does not interleave with that reader's other batches, so a batch is kept whole, placed
between the runs it falls between, and applied as one list; only batches of several
readers, which do interleave, are merged event by event. A run stays encoded, as the worker
sent it, until its first event is due: decoded just before it is applied, its events are
still in the CPU's caches (decoded on arrival, 2 s earlier, they were not), and the
checkpoint and the live view copy its bytes instead of encoding events
(benchmarks/RESULTS.md, "Live sessions: runs kept encoded").

Crash consistency: the spool is the record. A checkpoint (`sessions.checkpoint` in the
spool directory, written whole and renamed into place) holds the state, the reorder buffer
and the first spool record not in them; only after it is on disk does the spool learn that
the `sessions` consumer is done with the records before it. A writer killed at any instant
is followed by one that loads the checkpoint and replays the records after it, in the same
order through the same code, and so reaches the state the dead one had.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import operator
import os
from collections.abc import Callable
from pathlib import Path

import msgspec

from shared.config import SessionOptions
from shared.events import EncodedBatch, decode_spooled
from shared.sessions import SessionEvent, SessionState
from workers.writer.spool import Spool, SpoolCorrupt

log = logging.getLogger("senseflow.sessions")

CONSUMER = "sessions"
"""The session state's name among the spool's cursors."""
CHECKPOINT_FILE = "sessions.checkpoint"
REORDER_NS = 2 * 10**9


class SessionCheckpoint(msgspec.Struct, array_like=True):
    cursor: int
    """The first spool record whose events are not in `state` nor `waiting`."""
    state: bytes
    waiting: list[SessionEvent]


class _SavedCheckpoint(msgspec.Struct, array_like=True):
    """A `SessionCheckpoint` as written: `waiting` spliced from the runs' bytes."""

    cursor: int
    state: bytes
    waiting: msgspec.Raw


_EVENTS = msgspec.msgpack.Decoder(list[SessionEvent])
_CHECKPOINT = msgspec.msgpack.Decoder(SessionCheckpoint)
_ENCODER = msgspec.msgpack.Encoder()


class SessionKeeper:
    def __init__(
        self, options: SessionOptions, spool: Spool, *, sync: bool, reorder_ns: int = REORDER_NS
    ) -> None:
        self.spool = spool
        self.sync = sync
        self.reorder_ns = reorder_ns
        self.path = Path(spool.directory) / CHECKPOINT_FILE
        self.max_idle_ns = options.max_idle * 10**9
        self.state = SessionState(self.max_idle_ns)
        self.runs: list[Run] = []
        """The reorder buffer: runs in receive-time order, none overlapping the next."""
        self.cursor = spool.cursors[CONSUMER]
        self.saved_cursor = -1
        self.generation = 0
        """Moves with every batch of session events: the publisher writes only then."""
        self._latest_ns = 0
        self.on_added: Callable[[int, bytes], None] | None = None
        """Told of every batch of session events once applied as far as it can be (its
        latest event time, its events as spooled): the live view's publisher."""

    # -- start: checkpoint, then the spool after it -------------------------------------------

    def start(self) -> None:
        self._load()
        replayed = 0
        for seq in range(self.cursor, self.spool.next_seq):
            if seq in self.spool.index and (batch := self._read(seq)) is not None:
                self.add(seq, batch)
                replayed += 1
        self.cursor = self.spool.next_seq
        if replayed:
            log.info("sessions: replayed %d batch(es) from the spool", replayed)

    def _read(self, seq: int) -> EncodedBatch | None:
        """A spooled batch; None when it no longer reads back (the feeds count it
        `dropped.spool_corrupt`: its events are lost to every consumer)."""
        try:
            return decode_spooled(self.spool.read(seq))
        except (SpoolCorrupt, msgspec.DecodeError) as exc:
            log.error("sessions: spool record %d is unreadable (%s); skipped", seq, exc)
            return None

    def _load(self) -> None:
        try:
            saved = _CHECKPOINT.decode(self.path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, msgspec.DecodeError) as exc:
            log.error("sessions: cannot read %s (%s); starting from the spool", self.path, exc)
            return
        if saved.cursor > self.spool.next_seq:  # the spool lost records the state has
            log.warning("sessions: the checkpoint is ahead of the spool; keeping its state")
        elif saved.cursor < self.spool.cursors[CONSUMER]:  # sessions were off meanwhile
            log.warning(
                "sessions: spool records %d-%d are gone; the state misses their events",
                saved.cursor,
                self.spool.cursors[CONSUMER] - 1,
            )
        self.state = SessionState.restore(saved.state, self.max_idle_ns)
        self.runs = [] if not saved.waiting else [_run(sorted(saved.waiting, key=_time))]
        self._latest_ns = self.runs[-1].times[-1] if self.runs else self.state.clock_ns
        self.cursor = min(saved.cursor, self.spool.next_seq)

    # -- events ------------------------------------------------------------------------------

    def add(self, seq: int, batch: EncodedBatch) -> None:
        """Apply spool record `seq` (records before the cursor are already in)."""
        if seq < self.cursor:
            return
        self.cursor = seq + 1
        if not batch.sessions:
            return
        self.generation += 1
        times = batch.received_ns  # the events' own times, one each (workers/pipeline.py)
        if _count(batch.sessions) == len(times) and times == sorted(times):
            run = Run(times, batch.sessions)
        else:  # never from one reader's batch
            run = _run(sorted(_EVENTS.decode(batch.sessions), key=_time))
        self._place(run)
        self._latest_ns = max(self._latest_ns, run.times[-1])
        self._apply_until(self._latest_ns - self.reorder_ns)
        if self.on_added is not None:
            self.on_added(run.times[-1], batch.sessions)

    def _place(self, run: Run) -> None:
        """Into the buffer, in time order. Equal times keep spool order (what is waiting
        goes first), so a replay places exactly alike; a run that interleaves with waiting
        ones (several readers) is merged with them into one."""
        runs = self.runs
        first, last = run.times[0], run.times[-1]
        if not runs or first >= runs[-1].times[-1]:
            runs.append(run)
            return
        # The first waiting run that must follow the new run's first event somewhere.
        start = bisect.bisect_right(runs, first, key=_last)
        if last < runs[start].times[0]:  # fits in the gap before it: the common case
            runs.insert(start, run)
            return
        end = bisect.bisect_right(runs, last, lo=start, key=_first)
        events = [e for waiting in runs[start:end] for e in waiting.decoded()]
        events += run.decoded()
        events.sort(key=_time)  # stable: the waiting events first among equal times
        runs[start:end] = [_run(events)]

    def _apply_until(self, until_ns: int) -> None:
        runs, apply_all = self.runs, self.state.apply_all
        done = 0
        for run in runs:
            if run.times[-1] <= until_ns:
                apply_all(run.decoded())
                done += 1
                continue
            count = bisect.bisect_right(run.times, until_ns)
            if count:
                events = run.decoded()
                apply_all(events[:count])
                run.times, run.events = run.times[count:], events[count:]
            break
        del runs[:done]

    @property
    def waiting(self) -> msgspec.Raw:
        """The events in the reorder buffer, in the order they will be applied: a msgpack
        array of `SessionEvent` arrays, spliced from the runs' bytes (nothing decoded)."""
        count, bodies = 0, []
        for run in self.runs:
            data = run.encoded()
            count += len(run.times)
            bodies.append(memoryview(data)[_header_size(data) :])
        return msgspec.Raw(_array_header(count) + b"".join(bodies))

    @property
    def first_waiting_ns(self) -> int | None:
        """The receive time of the first event in the reorder buffer, if any waits."""
        return self.runs[0].times[0] if self.runs else None

    def waiting_events(self) -> list[SessionEvent]:
        return list(itertools.chain.from_iterable(run.decoded() for run in self.runs))

    def flush(self) -> None:
        """Apply everything waiting (at drain: nothing later can come)."""
        self._apply_until(self._latest_ns)

    # -- checkpoints -----------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Save the state, then let the spool drop what it covers."""
        data = _ENCODER.encode(_SavedCheckpoint(self.cursor, self.state.checkpoint(), self.waiting))
        temporary = self.path.with_suffix(".tmp")
        with open(temporary, "wb") as out:
            out.write(data)
            if self.sync:
                out.flush()
                os.fsync(out.fileno())
        os.replace(temporary, self.path)
        self.saved_cursor = self.cursor
        self._acknowledge()

    @property
    def changed(self) -> bool:
        """Records applied since the last checkpoint."""
        return self.cursor != self.saved_cursor

    def _acknowledge(self) -> None:
        spool = self.spool
        for seq in range(spool.cursors[CONSUMER], self.cursor):
            if seq in spool.index:
                spool.ack(CONSUMER, seq, spool.events_in(seq), 0)
        spool.persist()


class Run:
    """Waiting events in receive-time order, with their times (for bisection): the
    worker's encoded list until they are needed (`decoded`), then the events."""

    __slots__ = ("data", "events", "times")

    def __init__(
        self, times: list[int], data: bytes = b"", events: list[SessionEvent] | None = None
    ) -> None:
        self.times = times
        self.data = data
        self.events = events

    def decoded(self) -> list[SessionEvent]:
        if self.events is None:
            self.events = _EVENTS.decode(self.data)
            self.data = b""
        return self.events

    def encoded(self) -> bytes:
        return _ENCODER.encode(self.events) if self.events is not None else self.data


def _run(events: list[SessionEvent]) -> Run:
    return Run([e.time_ns for e in events], events=events)


def _count(data: bytes) -> int:
    """Elements of the msgpack array `data`, from its header (-1: not an array)."""
    head = data[0]
    if head & 0xF0 == 0x90:
        return head & 0x0F
    if head == 0xDC:
        return int.from_bytes(data[1:3], "big")
    if head == 0xDD:
        return int.from_bytes(data[1:5], "big")
    return -1


def _header_size(data: bytes) -> int:
    head = data[0]
    return 1 if head & 0xF0 == 0x90 else 3 if head == 0xDC else 5


def _array_header(count: int) -> bytes:
    if count < 16:
        return bytes((0x90 | count,))
    if count < 1 << 16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def _first(run: Run) -> int:
    return run.times[0]


def _last(run: Run) -> int:
    return run.times[-1]


_time = operator.attrgetter("time_ns")
