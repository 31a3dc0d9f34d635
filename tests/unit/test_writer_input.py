"""The writer waits for its input channel in the event loop (loop.add_reader), not by
polling it from a thread: idle, it does not wake up; a batch, an orphaned writer (called
from the parent watch's thread) or a failed task still end the wait at once."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from shared.ipc import STOP
from tests.unit.test_crash_counting import batch
from tests.unit.test_spool_home_and_crash_loop import influx_config, make_writer
from workers.writer.process import Writer

WAIT = 10.0  # upper bound for anything awaited; tests finish far sooner


async def until_waiting(writer: Writer) -> None:
    """Until consume() waits on the channel (and does nothing else)."""
    async with asyncio.timeout(WAIT):
        while writer.woken is None:
            await asyncio.sleep(0)


def run_consume(writer: Writer, poke: str) -> None:
    async def scenario() -> None:
        consuming = asyncio.create_task(writer.consume())
        await until_waiting(writer)
        for _ in range(20):  # idle: nothing happens, it keeps waiting
            await asyncio.sleep(0)
        assert not consuming.done() and writer.woken is not None
        if poke == "orphan":
            threading.Thread(target=writer.orphaned).start()
        else:
            asyncio.get_running_loop().call_exception_handler(
                {"message": "a task died", "exception": RuntimeError("boom")}
            )
        await asyncio.wait_for(consuming, WAIT)

    loop_error = writer.on_loop_error

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(loop_error)
        await scenario()

    asyncio.run(main())


def test_an_orphaned_writer_stops_waiting_for_input(tmp_path: Path) -> None:
    writer, channels = make_writer(influx_config("db", spool=str(tmp_path / "spool")))
    try:
        run_consume(writer, "orphan")
        assert writer.orphan
    finally:
        for channel in channels:
            channel.close()


def test_a_failed_task_stops_the_wait_for_input(tmp_path: Path) -> None:
    writer, channels = make_writer(influx_config("db", spool=str(tmp_path / "spool")))
    try:
        run_consume(writer, "failure")
        assert isinstance(writer.failure, RuntimeError)
    finally:
        for channel in channels:
            channel.close()


def test_a_batch_arriving_while_idle_is_taken(tmp_path: Path) -> None:
    writer, channels = make_writer(influx_config("db", spool=str(tmp_path / "spool")))
    assert writer.open_spool()
    writer.count_spool_at_start()

    async def scenario() -> None:
        consuming = asyncio.create_task(writer.consume())
        await until_waiting(writer)
        writer.channels.encoded.send(batch(0, 0, 5))
        writer.channels.encoded.send(STOP)
        await asyncio.wait_for(consuming, WAIT)

    try:
        asyncio.run(scenario())
        assert writer.counters.visible() == {"events": 5}
        assert writer.spool is not None and list(writer.spool.pending("influxdb")) == [0]
    finally:
        assert writer.spool is not None
        writer.spool.close()
        for channel in channels:
            channel.close()


def test_batches_waiting_in_the_channel_are_taken_in_one_turn(tmp_path: Path) -> None:
    """At moderate rates every batch used to cost the writer a turn of its loop of its own
    (and an epoll registration); now what waits is spooled and handed over at once, up
    to TAKE_AT_ONCE batches, before any other task runs."""
    writer, channels = make_writer(influx_config("db", spool=str(tmp_path / "spool")))
    assert writer.open_spool()
    writer.count_spool_at_start()
    for number in range(3):
        writer.channels.encoded.send(batch(0, number, 5))
    spooled_at_first_turn: list[int] = []

    async def scenario() -> None:
        consuming = asyncio.create_task(writer.consume())
        await asyncio.sleep(0)  # one turn: consume() has run up to its first wait
        assert writer.spool is not None
        spooled_at_first_turn.append(writer.spool.next_seq)
        writer.channels.encoded.send(STOP)
        await asyncio.wait_for(consuming, WAIT)

    try:
        asyncio.run(scenario())
        assert spooled_at_first_turn == [3]
        assert writer.counters.visible() == {"events": 15}
    finally:
        assert writer.spool is not None
        writer.spool.close()
        for channel in channels:
            channel.close()
