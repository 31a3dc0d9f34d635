"""Counting that survives SIGKILL: the shared counter block, and the writer's bookkeeping
of worker sends, fences and its spool across a restart (SPEC 4, issue 5)."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from shared.config import Config, config_from_document
from shared.counternames import SPOOLED
from shared.counters import SharedCounters, new_block, sum_counters
from shared.events import RAW_ENCODER, EncodedBatch, Fence
from shared.ipc import Channels, Flag, MessageChannel
from workers.writer.process import Writer
from workers.writer.sinks.base import Ack
from workers.writer.spool import Spool

CONTEXT = multiprocessing.get_context("spawn")


# -- the shared block ------------------------------------------------------------------------


def test_counts_added_set_and_committed_read_back() -> None:
    counters = SharedCounters(new_block(CONTEXT))
    counters.add("received", 5)
    counters.set("_cursor.mqtt", 12)
    counters.commit({"events": 3, "invalid.unknown_source": 2}, {"_seen.0": 4})
    counters.commit({"events": 1})
    assert counters.snapshot() == {
        "received": 5,
        "_cursor.mqtt": 12,
        "events": 4,
        "invalid.unknown_source": 2,
        "_seen.0": 4,
    }
    assert counters.visible() == {"received": 5, "events": 4, "invalid.unknown_source": 2}
    other = SharedCounters(counters._words)  # another process attaching to the same block
    assert other.get("events") == 4 and other.has("_seen.0") and not other.has("nothing")


def test_sum_over_blocks_leaves_out_bookkeeping() -> None:
    first, second = SharedCounters(new_block(CONTEXT)), SharedCounters(new_block(CONTEXT))
    first.add("received", 2)
    second.commit({"received": 3, "events": 1}, {"_spooled": 9})
    assert sum_counters([first, second]) == {"received": 5, "events": 1}


def test_a_half_registered_name_is_overwritten_not_shifted() -> None:
    counters = SharedCounters(new_block(CONTEXT))
    counters.add("a", 1)
    words = counters._words
    names_at = counters._names_at
    counters._bytes[names_at + 2 : names_at + 8] = b"orph\0\0"  # killed mid-registration
    words[2] = 8  # its byte count was stored, its count was not
    counters.add("b", 2)
    assert SharedCounters(words).snapshot() == {"a": 1, "b": 2}


def commit_forever(block: Any) -> None:
    counters = SharedCounters(block)
    while True:
        counters.commit({"events": 1, "written.influxdb": 1}, {"_seen.0": counters.get("events")})


def test_sigkill_never_splits_a_commit() -> None:
    block = new_block(CONTEXT)
    reader = SharedCounters(block)
    for delay in (0.01, 0.033, 0.07):
        before = reader.get("events")
        child = CONTEXT.Process(target=commit_forever, args=(block,))
        child.start()
        deadline = time.monotonic() + 30
        while reader.get("events") == before:  # committing (a spawned child starts slowly)
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(delay)
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        values = SharedCounters(block).snapshot()
        assert values["events"] == values["written.influxdb"] > 0
        assert values["_seen.0"] == values["events"] - 1


# -- the writer's bookkeeping ----------------------------------------------------------------


def writer_config(tmp_path: Path, influx: bool = False) -> Config:
    butler: dict[str, Any] = {"userEvents": {"sendToInfluxdb": {"enable": influx}}}
    if influx:
        butler["influxdbConfig"] = {"enable": True, "host": "127.0.0.1", "version": 1}
    own = {"spool": {"directory": str(tmp_path / "spool")}}
    return config_from_document({"Butler-SOS": butler, "senseflow": own}, {})


WRITERS: list[Writer] = []


def make_writer(config: Config, block: Any) -> Writer:
    channels = Channels(
        raw=MessageChannel(1 << 20),
        encoded=MessageChannel(1 << 20),
        reports=MessageChannel(1 << 20),
        stop=Flag(CONTEXT),
    )
    writer = Writer(config, channels, SharedCounters(block))
    WRITERS.append(writer)
    assert writer.open_spool()
    writer.count_spool_at_start()
    return writer


@pytest.fixture(autouse=True)
def close_writers() -> Any:
    yield
    while WRITERS:
        writer = WRITERS.pop()
        if writer.spool is not None:
            writer.spool._lock.close()
            if writer.spool._out is not None:
                writer.spool._out.close()
        writer.channels.raw.close()
        writer.channels.encoded.close()
        writer.channels.reports.close()


def batch(worker: int, number: int, events: int, invalid: int = 0) -> bytes:
    counters = {"events": events, **({"invalid.unknown_source": invalid} if invalid else {})}
    encoded = EncodedBatch(
        b"m x=1i 1\n" * events, [], b"", [], list(range(1, events + 1)), counters,
        worker, number, events + invalid,
    )  # fmt: skip
    return RAW_ENCODER.encode(encoded)


def fence(worker: int, number: int, datagrams: int) -> bytes:
    return RAW_ENCODER.encode(Fence(worker, number, datagrams))


@pytest.fixture
def block() -> Any:
    return new_block(CONTEXT)


def test_a_batch_peeked_again_after_a_restart_is_counted_once(tmp_path: Path, block: Any) -> None:
    writer = make_writer(writer_config(tmp_path), block)
    writer.take(batch(0, 0, 5, invalid=2))
    writer.take(batch(1, 0, 4))
    writer.take(batch(0, 0, 5, invalid=2))  # taken before a kill, still in the channel
    writer.take(batch(0, 1, 0, invalid=3))  # nothing but invalid datagrams: counted too
    assert writer.counters.visible() == {"events": 9, "invalid.unknown_source": 5}


def test_fence_counts_what_a_dead_worker_held_and_never_sent(tmp_path: Path, block: Any) -> None:
    writer = make_writer(writer_config(tmp_path), block)
    writer.take(batch(0, 0, 10))
    writer.take(fence(0, 1, 7))  # it held send 1 (7 datagrams) and sent none of it
    assert writer.counters.get("dropped.worker_crash") == 7
    writer.take(batch(0, 2, 10))  # its successor numbers past the fence
    writer.take(batch(0, 3, 4))  # half of a split batch arrived before the kill
    writer.take(fence(0, 3, 9))  # it held 9 from send 3 on: 4 arrived, 5 did not
    writer.take(fence(0, 3, 9))  # the same fence, peeked again after a writer restart
    assert writer.counters.get("dropped.worker_crash") == 12
    assert writer.counters.get("events") == 24


def test_restarted_writer_counts_what_its_predecessor_spooled_uncounted(
    tmp_path: Path, block: Any
) -> None:
    config = writer_config(tmp_path, influx=True)
    writer = make_writer(config, block)
    writer.take(batch(0, 0, 3))
    assert writer.spool is not None
    item = batch(0, 1, 4)
    writer.spool.append(item, 4)  # killed after the append, before the commit
    writer.spool._lock.close()

    successor = make_writer(config, block)
    assert successor.counters.get("events") == 7
    assert successor.counters.get(SPOOLED) == 2
    successor.take(item)  # the batch is still in the channel: not spooled or counted again
    assert successor.spool is not None and successor.spool.next_seq == 2
    assert successor.counters.get("events") == 7
    assert successor.counters.get("recovered.influxdb") == 0  # same run: nothing recovered


def test_first_writer_of_a_run_counts_the_previous_runs_backlog_as_recovered(
    tmp_path: Path, block: Any
) -> None:
    config = writer_config(tmp_path, influx=True)
    previous = Spool(tmp_path / "spool", ["influxdb"])
    for events in (3, 5, 2):
        previous.append(b"x", events)
    previous.ack("influxdb", 0, 3, 0)
    previous.persist()
    previous.close()
    writer = make_writer(config, block)  # a fresh block: a new run
    assert writer.counters.visible() == {"recovered.influxdb": 7}


def test_block_values_are_int64(block: Any) -> None:
    assert ctypes.sizeof(block) % 8 == 0


def test_one_ack_call_counts_moves_the_cursor_and_measures_one_delivery(
    tmp_path: Path, block: Any
) -> None:
    """The sink's one callback: the feed counts the batches written, moves the cursor and
    records one delivery (the InfluxDB write that carried both) with every receive time."""
    writer = make_writer(writer_config(tmp_path, influx=True), block)
    writer.take(batch(0, 0, 2))
    writer.take(batch(0, 1, 3))
    writer.make_feeds()
    (feed,) = writer.feeds
    writer.delivery.take_report()
    feed.acknowledged([Ack(0, 2, 0, [1, 2]), Ack(1, 3, 0, [1, 2, 3])])
    assert writer.counters.get("written.influxdb") == 5
    assert writer.counters.get("_cursor.influxdb") == 2
    report = writer.delivery.take_report()["destinations"]["influxdb"]
    assert report["batches"]["count"] == 1 and report["batches"]["sum"] == 5
    assert report["latency"]["count"] == 5
    assert report["pending"] == 0
