"""The keeper's reorder buffer of runs against the plain one it replaced: one sorted list of
events, each batch merged in (equal times: what waits first), the due prefix applied."""

from __future__ import annotations

import bisect
import heapq
import operator
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.config import SessionOptions
from shared.events import EncodedBatch
from shared.sessions import OPEN, START, SessionEvent, SessionState
from workers.writer.sessions import CHECKPOINT_FILE, CONSUMER, SessionCheckpoint, SessionKeeper
from workers.writer.spool import Spool

_time = operator.attrgetter("time_ns")


class PlainBuffer:
    """The reorder buffer before runs (workers/writer/sessions.py at 31b616a)."""

    def __init__(self, reorder_ns: int) -> None:
        self.reorder_ns = reorder_ns
        self.waiting: list[SessionEvent] = []
        self.applied: list[SessionEvent] = []
        self.latest = 0

    def add(self, events: list[SessionEvent]) -> None:
        events = sorted(events, key=_time)
        waiting = self.waiting
        if not waiting or events[0].time_ns >= waiting[-1].time_ns:
            waiting.extend(events)
        else:
            start = bisect.bisect_right(waiting, events[0].time_ns, key=_time)
            overlap = waiting[start:]
            del waiting[start:]
            waiting.extend(heapq.merge(overlap, events, key=_time))
        self.latest = max(self.latest, events[-1].time_ns)
        count = bisect.bisect_right(waiting, self.latest - self.reorder_ns, key=_time)
        self.applied += waiting[:count]
        del waiting[:count]


def batch_of(events: list[SessionEvent]) -> EncodedBatch:
    return EncodedBatch(
        b"", [], b"", [], [e.time_ns for e in events], {}, sessions=msgspec.msgpack.encode(events)
    )


def reader_batches(draw: st.DrawFn) -> list[list[SessionEvent]]:
    """Batches of 1-3 readers (each one's times increasing, often equal across readers),
    in an arrival order that lets batches overtake each other."""
    readers = draw(st.integers(1, 3))
    batches: list[list[SessionEvent]] = []
    clocks = [0] * readers
    number = 0
    for _ in range(draw(st.integers(1, 12))):
        reader = draw(st.integers(0, readers - 1))
        events = []
        for _ in range(draw(st.integers(1, 20))):
            clocks[reader] += draw(st.sampled_from([1, 1, 2, 5]))
            number += 1
            events.append(SessionEvent(clocks[reader], START, "S1", "LAB", f"u{number}"))
        batches.append(events)
    order = draw(st.permutations(range(len(batches))))
    shuffled = [batches[i] for i in order] if draw(st.booleans()) else batches
    return shuffled


@settings(max_examples=200, deadline=None)
@given(st.data(), st.sampled_from([0, 3, 10, 40]))
def test_runs_apply_in_the_order_the_plain_buffer_did(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, reorder_ns: int
) -> None:
    batches = data.draw(st.composite(reader_batches)())
    spool = Spool(tmp_path_factory.mktemp("spool"), [CONSUMER])
    keeper = SessionKeeper(SessionOptions(), spool, sync=False, reorder_ns=reorder_ns)
    applied: list[SessionEvent] = []
    keeper.state.apply_all = applied.extend  # type: ignore[method-assign,assignment]
    plain = PlainBuffer(reorder_ns)
    for seq, events in enumerate(batches):
        keeper.add(seq, batch_of(events))
        plain.add(events)
        assert applied == plain.applied
        waiting = msgspec.msgpack.decode(keeper.waiting, type=list[SessionEvent])
        assert waiting == keeper.waiting_events() == plain.waiting
    spool.close()


def test_a_checkpoint_of_waiting_runs_reads_back_as_events(tmp_path: Path) -> None:
    """The checkpoint splices the runs' bytes (encoded and decoded ones, over 15 and
    65,535 events: every msgpack array header) into the list of events it always held."""
    spool = Spool(tmp_path, [CONSUMER])
    keeper = SessionKeeper(SessionOptions(), spool, sync=False, reorder_ns=10**9)
    big = [SessionEvent(10 + i, OPEN, "S1", "LAB", f"u{i % 7}", "a") for i in range(70_000)]
    keeper.add(0, batch_of(big))
    keeper.add(1, batch_of([SessionEvent(5, START, "S2", "LAB", "late")]))  # merged: decoded
    keeper.add(2, batch_of([SessionEvent(80_000 + i, START, "S1", "LAB", "x") for i in range(3)]))
    keeper.checkpoint()
    saved = msgspec.msgpack.decode(
        (tmp_path / CHECKPOINT_FILE).read_bytes(), type=SessionCheckpoint
    )
    assert saved.waiting == keeper.waiting_events()
    assert [e.time_ns for e in saved.waiting] == [5, *range(10, 70_010), 80_000, 80_001, 80_002]
    spool.close()
    again = SessionKeeper(SessionOptions(), Spool(tmp_path, [CONSUMER]), sync=False)
    again.start()
    assert again.waiting_events() == saved.waiting
    again.flush()
    reference = SessionState(SessionOptions().max_idle * 10**9)
    reference.apply_all(saved.waiting)
    assert again.state.checkpoint() == reference.checkpoint()
    again.spool.close()
