"""The writer's on-disk spool: every encoded batch is appended here before any destination
sees it, and each destination acknowledges what it delivered (SPEC 4, issue 5).

A directory of append-only segment files holds records `[u32 length][u32 crc32][u64 seq]
[u32 events][payload]`. Each destination has a cursor, the first sequence number it has
not acknowledged; `ack` moves it over contiguous acknowledged records and says what it
passed, so the writer counts an event as written exactly when its record falls behind the
cursor, together with the cursor, in one commit of its shared counter block. A segment is
deleted once every destination has acknowledged all of it.

`cursors.json` keeps the cursors on disk for the next start of the service; it is
rewritten (write + rename) by `sync()`, on the fsync timer, and at close; with the
`always` policy on every move. A writer killed and restarted within a run takes the
cursors from its counter block (exact); after a kill of the whole service, from the file,
so that up to one fsync interval is delivered again: InfluxDB overwrites the identical
point, MQTT QoS 1 is at-least-once anyway.
When the spool outgrows `max_bytes`, the oldest records not yet handed to a destination
are dropped and counted per destination, so memory and disk both stay bounded.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

log = logging.getLogger("senseflow.spool")

HEADER = struct.Struct("<IIQI")  # length, crc32 of the rest, seq, events
SEGMENT_PREFIX = "segment-"
CURSORS = "cursors.json"
FsyncPolicy = Literal["never", "interval", "always"]


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


@dataclass(slots=True)
class Location:
    segment: int  # first seq of the segment file
    offset: int
    events: int


class Spool:
    def __init__(
        self,
        directory: str | Path,
        destinations: list[str],
        max_bytes: int = 1 << 30,
        segment_bytes: int = 64 << 20,
        fsync: FsyncPolicy = "interval",
        known_cursors: dict[str, int] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = self._lock_directory()
        self.destinations = destinations
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.index: dict[int, Location] = {}
        self.segments: dict[int, int] = {}  # first seq -> size in bytes
        self.next_seq = 0
        self._acked: dict[str, dict[int, tuple[int, int]]] = {d: {} for d in destinations}
        self._out: BinaryIO | None = None
        self._out_segment = -1
        self._dirty = False
        self._cursors_dirty = False
        self._moved = False  # cursors moved in memory, not yet persisted
        self._doomed: list[int] = []  # segments given up, their files not yet deleted
        self._recover()
        saved = self._read_cursors()
        for destination, cursor in (known_cursors or {}).items():
            saved[destination] = max(cursor, saved.get(destination, 0))
        # A destination new to this spool starts at its end: no backlog from before it existed.
        self.cursors = {
            d: max(saved.get(d, self.next_seq), self._first_seq()) for d in destinations
        }
        self._write_cursors()
        self._collect()

    # -- writing ----------------------------------------------------------------------------

    def append(self, payload: bytes, events: int) -> int:
        seq = self.next_seq
        body = HEADER.pack(len(payload), zlib.crc32(payload), seq, events) + payload
        out = self._segment_for(len(body))
        offset = out.tell()
        out.write(body)
        out.flush()
        if self.fsync == "always":
            os.fsync(out.fileno())
        self.index[seq] = Location(self._out_segment, offset, events)
        self.segments[self._out_segment] += len(body)
        self.next_seq = seq + 1
        self._dirty = True
        return seq

    def _segment_for(self, size: int) -> BinaryIO:
        if self._out is None or self.segments[self._out_segment] + size > self.segment_bytes:
            if self._out is not None:
                self._out.close()
            self._out_segment = self.next_seq
            self.segments[self._out_segment] = 0
            self._out = open(self._segment_path(self._out_segment), "ab")  # noqa: SIM115
        return self._out

    def sync(self) -> None:
        """fsync what was appended and save the cursors (called on a timer)."""
        if self._out is not None and self._dirty:
            if self.fsync != "never":
                os.fsync(self._out.fileno())
            self._dirty = False
        if self._cursors_dirty:
            self._write_cursors()

    # -- reading ----------------------------------------------------------------------------

    def read(self, seq: int) -> bytes:
        where = self.index[seq]
        with open(self._segment_path(where.segment), "rb") as segment:
            segment.seek(where.offset)
            length, crc, found_seq, _ = HEADER.unpack(segment.read(HEADER.size))
            payload = segment.read(length)
        if found_seq != seq or zlib.crc32(payload) != crc:
            raise OSError(f"spool record {seq} is corrupt")
        return payload

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
        while cursor in acked:
            done, rejected = acked.pop(cursor)
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
        lock = open(self.directory / "lock", "ab")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise OSError(f"{self.directory} is in use by another senseflow writer") from None
        return lock

    def _segment_path(self, first: int) -> Path:
        return self.directory / f"{SEGMENT_PREFIX}{first:020d}.log"

    def _first_seq(self) -> int:
        return min(self.segments, default=self.next_seq)

    def _write_cursors(self) -> None:
        self._cursors_dirty = False
        temporary = self.directory / (CURSORS + ".tmp")
        temporary.write_text(json.dumps(self.cursors), encoding="utf-8")
        os.replace(temporary, self.directory / CURSORS)

    def _read_cursors(self) -> dict[str, int]:
        try:
            saved = json.loads((self.directory / CURSORS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {str(k): int(v) for k, v in saved.items()} if isinstance(saved, dict) else {}

    def _recover(self) -> None:
        """Index the records on disk; a torn record at the end of a segment is cut off."""
        for path in sorted(self.directory.glob(f"{SEGMENT_PREFIX}*.log")):
            first = int(path.stem.removeprefix(SEGMENT_PREFIX))
            size = self._index_segment(path, first)
            self.segments[first] = size
        if self.segments:
            log.info(
                "spool: %d record(s) on disk in %d segment(s)", len(self.index), len(self.segments)
            )

    def _index_segment(self, path: Path, first: int) -> int:
        with open(path, "r+b") as segment:
            offset = 0
            while True:
                header = segment.read(HEADER.size)
                if len(header) < HEADER.size:
                    break
                length, crc, seq, events = HEADER.unpack(header)
                payload = segment.read(length)
                if len(payload) < length or zlib.crc32(payload) != crc:
                    break
                self.index[seq] = Location(first, offset, events)
                self.next_seq = max(self.next_seq, seq + 1)
                offset += HEADER.size + length
            if offset < path.stat().st_size:
                log.warning("spool: cutting a torn record off %s at byte %d", path.name, offset)
                segment.truncate(offset)
        return offset

    def close(self) -> None:
        self.persist()
        if self._out is not None:
            self.sync()
            self._out.close()
            self._out = None
        self._write_cursors()
        self._lock.close()
