"""The writer's session state from the spool: worker output, reordering, kill and replay."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from senseflow.commands.corpus import app_names, make_corpus
from shared.config import SessionOptions, config_from_document
from shared.events import ACTIONS, EncodedBatch, RawBatch, UserEvent
from shared.sessions import SessionEvent, SessionState, session_event
from workers.pipeline import EventPipeline
from workers.writer.sessions import CHECKPOINT_FILE, CONSUMER, SessionKeeper
from workers.writer.spool import Spool

T0 = 1_790_000_000 * 10**9
OPTIONS = SessionOptions(max_idle=3600)
REORDER = 10**6  # ns: batches of two workers overlap by less than this here


def worker_batches(count: int, seed: int, *, workers: int = 2) -> list[EncodedBatch]:
    """Real worker output for `count` corpus datagrams, read by `workers` readers whose
    batches overlap in time, in the order a writer could get them."""
    pipeline = EventPipeline(config_from_document({}, {}), app_names())
    datagrams = make_corpus(count, seed=seed)
    batches = []
    for start in range(0, count, 100):
        chunk = datagrams[start : start + 100]
        reader = (start // 100) % workers
        times = [T0 + (start + i) * 1000 + reader * 500 for i in range(len(chunk))]
        batches.append(pipeline.process_batch(RawBatch(chunk, times)))
    rng = random.Random(seed)
    for i in range(0, len(batches) - 1, 2):  # the second worker is sometimes first
        if rng.random() < 0.5:
            batches[i], batches[i + 1] = batches[i + 1], batches[i]
    return batches


def truth(batches: list[EncodedBatch]) -> SessionState:
    events = [
        e for b in batches for e in msgspec.msgpack.decode(b.sessions, type=list[SessionEvent])
    ]
    state = SessionState(OPTIONS.max_idle * 10**9)
    for event in sorted(events, key=lambda e: e.time_ns):
        state.apply(event)
    return state


def open_spool(directory: Path) -> Spool:
    return Spool(directory, ["influxdb", CONSUMER], segment_bytes=20_000)


def append(spool: Spool, keeper: SessionKeeper, batch: EncodedBatch) -> None:
    """As the writer's `spool_batch` does."""
    seq = spool.append(msgspec.msgpack.encode(batch), len(batch.received_ns))
    keeper.add(seq, batch)


def killed(spool: Spool) -> None:
    """What SIGKILL leaves: the files as written, no cursor saved, the lock released."""
    if spool._out is not None:
        spool._out.close()
    spool._lock.close()


def test_worker_output_carries_each_events_session_view() -> None:
    """Valid events only: invalid and excluded datagrams never reach the session state."""
    excluded = {"directory": "lab", "userId": "SA_REPOSITORY"}
    document = {"Butler-SOS": {"userEvents": {"excludeUser": [excluded]}}}
    pipeline = EventPipeline(config_from_document(document, {}), app_names())
    datagrams = make_corpus(2000, seed=3, invalid_share=0.1)
    times = [T0 + i for i in range(2000)]
    batch = pipeline.process_batch(RawBatch(datagrams, times))
    assert batch.counters["excluded"] and batch.counters["events"] < 1800
    sent = msgspec.msgpack.decode(batch.sessions, type=list[SessionEvent])
    expected = []
    for data, received_ns in zip(datagrams, times, strict=True):
        event = pipeline.event_or_reason(data, received_ns)
        if isinstance(event, UserEvent):
            expected.append(session_event(event, ACTIONS.index(event.command)))
    assert sent == expected
    off = config_from_document({"senseflow": {"sessions": {"enable": False}}}, {})
    assert EventPipeline(off, app_names()).process_batch(RawBatch(datagrams, times)).sessions == b""


def test_batches_of_two_workers_apply_in_receive_time_order(tmp_path: Path) -> None:
    batches = worker_batches(3000, seed=5)
    spool = open_spool(tmp_path)
    keeper = SessionKeeper(OPTIONS, spool, sync=False, reorder_ns=REORDER)
    keeper.start()
    for batch in batches:
        append(spool, keeper, batch)
    keeper.flush()
    spool.close()
    expected = truth(batches)
    at = T0 + 10**10
    assert keeper.state.snapshot(at) == expected.snapshot(at)
    assert keeper.state.counters == expected.counters
    assert expected.totals()[1] > 10


def run_with_kills(directory: Path, batches: list[EncodedBatch], plan: list[str]) -> SessionState:
    """Apply `batches`; before batch i, plan[i] says: '' nothing, 'c' checkpoint,
    'k' kill the writer and start a new one, 'ck' checkpoint then kill."""
    spool = open_spool(directory)
    keeper = SessionKeeper(OPTIONS, spool, sync=False, reorder_ns=REORDER)
    keeper.start()
    for batch, step in zip(batches, plan, strict=True):
        if "c" in step:
            keeper.checkpoint()
        if "k" in step:
            killed(spool)
            spool = open_spool(directory)
            keeper = SessionKeeper(OPTIONS, spool, sync=False, reorder_ns=REORDER)
            keeper.start()
        append(spool, keeper, batch)
    keeper.flush()
    keeper.checkpoint()
    spool.close()
    return keeper.state


BATCHES = worker_batches(2000, seed=9)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["", "", "", "c", "k", "ck"]), min_size=20, max_size=20))
def test_a_killed_writer_is_followed_by_the_same_state(plan: list[str]) -> None:
    with tempfile.TemporaryDirectory() as plain, tempfile.TemporaryDirectory() as interrupted:
        expected = run_with_kills(Path(plain), BATCHES, [""] * len(BATCHES))
        state = run_with_kills(Path(interrupted), BATCHES, plan)
        at = T0 + 10**10
        assert state.snapshot(at) == expected.snapshot(at)
        assert state.counters == expected.counters
        assert (Path(interrupted) / CHECKPOINT_FILE).exists()
        assert expected.ended_seq > 100  # ends, numbered alike: exported exactly once
        assert (state.ended_seq, state.ended[-100:]) == (expected.ended_seq, expected.ended[-100:])


def test_the_spool_keeps_what_the_last_checkpoint_does_not_cover(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    keeper = SessionKeeper(OPTIONS, spool, sync=False, reorder_ns=REORDER)
    keeper.start()
    for batch in BATCHES[:10]:
        append(spool, keeper, batch)
        spool.ack("influxdb", spool.next_seq - 1, len(batch.received_ns), 0)
        spool.persist()
    assert len(spool.segments) > 2  # influxdb acknowledged all: only sessions holds them
    keeper.checkpoint()
    assert len(spool.segments) == 1
    assert spool.cursors[CONSUMER] == spool.next_seq
    spool.close()


def test_a_checkpoint_is_only_needed_after_new_records(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    keeper = SessionKeeper(OPTIONS, spool, sync=True, reorder_ns=REORDER)
    keeper.start()
    assert keeper.changed
    keeper.checkpoint()
    assert not keeper.changed
    append(spool, keeper, BATCHES[0])
    assert keeper.changed
    keeper.checkpoint()
    assert not keeper.changed
    spool.close()


def test_an_unreadable_checkpoint_is_logged_and_the_spool_replayed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = open_spool(tmp_path)
    keeper = SessionKeeper(OPTIONS, spool, sync=False, reorder_ns=REORDER)
    keeper.start()
    for batch in BATCHES[:3]:
        append(spool, keeper, batch)
    killed(spool)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"\x93not a checkpoint")
    spool = open_spool(tmp_path)
    again = SessionKeeper(OPTIONS, spool, sync=False, reorder_ns=REORDER)
    again.start()
    again.flush()
    keeper.flush()
    assert again.state.snapshot(T0 + 10**10) == keeper.state.snapshot(T0 + 10**10)
    assert "cannot read" in caplog.text
    spool.close()
