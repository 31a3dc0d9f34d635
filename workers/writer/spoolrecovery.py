"""Indexing a spool directory at start: what each segment holds, what was damaged.

Nothing readable is ever cut off: a segment's damaged regions are skipped by the scan
(workers/writer/segments.py) and the file is left as it is, since new records always go to
a new segment. A segment with no readable record is renamed `*.damaged` (kept for a look,
out of the way of the segment that may take its name); one holding only its header, or
nothing (created just before a kill), is deleted.
"""

from __future__ import annotations

import errno
import logging
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from workers.writer.segments import SpoolFormatError, read_file, scan_segment

if TYPE_CHECKING:
    from workers.writer.spool import Spool

log = logging.getLogger("senseflow.spool")

SEGMENT_PREFIX = "segment-"


@dataclass(slots=True)
class Location:
    segment: int  # first seq of the segment file
    offset: int
    events: int


@dataclass
class Recovery:
    index: dict[int, Location] = field(default_factory=dict)
    segments: dict[int, int] = field(default_factory=dict)
    """first seq -> bytes on disk"""
    written_for: dict[int, dict[str, str]] = field(default_factory=dict)
    """first seq -> {destination: identity} the segment's records were written for"""
    next_seq: int = 0

    @classmethod
    def of(cls, directory: Path) -> Recovery:
        recovery = cls()
        for path in sorted(directory.glob(f"{SEGMENT_PREFIX}*.log")):
            recovery.add(path)
        if recovery.segments:
            log.info(
                "spool: %d record(s) on disk in %d segment(s)",
                len(recovery.index),
                len(recovery.segments),
            )
        return recovery

    def add(self, path: Path) -> None:
        try:
            first = int(path.stem.removeprefix(SEGMENT_PREFIX))
        except ValueError:
            log.warning("spool: %s is not a segment name; ignored", path)
            return
        if not stat.S_ISREG(path.lstat().st_mode):
            log.warning("spool: %s is not a regular file (a symbolic link?); ignored", path)
            return
        data = read_file(path)
        try:
            scan = scan_segment(data, first)
        except SpoolFormatError as exc:
            raise SpoolFormatError(exc.errno, f"{path.parent}: {exc.strerror}") from None
        if scan.destinations is None or not scan.records:
            self.set_aside(
                path, len(data), empty=scan.destinations is not None and not scan.damaged_bytes
            )
            return
        if scan.damaged_bytes:
            log.error(
                "spool: %s: skipped %d damaged byte(s); %d record(s) between readable ones "
                "were lost",
                path.name,
                scan.damaged_bytes,
                scan.lost,
            )
        self.segments[first] = len(data)
        self.written_for[first] = scan.destinations
        for seq, offset, events in scan.records:
            self.index[seq] = Location(first, offset, events)
        self.next_seq = max(self.next_seq, scan.expected)

    @staticmethod
    def set_aside(path: Path, size: int, empty: bool) -> None:
        if size == 0 or empty:
            path.unlink()
            return
        damaged = path.with_suffix(".damaged")
        path.replace(damaged)
        log.error("spool: %s has no readable record (%d bytes); moved to %s", path, size, damaged)


def check_destinations(
    spool: Spool, written_for: dict[int, dict[str, str]], discard: bool
) -> dict[str, int]:
    """Refuse to replay records into a destination other than the one they were written
    for (issue 12); with `discard`, skip them for it. Returns {destination: events skipped}."""
    discarded = {}
    for name in spool.destinations:
        mine = spool.identities[name]
        stale = {f: w[name] for f, w in written_for.items() if w.get(name, mine) not in (mine, "")}
        records = [seq for seq in spool.pending(name) if spool.index[seq].segment in stale]
        if not records:
            continue
        events = sum(spool.events_in(seq) for seq in records)
        what = (
            f"{spool.directory} holds {len(records)} record(s) ({events} event(s)) written for "
            f"{name} at {sorted(set(stale.values()))[0]!r}, not at {mine!r}"
        )
        if not discard:
            raise SpoolFormatError(
                errno.EEXIST,
                f"{what}: refusing to replay them into another destination. Deliver them "
                "with the previous configuration, or start once with --spool-discard-mismatch "
                f"(senseflow.spool.discardMismatch: true) to skip them for {name}",
            )
        log.warning("%s: skipped for %s (discardMismatch)", what, name)
        spool.cursors[name] = spool.next_seq
        discarded[name] = events
    return discarded
