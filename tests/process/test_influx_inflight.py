"""Two InfluxDB writes in flight against a real influxd, and the write-when-idle rule.

A small proxy in front of influxd (aiohttp, same loop) forwards every request, and for
one scripted /write holds it until the next /write has arrived (so two are in flight for
certain) and then answers it 503, as an overloaded InfluxDB would.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from aiohttp import web

from shared.backoff import Backoff
from shared.config import Config
from shared.counters import Counters
from tests.localservers import LOOPBACK, InfluxServer
from tests.process.test_influx_sink import (
    WAIT,
    Deliveries,
    expected_points,
    make_batch,
    make_lines,
    stored_points,
    v1_config,
)
from workers.writer.sinks.base import Ack, counting_acks
from workers.writer.sinks.influx import InfluxSink


class FailingProxy:
    """Forwards to influxd; /write number `fail` (1 is the first) is held until the next
    /write has been written, then answered 503. Records the bodies influxd accepted."""

    def __init__(self, target: int, fail: int) -> None:
        self.target = f"http://{LOOPBACK}:{target}"
        self.fail = fail
        self.writes = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.next_arrived = asyncio.Event()
        self.accepted: list[bytes] = []
        self.session: aiohttp.ClientSession | None = None
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        self.session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, LOOPBACK, 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.session is not None:
            await self.session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.path != "/write":
            return await self.forward(request, body)
        self.writes += 1
        number = self.writes
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if number == self.fail:
                # with one write in flight only, nothing comes: most_in_flight says so
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.next_arrived.wait(), WAIT)
                return web.Response(status=503, text='{"error":"scripted failure"}')
            response = await self.forward(request, body)
            if response.status < 300:
                self.accepted.append(body)
            if number == self.fail + 1:
                self.next_arrived.set()  # written: the held one may fail now
            return response
        finally:
            self.in_flight -= 1

    async def forward(self, request: web.Request, body: bytes) -> web.Response:
        assert self.session is not None
        headers = {k: v for k, v in request.headers.items() if k in ("Content-Type",)}
        async with self.session.request(
            request.method, self.target + request.path_qs, data=body, headers=headers
        ) as answer:
            return web.Response(status=answer.status, body=await answer.read())


class OrderedAcks:
    """on_ack: the sequence numbers in order, and what influxd had accepted at each."""

    def __init__(self, proxy: FailingProxy, counters: Counters) -> None:
        self.proxy = proxy
        self.seqs: list[int] = []
        self.accepted_then: list[list[bytes]] = []
        self.count = counting_acks(counters, "influxdb")
        self.event = asyncio.Event()

    def __call__(self, acks: list[Ack]) -> None:
        for ack in acks:
            self.seqs.append(ack.seq)
            self.accepted_then.append(list(self.proxy.accepted))
        self.count(acks)
        self.event.set()

    async def wait(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.seqs) < count:
                self.event.clear()
                await self.event.wait()


def test_v1_two_writes_in_flight_a_failed_first_is_retried_and_acknowledged_first(
    influx_server: InfluxServer, influx_db: str
) -> None:
    counters, lines = Counters(), make_lines(0, 15)
    first, second, third = (b"".join(lines[i : i + 5]) for i in (0, 5, 10))

    async def scenario() -> None:
        proxy = FailingProxy(influx_server.port, fail=2)
        await proxy.start()
        config = v1_config(proxy.port, influx_db, batch_size=5)
        sink = InfluxSink(config, counters)
        sink.backoff = Backoff(base=0.001, cap=0.01)
        acks = OrderedAcks(proxy, counters)
        sink.on_ack = acks
        await sink.start()
        try:
            await sink.write_batch(make_batch(lines[:5]), seq=0)
            await acks.wait(1)  # the first chunk goes alone
            await sink.write_batch(make_batch(lines[5:10]), seq=1)
            await sink.write_batch(make_batch(lines[10:]), seq=2)
            await acks.wait(3)
        finally:
            await asyncio.wait_for(sink.close(), WAIT)
            await proxy.stop()
        assert proxy.most_in_flight == 2
        # the third was written while the second was held, then the second's retry
        assert proxy.accepted == [first, third, second]
        assert acks.seqs == [0, 1, 2]
        # nothing acknowledged before the retried second was accepted
        assert acks.accepted_then[1] == acks.accepted_then[2] == [first, third, second]

    asyncio.run(scenario())
    assert stored_points(influx_server, influx_db) == expected_points(lines)
    assert counters.snapshot() == {"written.influxdb": 15, "retries.influxdb": 1}


def test_v1_a_single_event_is_written_without_waiting_for_the_flush_interval(
    influx_server: InfluxServer, influx_db: str
) -> None:
    counters = Counters()
    delivered = Deliveries(counters)
    config: Config = v1_config(
        influx_server.port, influx_db, batch_size=1000, flush_interval=60_000
    )
    line = make_lines(0, 1)

    async def scenario() -> None:
        sink = InfluxSink(config, counters, delivered)
        await sink.start()
        try:
            await sink.write_batch(make_batch(line), seq=0)
            await delivered.wait(1)  # WAIT (10 s) is far below the 60 s interval
            # in influxd already, with the sink neither flushed nor closed
            assert stored_points(influx_server, influx_db) == expected_points(line)
        finally:
            await sink.close()

    asyncio.run(scenario())
    assert counters.snapshot() == {"written.influxdb": 1}
