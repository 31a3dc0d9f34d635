"""The InfluxDB sink's write slots against a fake transport whose answers the test gives:
two writes in flight, acknowledged in the order taken; a failed write retried before
anything behind it; a partial batch sent as soon as a slot is free, whatever the flush
interval. (tests/process/test_influx_sink.py does the same against real servers.)"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from shared.backoff import Backoff
from shared.config import Config, ConfigError, config_from_document
from shared.counters import Counters
from shared.events import EncodedBatch
from workers.writer.sinks.base import Ack, ChunkQueue
from workers.writer.sinks.influx import Chunk, InfluxSink, WriteFailed

WAIT = 10.0  # upper bound for anything awaited; tests finish far sooner


class FakeTransport:
    """Records every write and holds it until the test answers it (None: written)."""

    def __init__(self) -> None:
        self.writes: list[tuple[bytes, asyncio.Future[Exception | None]]] = []
        self.arrived = asyncio.Event()

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, body: bytes) -> None:
        answer: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.writes.append((body, answer))
        self.arrived.set()
        error = await answer
        if error is not None:
            raise error

    async def wait_writes(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.writes) < count:
                self.arrived.clear()
                await self.arrived.wait()

    def answer(self, index: int, error: Exception | None = None) -> None:
        self.writes[index][1].set_result(error)

    def unanswered(self) -> list[bytes]:
        return [body for body, answer in self.writes if not answer.done()]


def config(inflight: int | None = None, batch_size: int = 2, gap: int | None = None) -> Config:
    own: dict[str, Any] = {"batchSize": batch_size, "flushInterval": 60_000}
    if inflight is not None:
        own["influxInflight"] = inflight
    if gap is not None:
        own["influxMinWriteInterval"] = gap
    influx = {"enable": True, "host": "127.0.0.1", "port": 1, "version": 1}
    document = {"Butler-SOS": {"influxdbConfig": influx}, "senseflow": own}
    return config_from_document(document, {})


def line(n: int) -> bytes:
    return b"user_events,host=h n=%di %d\n" % (n, n)


def batch(*numbers: int) -> EncodedBatch:
    return EncodedBatch(
        lines=b"".join(line(n) for n in numbers),
        mqtt_payloads=[],
        actions=b"",
        newrelic=[],
        received_ns=[n + 1 for n in numbers],
        counters={},
    )


class Acks:
    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.event = asyncio.Event()

    def __call__(self, acks: list[Ack]) -> None:
        self.seqs.extend(ack.seq for ack in acks)
        self.event.set()

    async def wait(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.seqs) < count:
                self.event.clear()
                await self.event.wait()


Scenario = Callable[[InfluxSink, FakeTransport, Acks], Awaitable[None]]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(scenario: Scenario, cfg: Config | None = None, clock: Clock | None = None) -> None:
    async def main() -> None:
        sink = InfluxSink(cfg or config(), Counters())
        if clock is not None:
            sink.chunks = ChunkQueue(Chunk, clock)
            sink.chunks.serial_through = 1
        transport = FakeTransport()
        sink.transport = transport
        sink.backoff = Backoff(base=0.001, cap=0.001)
        acks = Acks()
        sink.on_ack = acks
        await sink.start()
        try:
            await scenario(sink, transport, acks)
        finally:
            for _, answer in transport.writes:
                if not answer.done():
                    answer.set_result(None)
            await asyncio.wait_for(sink.close(), WAIT)

    asyncio.run(main())


async def warm_up(sink: InfluxSink, transport: FakeTransport, acks: Acks) -> None:
    """The first chunk goes alone; once it is written, two may be in flight."""
    await sink.write_batch(batch(0, 1), seq=0)
    await transport.wait_writes(1)
    transport.answer(0)
    await acks.wait(1)


async def let_run() -> None:
    """Let every task that can run, run (the loop is otherwise idle: fakes answer nothing)."""
    for _ in range(20):
        await asyncio.sleep(0)


def test_two_writes_in_flight_are_acknowledged_in_the_order_taken() -> None:
    async def scenario(sink: InfluxSink, transport: FakeTransport, acks: Acks) -> None:
        await warm_up(sink, transport, acks)
        await sink.write_batch(batch(2, 3), seq=1)
        await sink.write_batch(batch(4, 5), seq=2)
        await transport.wait_writes(3)  # both at once
        assert transport.unanswered() == [line(2) + line(3), line(4) + line(5)]

        transport.answer(2)  # the second answers first: held back
        await let_run()
        assert acks.seqs == [0]
        transport.answer(1)
        await acks.wait(3)
        assert acks.seqs == [0, 1, 2]

    run(scenario)


def test_a_failed_write_is_retried_and_nothing_behind_it_goes_first() -> None:
    async def scenario(sink: InfluxSink, transport: FakeTransport, acks: Acks) -> None:
        await warm_up(sink, transport, acks)
        await sink.write_batch(batch(2, 3), seq=1)
        await sink.write_batch(batch(4, 5), seq=2)
        await transport.wait_writes(3)
        transport.answer(1, WriteFailed("HTTP 503"))
        transport.answer(2)  # written, but not acknowledged before seq 1
        await transport.wait_writes(4)  # the retry
        await sink.write_batch(batch(6, 7), seq=3)  # waits: the retry is alone
        await let_run()
        assert transport.unanswered() == [line(2) + line(3)]
        assert acks.seqs == [0]

        transport.answer(3)
        await transport.wait_writes(5)
        assert transport.unanswered() == [line(6) + line(7)]
        assert acks.seqs == [0, 1, 2]
        transport.answer(4)
        await acks.wait(4)
        assert acks.seqs == [0, 1, 2, 3]

    run(scenario)


def test_a_single_event_is_written_at_once_despite_a_huge_flush_interval() -> None:
    async def scenario(sink: InfluxSink, transport: FakeTransport, acks: Acks) -> None:
        await sink.write_batch(batch(7), seq=0)  # batchSize 1000, flushInterval 60 s
        await transport.wait_writes(1)
        assert transport.unanswered() == [line(7)]
        transport.answer(0)
        await acks.wait(1)

    run(scenario, config(batch_size=1000))


def test_while_every_slot_is_busy_arrivals_gather_into_the_next_write() -> None:
    async def scenario(sink: InfluxSink, transport: FakeTransport, acks: Acks) -> None:
        await warm_up(sink, transport, acks)
        await sink.write_batch(batch(2), seq=1)
        await transport.wait_writes(2)
        await sink.write_batch(batch(3), seq=2)
        await transport.wait_writes(3)  # the second slot
        for seq in (3, 4, 5):
            await sink.write_batch(batch(seq + 1), seq=seq)
        await let_run()
        assert len(transport.writes) == 3  # both slots busy: nothing more sent

        transport.answer(1)
        await transport.wait_writes(4)
        assert transport.writes[3][0] == line(4) + line(5) + line(6)
        transport.answer(2)
        transport.answer(3)
        await acks.wait(6)
        assert acks.seqs == [0, 1, 2, 3, 4, 5]

    run(scenario, config(batch_size=1000))


def test_partial_batches_go_no_sooner_than_the_min_write_interval_full_ones_at_once() -> None:
    clock = Clock()

    async def scenario(sink: InfluxSink, transport: FakeTransport, acks: Acks) -> None:
        await sink.write_batch(batch(0), seq=0)  # after a quiet spell: at once
        await transport.wait_writes(1)
        transport.answer(0)
        await acks.wait(1)

        clock.now += 0.999
        await sink.write_batch(batch(1), seq=1)
        await let_run()
        assert len(transport.writes) == 1  # 1 ms of the 1 s interval left, a slot free

        await sink.write_batch(batch(2, 3), seq=2)  # now 3 events: a full chunk
        await transport.wait_writes(2)
        assert transport.writes[1][0] == line(1) + line(2) + line(3)
        transport.answer(1)
        await acks.wait(3)

        clock.now += 0.5
        await sink.write_batch(batch(4), seq=3)
        await let_run()
        assert len(transport.writes) == 2
        clock.now += 0.5  # the interval is over: the next wake-up sends it
        sink.chunks.wake.set()
        await transport.wait_writes(3)
        assert transport.writes[2][0] == line(4)
        transport.answer(2)
        await acks.wait(4)

    run(scenario, config(batch_size=3, gap=1000), clock)


def test_influx_inflight_1_keeps_one_write_in_flight() -> None:
    async def scenario(sink: InfluxSink, transport: FakeTransport, acks: Acks) -> None:
        await warm_up(sink, transport, acks)
        await sink.write_batch(batch(2, 3), seq=1)
        await sink.write_batch(batch(4, 5), seq=2)
        await transport.wait_writes(2)
        await let_run()
        assert transport.unanswered() == [line(2) + line(3)]
        transport.answer(1)
        await transport.wait_writes(3)
        transport.answer(2)
        await acks.wait(3)
        assert acks.seqs == [0, 1, 2]

    run(scenario, config(inflight=1))


def test_influx_inflight_must_be_at_least_1() -> None:
    with pytest.raises(ConfigError, match=r"senseflow\.influxInflight: expected an integer >= 1"):
        config(inflight=0)
    assert config().pipeline.influx_inflight == 2
    with pytest.raises(ConfigError, match=r"influxMinWriteInterval: expected an integer >= 1"):
        config(gap=0)
