"""A batch reaches every sink in the same turn of the loop in which the writer spools and
counts it (issue 15): no wake-up of the feed's task per batch, and an MQTT publish that
waits behind no other task. Only when a sink has no room does the feed's task hand it
over, later, and batches still reach the sink in spool order."""

from __future__ import annotations

import asyncio
from pathlib import Path

from shared.events import ENCODED_DECODER, EncodedBatch
from tests.unit.test_crash_counting import batch
from tests.unit.test_spool_home_and_crash_loop import influx_config, make_writer
from workers.writer.process import Writer
from workers.writer.sinks.influx import InfluxSink


def started_writer(tmp_path: Path) -> tuple[Writer, list[object]]:
    writer, channels = make_writer(influx_config("db", spool=str(tmp_path / "spool")))
    assert writer.open_spool()
    writer.count_spool_at_start()
    writer.make_feeds()
    return writer, channels


def influx_sink(writer: Writer) -> InfluxSink:
    sink = writer.feeds[0].sink
    assert isinstance(sink, InfluxSink)
    return sink


def test_a_spooled_batch_is_in_the_sink_before_the_loop_turns(tmp_path: Path) -> None:
    writer, channels = started_writer(tmp_path)
    sink = influx_sink(writer)

    async def scenario() -> None:
        writer.take(batch(0, 0, 5))
        assert sink.chunks.pending == 5  # no await since the take: no task ran
        assert sink.chunks.current.seqs == [0]
        assert not writer.feeds[0].wake.is_set()  # nothing left for the feed's task

    try:
        asyncio.run(scenario())
    finally:
        assert writer.spool is not None
        writer.spool.close()
        for channel in channels:
            channel.close()  # type: ignore[attr-defined]


def test_a_sink_without_room_gets_the_rest_in_spool_order(tmp_path: Path) -> None:
    writer, channels = started_writer(tmp_path)
    sink = influx_sink(writer)
    sink.max_pending = 5
    feed = writer.feeds[0]

    async def scenario() -> None:
        writer.take(batch(0, 0, 5))  # handed over at once: the sink is now full
        writer.take(batch(0, 1, 3))  # no room: left to the feed's task
        assert sink.chunks.current.seqs == [0] and feed.wake.is_set()
        task = asyncio.create_task(feed.run())
        async with asyncio.timeout(10):
            while not feed.handing:  # the feed's task waits for room with batch 1
                await asyncio.sleep(0)
        writer.take(batch(0, 2, 4))  # must not overtake batch 1
        assert sink.chunks.current.seqs == [0]
        sink.max_pending = 100
        sink.room.set()
        async with asyncio.timeout(10):
            while sink.chunks.current.seqs != [0, 1, 2]:
                await asyncio.sleep(0)
        assert sink.chunks.pending == 12
        task.cancel()

    try:
        asyncio.run(scenario())
    finally:
        assert writer.spool is not None
        writer.spool.close()
        for channel in channels:
            channel.close()  # type: ignore[attr-defined]


def test_a_backlog_is_handed_over_one_batch_per_turn(tmp_path: Path) -> None:
    """Replay or catch-up: the feed's task yields after each batch, so the channel and the
    other sinks (MQTT) are served between two, however long the backlog."""
    writer, channels = started_writer(tmp_path)
    sink = influx_sink(writer)
    feed = writer.feeds[0]
    for number in range(5):  # spooled while the sink could not take them
        item = batch(0, number, 2)
        decoded = ENCODED_DECODER.decode(item)
        assert isinstance(decoded, EncodedBatch)
        writer.spool_batch(item, decoded)

    async def scenario() -> None:
        task = asyncio.create_task(feed.run())
        await asyncio.sleep(0)  # one turn of the feed's task
        assert sink.chunks.current.seqs == [0]
        async with asyncio.timeout(10):
            while sink.chunks.current.seqs != [0, 1, 2, 3, 4]:
                await asyncio.sleep(0)
        task.cancel()

    try:
        asyncio.run(scenario())
    finally:
        assert writer.spool is not None
        writer.spool.close()
        for channel in channels:
            channel.close()  # type: ignore[attr-defined]
