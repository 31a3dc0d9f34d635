"""The spool survives power loss and damage, never replays into another destination, and
keeps its user data private (issue 12, section 2)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import signal
import stat
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.counters import SharedCounters, new_block
from workers.writer.feeds import read_batch
from workers.writer.segments import FILE_HEADER, RECORD, SpoolFormatError
from workers.writer.spool import Spool, SpoolWriteError
from workers.writer.spooldir import SpoolDirectoryError

DESTINATIONS = ["influxdb", "mqtt"]
PAYLOAD = 100
RECORD_BYTES = RECORD.size + PAYLOAD


def fill(spool: Spool, count: int) -> list[bytes]:
    payloads = [bytes([65 + i % 26]) * PAYLOAD for i in range(count)]
    for payload in payloads:
        spool.append(payload, events=3)
    return payloads


def abandon(spool: Spool) -> None:
    """As after SIGKILL or power loss: no close(); the kernel drops the lock."""
    if spool._out is not None:
        spool._out.close()
    spool._lock.close()


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("segment-*.log"))


# -- cursors -------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["empty", "missing", "garbage"])
def test_lost_cursors_replay_the_backlog_from_the_oldest_record(
    tmp_path: Path, damage: str
) -> None:
    spool = Spool(tmp_path, DESTINATIONS, segment_bytes=2 * RECORD_BYTES)
    payloads = fill(spool, 5)
    spool.sync()
    abandon(spool)
    cursors = tmp_path / "cursors.json"
    if damage == "missing":
        cursors.unlink()
    else:
        cursors.write_bytes(b"" if damage == "empty" else b"{\x00\x00")
    segments = segment_files(tmp_path)

    again = Spool(tmp_path, DESTINATIONS, segment_bytes=2 * RECORD_BYTES)
    for destination in DESTINATIONS:
        assert [again.read(seq) for seq in again.pending(destination)] == payloads
    assert segment_files(tmp_path) == segments  # nothing deleted
    again.close()


def test_cursors_are_fsynced_with_their_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    spool = Spool(tmp_path, DESTINATIONS)
    fill(spool, 2)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    spool.ack("influxdb", 0, 3, 0)
    spool.persist()
    spool.sync()
    monkeypatch.undo()
    assert str(tmp_path / "cursors.json.tmp") in synced
    assert str(tmp_path) in synced  # the rename reached the disk too
    spool.close()


# -- records -------------------------------------------------------------------------------


def test_zero_filled_tail_is_no_record(tmp_path: Path) -> None:
    spool = Spool(tmp_path, DESTINATIONS)
    payloads = fill(spool, 3)
    abandon(spool)
    (segment,) = segment_files(tmp_path)
    with segment.open("ab") as file:
        file.write(bytes(4096))  # power loss: the file grew, its data never arrived

    again = Spool(tmp_path, DESTINATIONS)
    assert [again.read(seq) for seq in again.pending("influxdb")] == payloads
    assert again.corrupt_records == 0
    assert again.append(b"next", 1) == 3
    again.close()


def test_a_damaged_record_mid_segment_is_skipped_and_counted_the_rest_is_kept(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path, DESTINATIONS)
    payloads = fill(spool, 10)
    abandon(spool)
    (segment,) = segment_files(tmp_path)
    data = bytearray(segment.read_bytes())
    start = len(data) - 10 * RECORD_BYTES
    data[start + 3 * RECORD_BYTES + RECORD.size + 7] ^= 0xFF  # record 3's payload
    segment.write_bytes(bytes(data))

    again = Spool(tmp_path, DESTINATIONS)
    assert list(again.pending("mqtt")) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert [again.read(s) for s in again.pending("mqtt")] == payloads[:3] + payloads[4:]
    assert again.corrupt_records == 1
    for seq in (0, 1, 2, 4, 5, 6, 7, 8):
        again.ack("mqtt", seq, 3, 0)
    assert again.cursors["mqtt"] == 9  # passed over the lost record
    again.close()


def test_a_damaged_header_field_is_caught_by_the_checksum(tmp_path: Path) -> None:
    spool = Spool(tmp_path, DESTINATIONS)
    fill(spool, 4)
    abandon(spool)
    (segment,) = segment_files(tmp_path)
    data = bytearray(segment.read_bytes())
    events_field = len(data) - 4 * RECORD_BYTES + 2 * RECORD_BYTES + 16  # record 2's events
    data[events_field] = 200
    segment.write_bytes(bytes(data))

    again = Spool(tmp_path, DESTINATIONS)
    assert list(again.pending("influxdb")) == [0, 1, 3]
    assert [again.events_in(s) for s in again.pending("influxdb")] == [3, 3, 3]
    again.close()


def test_a_record_damaged_after_start_is_counted_and_skipped_not_fatal(tmp_path: Path) -> None:
    spool = Spool(tmp_path, DESTINATIONS)
    fill(spool, 3)
    spool.sync()
    (segment,) = segment_files(tmp_path)
    with segment.open("r+b") as file:
        file.seek(segment.stat().st_size - 2 * RECORD_BYTES + RECORD.size + 10)
        file.write(b"\xff")
    counters = SharedCounters(new_block(multiprocessing.get_context("spawn")))

    assert read_batch(spool, 1, counters) is None
    assert counters.visible() == {"dropped.spool_corrupt": 1}
    assert list(spool.pending("influxdb")) == [0, 2]
    spool.close()


def test_every_segment_says_its_format_and_old_ones_are_refused_clearly(tmp_path: Path) -> None:
    spool = Spool(tmp_path, DESTINATIONS)
    fill(spool, 1)
    spool.close()
    (segment,) = segment_files(tmp_path)
    magic, version, _, _ = FILE_HEADER.unpack_from(segment.read_bytes())
    assert (magic, version) == (b"SFSPOOL", 1)

    old = tmp_path / "old"
    old.mkdir(mode=0o700)
    payload = b"x" * 50  # the format before issue 12: no file header, crc of the payload only
    record = struct.pack("<IIQI", len(payload), zlib.crc32(payload), 0, 3) + payload
    (old / "segment-00000000000000000000.log").write_bytes(record)
    with pytest.raises(SpoolFormatError, match="format of senseflow before issue 12"):
        Spool(old, DESTINATIONS)


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past `limit` bytes fail (EFBIG, as ENOSPC would) for this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_failed_append_keeps_nothing_of_the_record_and_the_next_one_works(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path, DESTINATIONS)
    payloads = fill(spool, 2)
    (segment,) = segment_files(tmp_path)
    size = segment.stat().st_size
    with file_size_limit(size + RECORD_BYTES // 2), pytest.raises(SpoolWriteError):
        spool.append(b"y" * PAYLOAD, 3)  # half of it would fit: cut back
    assert segment.stat().st_size == size
    assert spool.append(b"z" * PAYLOAD, 3) == 2  # space again
    spool.close()

    again = Spool(tmp_path, DESTINATIONS)
    assert [again.read(s) for s in again.pending("mqtt")] == [*payloads, b"z" * PAYLOAD]
    assert again.corrupt_records == 0
    again.close()


# -- destinations --------------------------------------------------------------------------

FIRST = {"influxdb": "http://127.0.0.1:8086 v1 db=senseops rp=10d", "mqtt": "mqtt://a:1883"}


def test_a_backlog_for_another_destination_is_refused_with_a_way_out(tmp_path: Path) -> None:
    spool = Spool(tmp_path, DESTINATIONS, identities=FIRST)
    fill(spool, 4)
    spool.close()
    moved = FIRST | {"influxdb": "http://127.0.0.1:8086 v1 db=other rp=10d"}

    with pytest.raises(SpoolFormatError, match="--spool-discard-mismatch") as refusal:
        Spool(tmp_path, DESTINATIONS, identities=moved)
    assert "db=senseops" in str(refusal.value) and "4 record(s)" in str(refusal.value)

    again = Spool(tmp_path, DESTINATIONS, identities=moved, discard_mismatch=True)
    assert list(again.pending("influxdb")) == []
    assert list(again.pending("mqtt")) == [0, 1, 2, 3]  # unchanged: still replayed
    assert again.discarded == {"influxdb": 12}
    again.close()


# -- privacy -------------------------------------------------------------------------------


def test_spool_directory_is_private_and_its_files_too(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = Spool(directory, DESTINATIONS)
    fill(spool, 2)
    spool.close()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_link_planted_in_the_spool_is_not_followed(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = Spool(directory, DESTINATIONS)
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (directory / "cursors.json.tmp").symlink_to(victim)
    spool.ack("mqtt", 0, 0, 0)
    spool.close()
    assert victim.read_text() == "keep me"
    assert not (directory / "cursors.json").is_symlink()


def test_a_spool_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory away")
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o700)
    os.chown(directory, 65534, 65534)
    with pytest.raises(SpoolDirectoryError, match="belongs to uid 65534"):
        Spool(directory, DESTINATIONS)
