"""The writer's spool: append, acknowledge per destination, recover after a kill, bound."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.writer.spool import Spool

DESTINATIONS = ["influxdb", "mqtt"]


def fill(spool: Spool, count: int, size: int = 100) -> list[bytes]:
    payloads = [bytes([i % 256]) * size for i in range(count)]
    for payload in payloads:
        spool.append(payload, events=3)
    return payloads


def acknowledge(spool: Spool, destination: str, seq: int) -> None:
    """As the writer's feed does: ack, count what passed (here: nothing to count), persist."""
    spool.ack(destination, seq, 3, 0)
    spool.persist()


def test_records_read_back_exactly(tmp_path: Path) -> None:
    spool = Spool(tmp_path, DESTINATIONS, segment_bytes=1000)
    payloads = fill(spool, 30)
    assert [spool.read(seq) for seq in range(30)] == payloads
    assert list(spool.pending("influxdb")) == list(range(30))
    assert spool.events_in(7) == 3
    spool.close()


def test_cursor_moves_only_over_contiguous_acks(tmp_path: Path) -> None:
    spool = Spool(tmp_path, DESTINATIONS)
    fill(spool, 5)
    acknowledge(spool, "mqtt", 2)
    spool.ack("mqtt", 0, 3, 0)
    assert spool.cursors["mqtt"] == 1
    acknowledge(spool, "mqtt", 1)
    assert spool.cursors["mqtt"] == 3
    assert spool.cursors["influxdb"] == 0
    spool.close()


def test_segments_deleted_once_every_destination_acked(tmp_path: Path) -> None:
    spool = Spool(tmp_path, DESTINATIONS, segment_bytes=500)
    fill(spool, 20)
    before = len(list(tmp_path.glob("segment-*.log")))
    for seq in range(20):
        acknowledge(spool, "influxdb", seq)
    assert len(list(tmp_path.glob("segment-*.log"))) == before  # mqtt still needs them
    for seq in range(20):
        acknowledge(spool, "mqtt", seq)
    assert len(list(tmp_path.glob("segment-*.log"))) == 1  # the one being written stays
    spool.close()


def test_restart_replays_what_was_not_acknowledged(tmp_path: Path) -> None:
    spool = Spool(tmp_path, DESTINATIONS, segment_bytes=700)
    payloads = fill(spool, 12)
    for seq in range(5):
        acknowledge(spool, "influxdb", seq)
    spool.sync()  # the fsync timer saves the cursors
    spool.ack("influxdb", 5, 3, 0)  # moved after the last sync: not on disk
    assert spool._out is not None
    spool._out.close()  # no close(): as after SIGKILL, only what already reached the kernel
    spool._lock.close()  # the kernel releases the lock of a killed process

    again = Spool(tmp_path, [*DESTINATIONS, "newrelic"], segment_bytes=700)
    assert list(again.pending("influxdb")) == list(range(5, 12))  # 5 is sent again
    assert list(again.pending("mqtt")) == list(range(12))
    assert list(again.pending("newrelic")) == []  # new destination: no old backlog
    assert [again.read(s) for s in again.pending("mqtt")] == payloads
    assert again.append(b"next", 1) == 12
    again.close()


def test_cursors_known_from_the_writers_counter_block_win_over_the_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path, DESTINATIONS)
    fill(spool, 10)
    for seq in range(7):
        acknowledge(spool, "mqtt", seq)
    spool.sync()
    assert spool._out is not None
    spool._out.close()
    spool._lock.close()  # killed: the file says mqtt 7, influxdb 0

    again = Spool(tmp_path, DESTINATIONS, known_cursors={"influxdb": 4, "mqtt": 2})
    assert again.cursors == {"influxdb": 4, "mqtt": 7}  # the furthest of the two
    assert list(again.pending("influxdb")) == list(range(4, 10))
    again.close()


def test_ack_says_what_the_cursor_passed(tmp_path: Path) -> None:
    spool = Spool(tmp_path, DESTINATIONS)
    fill(spool, 4)
    assert spool.ack("mqtt", 1, 3, 0) is None  # ahead of the cursor: remembered only
    assert spool.ack("mqtt", 2, 1, 2) is None
    passed = spool.ack("mqtt", 0, 2, 1)
    assert passed is not None
    assert (passed.written, passed.failed, passed.cursor) == (6, 3, 3)
    assert spool.ack("mqtt", 0, 3, 0) is None  # behind the cursor: already counted
    spool.close()


def test_torn_record_at_the_end_is_cut_off(tmp_path: Path) -> None:
    spool = Spool(tmp_path, DESTINATIONS)
    fill(spool, 3)
    spool.close()
    segment = next(tmp_path.glob("segment-*.log"))
    with open(segment, "ab") as out:
        out.write(b"\x10\x00\x00\x00garbage")  # a header and half a payload, as at a crash
    again = Spool(tmp_path, DESTINATIONS)
    assert list(again.pending("influxdb")) == [0, 1, 2]
    assert again.append(b"fresh", 1) == 3
    assert again.read(3) == b"fresh"
    again.close()


def test_drop_oldest_segment_reports_unacknowledged(tmp_path: Path) -> None:
    spool = Spool(tmp_path, DESTINATIONS, max_bytes=1500, segment_bytes=500)
    fill(spool, 20)
    assert spool.over_limit()
    acknowledge(spool, "influxdb", 0)
    spool.ack("mqtt", 2, 2, 1)  # acknowledged ahead of the cursor: delivered, not lost
    dropped = spool.drop_oldest_segment()
    assert dropped["influxdb"].unacked == {1: 3, 2: 3, 3: 3}
    assert dropped["mqtt"].unacked == {0: 3, 1: 3, 3: 3}
    assert (dropped["mqtt"].written, dropped["mqtt"].failed) == (2, 1)
    assert spool.cursors == {"influxdb": 4, "mqtt": 4}
    assert dropped["mqtt"].cursor == 4
    assert len(list(tmp_path.glob("segment-*.log"))) == 5  # deleted only once counted
    spool.persist()
    assert len(list(tmp_path.glob("segment-*.log"))) == 4
    assert spool.ack("mqtt", 2, 3, 0) is None  # an ack for a record given up on is ignored
    assert spool.cursors["mqtt"] == 4
    while spool.over_limit():
        assert spool.drop_oldest_segment()
    spool.persist()
    assert spool.size_bytes() <= 1500
    spool.close()


def test_a_drop_moves_the_cursor_over_acks_already_past_the_dropped_segment(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path, DESTINATIONS, max_bytes=1500, segment_bytes=500)
    fill(spool, 20)  # segments of 4 records: 0-3, 4-7, ...
    spool.ack("mqtt", 4, 3, 0)  # acknowledged out of order, just past the first segment
    spool.ack("mqtt", 5, 2, 1)
    dropped = spool.drop_oldest_segment()["mqtt"]
    assert dropped.cursor == spool.cursors["mqtt"] == 6  # not stuck at 4
    assert (dropped.written, dropped.failed) == (5, 1)
    passed = spool.ack("mqtt", 6, 3, 0)
    assert passed is not None and passed.cursor == 7
    spool.persist()
    spool.close()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(DESTINATIONS), st.integers(0, 29)), max_size=80))
def test_cursor_is_first_unacknowledged_whatever_the_order(acks: list[tuple[str, int]]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        spool = Spool(directory, DESTINATIONS, segment_bytes=400)
        fill(spool, 30, size=20)
        done: dict[str, set[int]] = {d: set() for d in DESTINATIONS}
        written: dict[str, int] = dict.fromkeys(DESTINATIONS, 0)
        for destination, seq in acks:
            passed = spool.ack(destination, seq, 2, 1)
            if passed is not None:
                written[destination] += passed.written
                assert passed.cursor == spool.cursors[destination]
                assert passed.written == 2 * passed.failed
            done[destination].add(seq)
        for destination in DESTINATIONS:
            expected = next(i for i in range(31) if i not in done[destination])
            assert spool.cursors[destination] == expected
            assert written[destination] == 2 * expected  # counted once, as the cursor passed
            assert list(spool.pending(destination)) == list(range(expected, 30))
        spool.close()


def test_corrupt_record_is_an_error_not_wrong_data(tmp_path: Path) -> None:
    spool = Spool(tmp_path, DESTINATIONS)
    fill(spool, 2)
    spool.close()
    segment = next(tmp_path.glob("segment-*.log"))
    data = bytearray(segment.read_bytes())
    data[-5] ^= 0xFF
    segment.write_bytes(bytes(data))
    again = Spool(tmp_path, DESTINATIONS)
    assert list(again.pending("influxdb")) == [0]  # the damaged last record is cut off
    with pytest.raises(KeyError):
        again.read(1)
    again.close()


def test_a_second_writer_cannot_share_the_spool(tmp_path: Path) -> None:
    first = Spool(tmp_path, DESTINATIONS)
    with pytest.raises(OSError, match="in use by another senseflow writer"):
        Spool(tmp_path, DESTINATIONS)
    first.close()
    Spool(tmp_path, DESTINATIONS).close()  # free again once the first is gone
