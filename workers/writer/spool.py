"""The writer's on-disk spool: every encoded batch is appended here before any destination
sees it, and each destination acknowledges what it delivered (SPEC 4, issue 5).

A directory of append-only segment files (format: workers/writer/segments.py) holds
numbered, checksummed records. Each destination has a cursor, the first sequence number it has
not acknowledged; `ack` moves it over contiguous acknowledged records and says what it
passed, so the writer counts an event as written exactly when its record falls behind the
cursor, together with the cursor, in one commit of its shared counter block. A segment is
deleted once every destination has acknowledged all of it.

`cursors.json` keeps the cursors on disk for the next start of the service; it is
rewritten (write, fsync, rename, fsync of the directory) by `sync()`, on the fsync timer,
and at close; with the `always` policy on every move. When it is missing or unreadable
while segments exist, every destination the segments were written for replays from the
oldest record: delivering twice is harmless, skipping a backlog is not (issue 12).
A writer killed and restarted within a run takes the cursors from its counter block
(exact); after a kill of the whole service, from the file, so that up to one fsync
interval is delivered again: InfluxDB overwrites the identical point, MQTT QoS 1 is
at-least-once anyway.
When the spool outgrows `max_bytes`, the oldest records not yet handed to a destination
are dropped and counted per destination, so memory and disk both stay bounded.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import io
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from workers.writer.segments import (
    RECORD,
    encode_file_header,
    encode_record,
    fsync_directory,
    open_safely,
    record_crc,
    write_all,
)
from workers.writer.spoolcursors import CURSORS, CursorFile
from workers.writer.spooldir import prepare_directory
from workers.writer.spoolrecovery import SEGMENT_PREFIX, Location, Recovery, check_destinations

log = logging.getLogger("senseflow.spool")

FsyncPolicy = Literal["never", "interval", "always"]


class SpoolCorrupt(OSError):
    """A record that no longer reads back as it was written."""


class SpoolWriteError(OSError):
    """An append that did not reach the disk (ENOSPC, EIO...); nothing of it is kept."""


@dataclass(slots=True)
class Passed:
    """What one acknowledgement moved a cursor over."""

    written: int
    failed: int
    cursor: int


@dataclass(slots=True)
class Dropped:
    """What giving up a segment meant for one destination."""

    unacked: dict[int, int]
    """{seq: events} of the records it had not acknowledged."""
    written: int
    failed: int
    """Events of the records it had acknowledged ahead of its cursor."""
    cursor: int


class Spool:
    def __init__(
        self,
        directory: str | Path,
        destinations: list[str],
        max_bytes: int = 1 << 30,
        segment_bytes: int = 64 << 20,
        fsync: FsyncPolicy = "interval",
        known_cursors: dict[str, int] | None = None,
        identities: dict[str, str] | None = None,
        discard_mismatch: bool = False,
    ) -> None:
        """`identities`: what each destination writes to (workers/writer/spooldir.py); a
        backlog written for another refuses to open unless `discard_mismatch`."""
        self.directory = Path(directory)
        prepare_directory(self.directory)
        self._lock = self._lock_directory()
        self.destinations = destinations
        self.identities = identities or {d: "" for d in destinations}
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._acked: dict[str, dict[int, tuple[int, int]]] = {d: {} for d in destinations}
        self._out: io.FileIO | None = None
        self._out_segment = -1
        self._out_header = 0  # bytes of its file header: `segment_bytes` counts records
        self._dirty = False
        self._cursors_dirty = False
        self._cursor_file = CursorFile(self.directory, fsync != "never")
        self.on_change: Callable[[], None] = _unchanged  # told when sync() has work
        self._moved = False  # cursors moved in memory, not yet persisted
        self._doomed: list[int] = []  # segments given up, their files not yet deleted
        try:
            self._open(known_cursors or {}, discard_mismatch)
        except BaseException:
            self._lock.close()
            raise

    def _open(self, known_cursors: dict[str, int], discard_mismatch: bool) -> None:
        recovery = Recovery.of(self.directory)
        self.index = recovery.index
        self.segments = recovery.segments  # first seq -> size in bytes
        self.next_seq = recovery.next_seq
        self.cursors = self._start_cursors(recovery, known_cursors)
        self.next_seq = max(self.next_seq, *self.cursors.values(), 0)
        self.corrupt_records = self._count_missing()
        self.discarded = check_destinations(self, recovery.written_for, discard_mismatch)
        self._write_cursors()
        self._collect()

    def _start_cursors(self, recovery: Recovery, known: dict[str, int]) -> dict[str, int]:
        saved = self._read_cursors()
        if saved is None and self.segments:
            log.warning(
                "spool: %s is missing or unreadable while %d record(s) are on disk: every "
                "destination they were written for replays them from the oldest",
                self.directory / CURSORS,
                len(self.index),
            )
            recorded = {d for written in recovery.written_for.values() for d in written}
            saved = dict.fromkeys(recorded, self._first_seq())
        saved = saved or {}
        for destination, cursor in known.items():
            saved[destination] = max(cursor, saved.get(destination, 0))
        # A destination new to this spool starts at its end: no backlog from before it existed.
        first = self._first_seq()
        return {d: max(saved.get(d, self.next_seq), first) for d in self.destinations}

    def _count_missing(self) -> int:
        """Records some destination still needed that no longer read back (damage)."""
        low = max(self._first_seq(), min(self.cursors.values(), default=self.next_seq))
        missing = sum(1 for seq in range(low, self.next_seq) if seq not in self.index)
        if missing:
            log.error("spool: %d record(s) were damaged on disk and are lost", missing)
        return missing

    # -- writing ----------------------------------------------------------------------------

    def append(self, payload: bytes, events: int) -> int:
        """Raises SpoolWriteError (disk full...) with nothing of the record kept."""
        seq = self.next_seq
        body = encode_record(seq, events, payload)
        out = self._segment_for(len(body))
        offset = self.segments[self._out_segment]
        try:
            write_all(out, body)
            if self.fsync == "always":
                os.fsync(out.fileno())
        except OSError as exc:
            self._cut_back(out, offset)
            raise SpoolWriteError(exc.errno, f"{self.directory}: {exc.strerror}") from exc
        self.index[seq] = Location(self._out_segment, offset, events)
        self.segments[self._out_segment] += len(body)
        self.next_seq = seq + 1
        self._dirty = True
        self.on_change()
        return seq

    def _cut_back(self, out: io.FileIO, offset: int) -> None:
        try:
            os.ftruncate(out.fileno(), offset)
        except OSError:  # left as a damaged tail, skipped when read; append elsewhere
            out.close()
            self._out = None

    def _segment_for(self, size: int) -> io.FileIO:
        records = self.segments.get(self._out_segment, 0) - self._out_header
        if self._out is None or records + size > self.segment_bytes:
            if self._out is not None:
                self._out.close()
                self._out = None
            header = encode_file_header(self.identities)
            self._out = self._create_segment(self._segment_path(self.next_seq), header)
            self._out_segment = self.next_seq
            self.segments[self._out_segment] = len(header)
            self._out_header = len(header)
        return self._out

    def _create_segment(self, path: Path, header: bytes) -> io.FileIO:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        try:
            out = os.fdopen(open_safely(path, flags), "ab", buffering=0)
        except OSError as exc:
            raise SpoolWriteError(exc.errno, f"{path}: {exc.strerror}") from exc
        try:
            write_all(out, header)
            if self.fsync != "never":
                os.fsync(out.fileno())
                fsync_directory(self.directory)
        except OSError as exc:
            out.close()
            path.unlink(missing_ok=True)
            raise SpoolWriteError(exc.errno, f"{path}: {exc.strerror}") from exc
        return out

    def sync(self) -> None:
        """fsync what was appended and save the cursors."""
        job = self.sync_job()
        if job is not None:
            job()

    def sync_job(self) -> Callable[[], None] | None:
        """What `sync()` does, to be run in another thread (workers/writer/spoolsync.py) so
        that a slow disk holds up no delivery: fsync a duplicate of the segment's
        descriptor (a rotation may close it meanwhile) and save the cursors as they are
        now. None when there is nothing to do."""
        fd = -1
        if self._out is not None and self._dirty:
            self._dirty = False
            if self.fsync != "never":
                fd = os.dup(self._out.fileno())
        snapshot = None
        if self._cursors_dirty:
            self._cursors_dirty = False
            snapshot = self._cursor_file.snapshot(self.cursors)
        if fd < 0 and snapshot is None:
            return None
        return functools.partial(self._sync_files, fd, snapshot)

    def _sync_files(self, fd: int, snapshot: tuple[int, bytes] | None) -> None:
        if fd >= 0:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if snapshot is not None:
            self._cursor_file.save(snapshot)

    # -- reading ----------------------------------------------------------------------------

    def read(self, seq: int) -> bytes:
        """The record's payload; SpoolCorrupt when it no longer reads back as written."""
        where = self.index[seq]
        try:
            fd = open_safely(self._segment_path(where.segment), os.O_RDONLY)
        except FileNotFoundError as exc:
            raise SpoolCorrupt(exc.errno, f"spool record {seq}: its segment is gone") from exc
        with os.fdopen(fd, "rb") as segment:
            segment.seek(where.offset)
            header = segment.read(RECORD.size)
            payload = segment.read(RECORD.unpack(header)[0]) if len(header) == RECORD.size else b""
        if len(header) < RECORD.size:
            raise SpoolCorrupt(errno.EIO, f"spool record {seq} is cut short")
        length, crc, found_seq, events = RECORD.unpack(header)
        if (
            found_seq != seq
            or len(payload) != length
            or record_crc(length, seq, events, payload) != crc
        ):
            raise SpoolCorrupt(errno.EIO, f"spool record {seq} is corrupt")
        return payload

    def forget(self, seq: int) -> None:
        """A record found corrupt: no destination will be handed it again."""
        self.index.pop(seq, None)

    def events_in(self, seq: int) -> int:
        return self.index[seq].events

    def pending(self, destination: str) -> Iterator[int]:
        """Sequence numbers this destination has not acknowledged, oldest first."""
        return (s for s in range(self.cursors[destination], self.next_seq) if s in self.index)

    # -- acknowledging and bounding ---------------------------------------------------------

    def ack(self, destination: str, seq: int, written: int, failed: int) -> Passed | None:
        """Record that `destination` delivered record `seq` (`written` events, `failed`
        rejected). Returns what the cursor passed because of it, None if it did not move;
        an `seq` behind the cursor (given up on when the spool was full) is ignored.
        Changes memory only: count what it returns, then call `persist()`."""
        cursor = self.cursors[destination]
        if seq < cursor:
            return None
        acked = self._acked[destination]
        acked[seq] = (written, failed)
        if seq != cursor:
            return None
        passed = Passed(0, 0, cursor)
        while cursor in acked or self._lost(cursor):
            done, rejected = acked.pop(cursor, (0, 0))
            passed.written += done
            passed.failed += rejected
            cursor += 1
        passed.cursor = cursor
        self.cursors[destination] = cursor
        self._moved = True
        return passed

    def persist(self) -> None:
        """Once the caller has counted what `ack` or `drop_oldest_segment` returned (and
        only then, so that a kill in between cannot skip uncounted records): delete the
        segments nobody needs any more and save the moved cursors."""
        for first in self._doomed:
            self._segment_path(first).unlink(missing_ok=True)
        self._doomed.clear()
        if self._moved:
            self._moved = False
            self._collect()
            if self.fsync == "always":
                self._write_cursors()
            else:
                self._cursors_dirty = True
                self.on_change()

    def _lost(self, seq: int) -> bool:
        """A record damaged on disk: cursors pass over it."""
        return seq < self.next_seq and seq not in self.index

    def size_bytes(self) -> int:
        return sum(self.segments.values())

    def drop_oldest_segment(self) -> dict[str, Dropped]:
        """Give up the oldest segment to respect `max_bytes`: what it means per destination.

        Records a destination had acknowledged out of order count as delivered; the caller
        counts the others, never handed over, as dropped, and those handed over when the
        destination acknowledges them. Memory only: count, then call `persist()`.
        """
        if len(self.segments) <= 1:
            return {}
        first, following = sorted(self.segments)[:2]
        dropped = {}
        for destination in self.destinations:
            cursor = self.cursors[destination]
            acked = self._acked[destination]
            outcome = Dropped({}, 0, 0, max(cursor, following))
            for seq in range(max(first, cursor), following):
                if seq in acked:
                    done, rejected = acked.pop(seq)
                    outcome.written += done
                    outcome.failed += rejected
                elif seq in self.index:
                    outcome.unacked[seq] = self.index[seq].events
            while outcome.cursor in acked:  # acknowledged ahead of the old cursor: passed too
                done, rejected = acked.pop(outcome.cursor)
                outcome.written += done
                outcome.failed += rejected
                outcome.cursor += 1
            dropped[destination] = outcome
            self.cursors[destination] = outcome.cursor
        self._moved = True
        self._forget_segment(first, following)
        self._doomed.append(first)
        return dropped

    def over_limit(self) -> bool:
        return self.size_bytes() > self.max_bytes

    def _collect(self) -> None:
        """Delete segments every destination has acknowledged completely."""
        low = min(self.cursors.values(), default=self.next_seq)
        firsts = sorted(self.segments)
        for first, following in itertools.pairwise(firsts):
            if following > low:
                break
            self._delete_segment(first, following)

    def _delete_segment(self, first: int, following: int) -> None:
        self._forget_segment(first, following)
        self._segment_path(first).unlink(missing_ok=True)

    def _forget_segment(self, first: int, following: int) -> None:
        for seq in range(first, following):
            self.index.pop(seq, None)
        del self.segments[first]

    # -- persistence ------------------------------------------------------------------------

    def _lock_directory(self) -> BinaryIO:
        """One writer per spool: a second service on the same directory would replay and
        acknowledge the first one's records. The kernel releases the lock when we die."""
        fd = open_safely(self.directory / "lock", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        lock = os.fdopen(fd, "ab")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise OSError(
                f"{self.directory} is in use by another senseflow writer (another service "
                "with the same destinations? give each its own senseflow.spool.directory)"
            ) from None
        return lock

    def _segment_path(self, first: int) -> Path:
        return self.directory / f"{SEGMENT_PREFIX}{first:020d}.log"

    def _first_seq(self) -> int:
        return min(self.segments, default=self.next_seq)

    def _write_cursors(self) -> None:
        self._cursors_dirty = False
        self._cursor_file.save(self._cursor_file.snapshot(self.cursors))

    def _read_cursors(self) -> dict[str, int] | None:
        return self._cursor_file.read()

    def close(self) -> None:
        self.persist()
        if self._out is not None:
            self.sync()
            self._out.close()
            self._out = None
        self._write_cursors()
        self._lock.close()


def _unchanged() -> None:
    """The default `Spool.on_change`: nobody to tell."""
