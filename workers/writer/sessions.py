"""The writer's session state: a consumer of the spool with its own cursor (SPEC 3a).

Every spooled batch's session events are applied in spool order, through a reorder buffer
that puts the events of several workers (and readers) back in receive-time order: an event
is applied once an event `REORDER_NS` later has arrived (or at drain), so batches that
overtake each other by less than that change nothing.

Crash consistency: the spool is the record. A checkpoint (`sessions.checkpoint` in the
spool directory, written whole and renamed into place) holds the state, the reorder buffer
and the first spool record not in them; only after it is on disk does the spool learn that
the `sessions` consumer is done with the records before it. A writer killed at any instant
is followed by one that loads the checkpoint and replays the records after it, in the same
order through the same code, and so reaches the state the dead one had.
"""

from __future__ import annotations

import bisect
import heapq
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
        self.waiting: list[SessionEvent] = []
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
        self.waiting = saved.waiting
        self._latest_ns = max((e.time_ns for e in self.waiting), default=self.state.clock_ns)
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
        events = _EVENTS.decode(batch.sessions)
        events.sort(key=_time)  # one reader's batch: sorted already, so linear
        self._merge(events)
        self._latest_ns = max(self._latest_ns, events[-1].time_ns)
        self._apply_until(self._latest_ns - self.reorder_ns)
        if self.on_added is not None:
            self.on_added(events[-1].time_ns, batch.sessions)

    def _merge(self, events: list[SessionEvent]) -> None:
        """Into the waiting events, in time order; only the overlap is touched, and equal
        times keep spool order, so a replay merges exactly alike."""
        waiting = self.waiting
        if not waiting or events[0].time_ns >= waiting[-1].time_ns:
            waiting.extend(events)
            return
        start = bisect.bisect_right(waiting, events[0].time_ns, key=_time)
        overlap = waiting[start:]
        del waiting[start:]
        waiting.extend(heapq.merge(overlap, events, key=_time))

    def _apply_until(self, until_ns: int) -> None:
        waiting = self.waiting
        count = bisect.bisect_right(waiting, until_ns, key=_time)  # waiting is in time order
        if count:
            self.state.apply_all(itertools.islice(waiting, count))
            del waiting[:count]

    def flush(self) -> None:
        """Apply everything waiting (at drain: nothing later can come)."""
        self._apply_until(self._latest_ns)

    # -- checkpoints -----------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Save the state, then let the spool drop what it covers."""
        data = _ENCODER.encode(
            SessionCheckpoint(self.cursor, self.state.checkpoint(), self.waiting)
        )
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


_time = operator.attrgetter("time_ns")
