"""The writer's side of the live view: publish the session state when it moved.

At most every `PUBLISH_SECONDS` (the live view must follow an event within 2 s), and never
while nothing changed (an idle service writes nothing). A publish appends what changed
since the last one to `sessions.delta` (shared/sessiondelta.py): its cost follows the
events, not the users held. The whole state (`sessions.live`, shared/sessionlive.py) is
written at start, when the deltas could not say what changed (more ends than the state
keeps between two publishes, a failed write), and when the deltas since the last snapshot
outweigh it (`COMPACT_FACTOR`, at least `COMPACT_MIN_BYTES`): then after that delta, under
the same number, and a new delta file follows it, so a reader that follows the deltas goes
on without reading the snapshot. The pause after a publish is at least `COST_FACTOR` times
what it cost: the publisher never takes more than about a tenth of the writer's time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import msgspec

from shared.logs import RateLimitedLog
from shared.sessiondelta import (
    DELTA_FILE,
    NOTHING_WAITS,
    Batch,
    DeltaHeader,
    LiveDelta,
    changed_entries,
    frame,
)
from shared.sessionlive import LIVE_FILE, encode_live, write_atomically
from shared.sessions import Ended
from workers.writer.sessions import SessionKeeper

log = logging.getLogger("senseflow.sessions")

PUBLISH_SECONDS = 0.5
COST_FACTOR = 10
COMPACT_FACTOR = 2
COMPACT_MIN_BYTES = 8 << 20


class SessionPublisher:
    def __init__(self, keeper: SessionKeeper, compact_min_bytes: int = COMPACT_MIN_BYTES) -> None:
        self.keeper = keeper
        self.path = Path(keeper.spool.directory) / LIVE_FILE
        self.delta_path = self.path.with_name(DELTA_FILE)
        self.compact_min_bytes = compact_min_bytes
        self.epoch = time.time_ns()
        self.seq = 0
        self.log_fd: int | None = None
        """None until the first snapshot, and after a failed write: a snapshot is next."""
        self.log_bytes = self.snapshot_bytes = 0
        self.since_clock_ns = 0
        self.ends: list[Ended] = []
        self.ended_cursor = keeper.state.ended_seq
        self.ends_lost = False
        self.batches: list[Batch] = []
        self.published = -1
        self.snapshots = 0
        self.pause = PUBLISH_SECONDS
        self.failures = RateLimitedLog(log, interval=60.0)
        keeper.on_added = self.added

    def added(self, latest_ns: int, events: bytes) -> None:
        """The keeper took a batch of session events (and applied what it could)."""
        self.batches.append(Batch(latest_ns, msgspec.Raw(events)))
        self._collect_ends()

    def _collect_ends(self) -> None:
        """The ends numbered since, before the state trims its list of them."""
        state = self.keeper.state
        new = state.ended_seq - self.ended_cursor
        if not new:
            return
        if new > len(state.ended) or state.ended[-new].seq != self.ended_cursor:
            self.ends_lost = True  # the removals are not known: a snapshot says them
        else:
            self.ends.extend(state.ended[-new:])
        self.ended_cursor = state.ended_seq

    def publish(self) -> bool:
        """Publish if the state changed since the last publish; True when written."""
        keeper = self.keeper
        if keeper.generation == self.published and self.log_fd is not None:
            return False
        started = time.perf_counter()
        generation = keeper.generation
        self._collect_ends()
        now = time.time_ns()
        try:
            if self.log_fd is None or self.ends_lost:
                self._snapshot(now)
            else:
                self._append(now)
                if self.log_bytes > max(
                    self.compact_min_bytes, COMPACT_FACTOR * self.snapshot_bytes
                ):
                    self._snapshot(now, after_delta=True)
        except OSError as exc:  # the HTTP view goes stale; the state itself is unharmed
            self.failures.warning("sessions: cannot publish %s: %s", self.path, exc)
            self._close_log()
            return False
        self.published = generation
        self.pause = max(PUBLISH_SECONDS, COST_FACTOR * (time.perf_counter() - started))
        return True

    def _append(self, now_ns: int) -> None:
        assert self.log_fd is not None
        state, first_waiting_ns = self.keeper.state, self.keeper.first_waiting_ns
        self.seq += 1
        delta = LiveDelta(
            self.seq,
            now_ns,
            state.clock_ns,
            dict(state.counters),
            self.ends,
            state.ended_seq,
            changed_entries(state, self.since_clock_ns),
            self.batches,
            NOTHING_WAITS if first_waiting_ns is None else first_waiting_ns,
        )
        data = frame(delta)
        if os.write(self.log_fd, data) != len(data):
            raise OSError(f"short write to {self.delta_path}")
        self.log_bytes += len(data)
        self._published_so_far()

    def _snapshot(self, now_ns: int, *, after_delta: bool = False) -> None:
        """The whole state, then a new delta file after it. `after_delta`: under the
        number of the delta just appended (the same state), so readers go on."""
        if not after_delta:
            self.seq += 1
        data = encode_live(self.keeper.state, self.keeper.waiting, now_ns, self.epoch, self.seq)
        write_atomically(self.path, data)
        header = frame(DeltaHeader(self.epoch, self.seq))
        write_atomically(self.delta_path, header)
        self._close_log()
        flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW
        self.log_fd = os.open(self.delta_path, flags)
        self.log_bytes, self.snapshot_bytes = len(header), len(data)
        self.snapshots += 1
        self.ends_lost = False
        self._published_so_far()

    def _published_so_far(self) -> None:
        self.since_clock_ns = self.keeper.state.clock_ns
        self.ends, self.batches = [], []

    def _close_log(self) -> None:
        if self.log_fd is not None:
            os.close(self.log_fd)
            self.log_fd = None

    def close(self) -> None:
        self._close_log()

    async def run(self) -> None:
        try:
            while True:
                self.publish()
                await asyncio.sleep(self.pause)
        finally:
            self._close_log()
