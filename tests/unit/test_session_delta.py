"""The live view by deltas (issue 13/15): what the supervisor rebuilds from the writer's
deltas equals what the whole published state says, at every publish, across compactions,
writer restarts (a new epoch, a torn last delta) and supervisor restarts."""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from senseflow.sessions import LiveSessionsReader
from shared import sessions as session_module
from shared.config import SessionOptions
from shared.events import EncodedBatch
from shared.sessionlive import decode_snapshot, encode_live
from shared.sessions import CLOSE, OPEN, START, STOP, SessionEvent, SessionState
from workers.writer.sessionpublish import SessionPublisher
from workers.writer.sessions import CONSUMER, SessionKeeper
from workers.writer.spool import Spool

T0 = 1_790_000_000 * 10**9
MS = 10**6
OPTIONS = SessionOptions(max_idle=1)  # seconds: users expire within these runs
REORDER = 30 * MS
HOSTS = ("S1", "S2", "S3")
APPS = ("", "app-a", "app-b", "app-c")


def random_batches(seed: int, count: int = 60, size: int = 25) -> list[EncodedBatch]:
    """Events 5 ms apart over 30 users (some in two spellings), two readers whose
    batches overlap and sometimes arrive late: starts, opens, closes, stops, expiries."""
    rng = random.Random(seed)
    actions = (START, START, OPEN, OPEN, OPEN, CLOSE, CLOSE, STOP, STOP)
    batches = []
    for index in range(count):
        base = T0 + index * size * 5 * MS
        items = []
        for i in range(size):
            user = f"u{rng.randrange(30)}"
            items.append(
                SessionEvent(
                    base + i * 5 * MS + (index % 2) * MS,
                    rng.choice(actions),
                    rng.choice(HOSTS),
                    rng.choice(("LAB", "lab")),
                    user.upper() if rng.random() < 0.2 else user,
                    rng.choice(APPS),
                    "App",
                    rng.choice(("Chrome", "Edge")),
                    "119",
                    "Windows",
                    "10",
                )
            )
        if rng.random() < 0.3:  # idle a while: users expire
            items = [msgspec.structs.replace(e, time_ns=e.time_ns + 2 * 10**9) for e in items]
        stamps = [e.time_ns for e in items]
        batches.append(
            EncodedBatch(b"", [], b"", [], stamps, {}, sessions=msgspec.msgpack.encode(items))
        )
    for i in range(0, count - 1, 3):  # a reader's batch late
        if rng.random() < 0.4:
            batches[i], batches[i + 1] = batches[i + 1], batches[i]
    return batches


class Writer:
    def __init__(self, directory: Path, compact_min_bytes: int) -> None:
        self.spool = Spool(directory, ["influxdb", CONSUMER])
        self.keeper = SessionKeeper(OPTIONS, self.spool, sync=False, reorder_ns=REORDER)
        self.keeper.start()
        self.publisher = SessionPublisher(self.keeper, compact_min_bytes)

    def add(self, batch: EncodedBatch) -> None:
        seq = self.spool.append(msgspec.msgpack.encode(batch), len(batch.received_ns))
        self.keeper.add(seq, batch)

    def whole(self) -> SessionState:
        """What the whole published state says (the view before deltas)."""
        keeper = self.keeper
        live = decode_snapshot(encode_live(keeper.state, keeper.waiting, 0))
        state = SessionState.from_checkpoint(live.state)
        state.apply_all(live.waiting)
        return state

    def close(self) -> None:
        self.publisher.close()
        self.spool.close()


@contextmanager
def writer(directory: Path, compact_min_bytes: int = 1 << 30) -> Iterator[Writer]:
    running = Writer(directory, compact_min_bytes)
    try:
        yield running
    finally:
        running.close()


def reader_of(directory: Path) -> LiveSessionsReader:
    return LiveSessionsReader(directory / "sessions.live", OPTIONS.max_idle * 10**9)


def assert_same(reader: LiveSessionsReader, expected: SessionState) -> None:
    at = expected.clock_ns
    with reader.state(at) as shown:
        expected.sweep(at)
        assert shown.snapshot(at) == expected.snapshot(at)
        assert shown.counters == expected.counters
        assert shown.totals() == expected.totals()
        confirmed = reader.confirmed_seq
        assert [e for e in shown.ended if e.seq < confirmed] == [
            e for e in expected.ended if e.seq < confirmed
        ]
        assert tentative(shown, confirmed) == tentative(expected, confirmed)
        assert shown.ended_seq == expected.ended_seq
        assert order(shown) == order(expected)  # last-seen order: expiry relies on it


def tentative(state: SessionState, confirmed: int) -> list[tuple[Any, ...]]:
    """The ends of the events still reordering: numbered by whoever applied them (the
    order of expiries may differ), written to InfluxDB by series and time, not number."""
    ends = [msgspec.structs.astuple(e)[1:] for e in state.ended if e.seq >= confirmed]
    return sorted(ends, key=repr)


def order(state: SessionState) -> dict[str, list[str]]:
    return {host: list(users) for host, users in state.hosts.items()}


@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 10**6),
    st.lists(st.booleans(), min_size=60, max_size=60),
    st.sampled_from([1 << 30, 4000]),
)
def test_deltas_followed_equal_the_whole_published_state(
    seed: int, publish_after: list[bool], compact_min_bytes: int
) -> None:
    """Published after random batches, read after every publish or only now and then;
    with compactions (a new snapshot and delta file) every few kilobytes or never."""
    with (
        tempfile.TemporaryDirectory() as directory,
        writer(Path(directory), compact_min_bytes) as w,
    ):
        reader, rare_reader = reader_of(Path(directory)), reader_of(Path(directory))
        for index, (batch, publish) in enumerate(
            zip(random_batches(seed), publish_after, strict=True)
        ):
            w.add(batch)
            if publish and w.publisher.publish():
                later = w.keeper.state.clock_ns + 2 * OPTIONS.max_idle * 10**9
                with reader.state(later, buffered=False) as exported:  # everyone expired
                    assert not exported.hosts
                assert_same(reader, w.whole())  # the export's sweep left the copy alone
                if index % 7 == 0:
                    assert_same(rare_reader, w.whole())
        w.keeper.flush()
        w.publisher.publish()
        assert_same(reader, w.whole())
        assert_same(rare_reader, w.whole())
        assert w.keeper.state.counters["sessions.expired"] > 0
        assert reader.snapshots_read == 1  # deltas only, across compactions too
        if compact_min_bytes == 1 << 30:  # one who missed two compactions reads a snapshot
            assert rare_reader.snapshots_read == 1


def test_the_writers_state_itself_is_what_the_deltas_rebuild(tmp_path: Path) -> None:
    """Drained (nothing waiting), the view is the writer's own state, order included."""
    with writer(tmp_path, compact_min_bytes=3000) as w:
        reader = reader_of(tmp_path)
        for batch in random_batches(7):
            w.add(batch)
            w.publisher.publish()
            reader.version()  # follows along
        w.keeper.flush()
        w.publisher.publish()
        assert_same(reader, w.keeper.state)
        assert w.publisher.snapshots > 2 and reader.snapshots_read == 1


def test_a_restarted_writer_is_followed_from_its_new_snapshot(tmp_path: Path) -> None:
    batches = random_batches(11)
    reader = reader_of(tmp_path)
    w = Writer(tmp_path, 1 << 30)
    for batch in batches[:30]:
        w.add(batch)
        w.publisher.publish()
    assert_same(reader, w.whole())
    w.keeper.checkpoint()
    with open(w.publisher.delta_path, "ab") as torn:  # killed in the middle of a delta
        torn.write(b"\x40\x00\x00\x00\x99partial")
    w.publisher.close()
    w.spool.close()
    with writer(tmp_path) as again:  # replays the spool after its checkpoint
        assert again.publisher.epoch != w.publisher.epoch
        for batch in batches[30:]:
            again.add(batch)
            again.publisher.publish()
            assert_same(reader, again.whole())
        assert reader.snapshots_read == 2  # the first writer's, then the second's
        assert_same(reader_of(tmp_path), again.whole())  # a supervisor started now


def test_a_restarted_supervisor_reads_the_snapshot_and_the_deltas_after_it(
    tmp_path: Path,
) -> None:
    with writer(tmp_path) as w:
        for batch in random_batches(13)[:40]:
            w.add(batch)
            w.publisher.publish()
        assert w.publisher.snapshots == 1
        fresh = reader_of(tmp_path)
        assert_same(fresh, w.whole())
        assert fresh.snapshots_read == 1


def test_ends_the_state_trimmed_before_a_publish_make_it_a_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The removals are read off the ends; when the state dropped some unpublished, the
    deltas cannot say what left, so the whole state goes out instead."""
    monkeypatch.setattr(session_module, "ENDED_KEEP", 2)
    with writer(tmp_path) as w:
        reader = reader_of(tmp_path)
        w.publisher.publish()
        for batch in random_batches(17)[:20]:
            w.add(batch)
        assert w.publisher.ends_lost
        w.publisher.publish()
        assert w.publisher.snapshots == 2
        expected = w.whole()
        with reader.state(expected.clock_ns) as shown:
            assert shown.snapshot(expected.clock_ns) == expected.snapshot(expected.clock_ns)


def test_an_idle_writer_publishes_nothing_and_a_reader_reads_nothing(tmp_path: Path) -> None:
    with writer(tmp_path) as w:
        for batch in random_batches(19)[:5]:
            w.add(batch)
        assert w.publisher.publish()
        size = os.stat(w.publisher.delta_path).st_size
        assert not w.publisher.publish()
        assert os.stat(w.publisher.delta_path).st_size == size
        reader = reader_of(tmp_path)
        first: Any = reader.version()
        assert reader.version() == first


def test_exports_skip_the_buffer_while_events_come_and_see_it_once_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exports poll every few seconds: while the writer keeps publishing they take the
    state as published (no replay of its buffer); once it is idle, the buffer too (it
    stays unapplied until more events come)."""
    from senseflow import sessions as reader_module

    with writer(tmp_path) as w:
        for batch in random_batches(23)[:10]:
            w.add(batch)
        w.publisher.publish()
        assert w.keeper.waiting
        reader = reader_of(tmp_path)
        at = w.whole().clock_ns
        with reader.state(at, buffered=False) as shown:
            published = SessionState.restore(w.keeper.state.checkpoint())  # a copy
            published.sweep(at)
            assert shown.snapshot(at) == published.snapshot(at)
            assert shown.snapshot(at) != w.whole().snapshot(at)
        monkeypatch.setattr(reader_module, "SETTLED_NS", 0)
        assert_same(reader, w.whole())
        with reader.state(at, buffered=False) as shown:
            assert shown.snapshot(at) == w.whole().snapshot(at)
