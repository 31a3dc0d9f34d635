"""The spool's on-disk format: segment files of checksummed, numbered records (issue 12).

A segment starts with a file header `[7s "SFSPOOL"][u8 version][u32 meta length][u32 crc32
of meta][meta: JSON {"destinations": {name: identity}}]`, saying which format it is in and
which destinations (InfluxDB URL and database, broker and topics, ...) its records were
written for. Records follow: `[u32 length][u32 crc32][u64 seq][u32 events][payload]`, the
crc covering length, seq, events and payload, so that a zero-filled tail (power loss) or a
flipped bit in a header never passes for a record. Records of a segment are numbered
`first, first + 1, ...` (`first` is in the file name).

Reading is a scan that never gives up at the first damage: after an unreadable region it
resynchronises on the next offset where a valid record with a plausible sequence number
starts, and the sequence numbers say exactly how many records the damage took. A damaged
tail with no record after it is measured in bytes only: on the newest segment that is also
what a kill in the middle of an append leaves (a record never counted as spooled).

Files are created 0600 and opened without following symbolic links.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

MAGIC = b"SFSPOOL"
VERSION = 1
FILE_HEADER = struct.Struct("<7sBII")  # magic, version, meta length, crc32 of meta
RECORD = struct.Struct("<IIQI")  # length, crc32, seq, events
_CHECKED = struct.Struct("<IQI")  # what the crc covers besides the payload
MAX_META = 1 << 20
_NONZERO = re.compile(rb"[^\x00]")
SAFE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC
PREVIOUS_FORMAT = (
    "holds segments in the format of senseflow before issue 12 (no file header); this "
    "version does not read them: deliver them with the previous version, or move them away"
)


class SpoolFormatError(OSError):
    """A spool this version must not read (older format, or written for other destinations)."""


def record_crc(length: int, seq: int, events: int, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(_CHECKED.pack(length, seq, events)))


def encode_record(seq: int, events: int, payload: bytes) -> bytes:
    length = len(payload)
    return RECORD.pack(length, record_crc(length, seq, events, payload), seq, events) + payload


def encode_file_header(destinations: dict[str, str]) -> bytes:
    meta = json.dumps({"destinations": destinations}, sort_keys=True).encode()
    return FILE_HEADER.pack(MAGIC, VERSION, len(meta), zlib.crc32(meta)) + meta


def open_safely(path: Path, flags: int) -> int:
    """A descriptor for `path`, never through a symbolic link; new files are 0600."""
    return os.open(path, flags | SAFE_FLAGS, 0o600)


def read_file(path: Path) -> bytes:
    fd = open_safely(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as file:
        return file.read()


def write_all(out: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = out.write(view)
        view = view[written or 0 :]


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(slots=True)
class Scan:
    """What one segment holds: its records (seq, offset, events) and its damage."""

    destinations: dict[str, str] | None = None
    """None when the file header is unreadable: then no record is trusted."""
    records: list[tuple[int, int, int]] = field(default_factory=list)
    lost: int = 0
    """Records known to be unreadable: gaps in the numbering between readable ones."""
    damaged_bytes: int = 0
    expected: int = 0
    """The sequence number a record appended after the readable ones would have."""


def scan_segment(data: bytes, first: int) -> Scan:
    """Index a segment's bytes without changing anything (also safe on a live spool)."""
    scan = Scan(expected=first)
    start = _read_file_header(data, scan)
    if scan.destinations is None:
        scan.damaged_bytes = len(data)
        return scan
    view = memoryview(data)
    offset = start
    while offset < len(data):
        found = _record_at(view, offset, scan.expected)
        if found is None:
            resumed = _resync(view, offset + 1, scan.expected)
            end = len(data) if resumed is None else resumed
            scan.damaged_bytes += end - offset
            offset = end
            continue
        length, seq, events = found
        scan.lost += seq - scan.expected
        scan.records.append((seq, offset, events))
        scan.expected = seq + 1
        offset += RECORD.size + length
    return scan


def _read_file_header(data: bytes, scan: Scan) -> int:
    if len(data) < FILE_HEADER.size or data[: len(MAGIC)] != MAGIC:
        if _looks_like_previous_format(data):
            raise SpoolFormatError(errno.EPROTO, PREVIOUS_FORMAT)
        return 0
    version: int
    length: int
    crc: int
    _, version, length, crc = FILE_HEADER.unpack_from(data)
    meta = data[FILE_HEADER.size : FILE_HEADER.size + length]
    if version != VERSION or length > MAX_META or len(meta) < length or zlib.crc32(meta) != crc:
        return 0
    try:
        destinations = json.loads(meta)["destinations"]
    except (ValueError, LookupError, TypeError):
        return 0
    if isinstance(destinations, dict):
        scan.destinations = {str(k): str(v) for k, v in destinations.items()}
    return FILE_HEADER.size + length


def _looks_like_previous_format(data: bytes) -> bool:
    """The format before issue 12: records from byte 0, the crc over the payload only."""
    if len(data) < RECORD.size:
        return False
    length: int
    crc: int
    length, crc, _, _ = RECORD.unpack_from(data)
    payload = data[RECORD.size : RECORD.size + length]
    return len(payload) == length > 0 and zlib.crc32(payload) == crc


def _record_at(view: memoryview, offset: int, expected: int) -> tuple[int, int, int] | None:
    """(length, seq, events) of a valid record at `offset` numbered `expected` or later."""
    if offset + RECORD.size > len(view):
        return None
    length, crc, seq, events = RECORD.unpack_from(view, offset)
    end = offset + RECORD.size + length
    # every record takes at least RECORD.size bytes: a later one cannot be numbered higher
    if end > len(view) or not expected <= seq <= expected + len(view) // RECORD.size:
        return None
    if record_crc(length, seq, events, view[offset + RECORD.size : end]) != crc:
        return None
    return length, seq, events


def _resync(view: memoryview, offset: int, expected: int) -> int | None:
    """The next offset where a valid record starts, skipping runs of zero bytes fast (a
    record's length is never 0, so one of its first 4 bytes is not zero)."""
    raw = view.obj
    assert isinstance(raw, bytes)
    while offset < len(view):
        if raw[offset] == 0:
            nonzero = _NONZERO.search(raw, offset)
            if nonzero is None:
                return None
            offset = max(offset, nonzero.start() - 3)
        if _record_at(view, offset, expected) is not None:
            return offset
        offset += 1
    return None
