"""The reader's interrupt coalescing, on real loopback sockets: many datagrams per wake-up
while traffic flows, nothing lost or reordered across pauses, interrupt mode when it stops."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from receiver.endpoint import ReceiveClock, make_endpoint
from receiver.polling import MIN_PER_POLL, CoalescingReader
from shared import counternames as names
from shared.config import ConfigError, load_config
from shared.counters import Counters
from shared.events import RAW_DECODER
from shared.ipc import MessageChannel

PACED = 3000
"""Datagrams sent at ~10,000/s, a few every half millisecond."""


class Harness:
    """A bound socket, a reader on it and what it hands over, with a way to wait for it."""

    def __init__(self, pause_ms: int, allowed: frozenset[str] | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.channel = MessageChannel(1 << 20)
        self.counters = Counters()
        self.handed: list[bytes] = []
        self.times: list[int] = []
        endpoint = make_endpoint(
            self.channel,
            self.counters,
            ReceiveClock(),
            100,
            10,
            200,
            allowed,
            on_flush=self.take_batches,
        )
        self.endpoint = endpoint
        self.reading = CoalescingReader(self.sock, endpoint, pause_ms)

    def take_batches(self) -> None:
        while (message := self.channel.receive(0.0)) is not None:
            batch = RAW_DECODER.decode(message)
            self.handed += batch.datagrams
            self.times += batch.received_ns

    async def until(self, done: Callable[[], bool]) -> None:
        """Let the loop run until `done()` (checked every few ms; 30 s at most)."""
        async with asyncio.timeout(30):
            while not done():
                await asyncio.sleep(0.005)

    def close(self) -> None:
        self.sock.close()
        self.channel.close()


def send_paced(port: int, count: int, rate: float = 10_000.0) -> None:
    """`count` numbered datagrams at `rate` per second on average: each turn sends what is
    due by the clock and naps ~0.5 ms, so a slow nap makes bigger bursts, not a lower rate."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
        started, sent = time.monotonic(), 0
        while sent < count:
            due = min(count, int((time.monotonic() - started) * rate) + 1)
            for seq in range(sent, due):
                out.sendto(b"event %06d" % seq, ("127.0.0.1", port))
            sent = due
            time.sleep(0.0005)


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


@pytest.fixture(params=sorted(LOOPS))
def loop_factory(request: pytest.FixtureRequest) -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop (what the reader runs on) and asyncio's own loop."""
    return LOOPS[request.param]


def run(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    pause_ms: int,
    body: Callable[[Harness], Awaitable[None]],
) -> Harness:
    async def main() -> Harness:
        harness = Harness(pause_ms)
        harness.reading.start()
        try:
            await body(harness)
        finally:
            harness.reading.stop()
            harness.close()
        return harness

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


async def receive_paced(harness: Harness) -> None:
    port = harness.sock.getsockname()[1]
    sender = threading.Thread(target=send_paced, args=(port, PACED))
    sender.start()
    try:
        await harness.until(lambda: len(harness.handed) >= PACED)
    finally:
        await asyncio.to_thread(sender.join)


def test_a_steady_flow_is_read_many_datagrams_per_wakeup_in_order(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    harness = run(loop_factory, 2, receive_paced)
    assert harness.handed == [b"event %06d" % seq for seq in range(PACED)]
    assert all(a < b for a, b in zip(harness.times, harness.times[1:], strict=False))
    assert harness.reading.polls > 0
    # Without coalescing nearly every datagram (or every burst of five) is a wake-up.
    assert harness.reading.wakeups * MIN_PER_POLL <= PACED
    assert harness.counters.snapshot() == {names.RECEIVED: PACED, names.QUEUED: PACED}


def test_after_the_flow_the_reader_watches_the_socket_again(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def body(harness: Harness) -> None:
        await receive_paced(harness)
        await harness.until(lambda: not harness.reading.polling)
        polls = harness.reading.polls
        harness.sock.sendto(b"late", harness.sock.getsockname())  # from itself: loopback
        await harness.until(lambda: harness.handed[-1:] == [b"late"])
        assert harness.reading.polls == polls  # read on its own wake-up, not by a poll

    run(loop_factory, 2, body)


def test_zero_turns_coalescing_off(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    harness = run(loop_factory, 0, receive_paced)
    assert harness.handed == [b"event %06d" % seq for seq in range(PACED)]
    assert harness.reading.polls == 0


def test_stop_then_read_rest_takes_what_waits_in_the_socket(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def body(harness: Harness) -> None:
        harness.reading.stop()
        for seq in range(5):
            harness.sock.sendto(b"left %d" % seq, harness.sock.getsockname())
        harness.sock.sendto(b"x" * 300, harness.sock.getsockname())  # over the 200 allowed
        assert harness.reading.read_rest() == 6
        harness.endpoint.flush()
        harness.endpoint.count_drops()
        harness.reading.start()  # for the harness's own stop

    harness = run(loop_factory, 2, body)
    assert harness.handed == [b"left %d" % seq for seq in range(5)]
    assert harness.counters.snapshot() == {
        names.RECEIVED: 6,
        names.QUEUED: 5,
        names.DROPPED_TOO_LARGE: 1,
    }


def test_the_source_guard_sees_each_datagrams_address() -> None:
    async def main() -> Harness:
        harness = Harness(2, allowed=frozenset({"10.9.9.9"}))
        try:
            for seq in range(3):
                harness.sock.sendto(b"stranger %d" % seq, harness.sock.getsockname())
            assert harness.endpoint.drain(harness.sock, 100) == 3
            harness.endpoint.count_drops()
        finally:
            harness.close()
        return harness

    harness = asyncio.run(main())
    assert harness.handed == []
    assert harness.counters.snapshot() == {
        names.RECEIVED: 3,
        names.DROPPED_SOURCE_NOT_ALLOWED: 3,
    }


def test_a_pause_longer_than_the_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("senseflow:\n  readerCoalesceMs: 500\n")
    with pytest.raises(ConfigError, match="readerCoalesceMs"):
        load_config(str(path))
