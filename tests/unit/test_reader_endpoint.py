"""The reader's endpoint: the lean path when no guard is on, and exact counts either way."""

from __future__ import annotations

import asyncio
import socket

from receiver.endpoint import BatchingEndpoint, GuardedEndpoint, ReceiveClock, make_endpoint
from receiver.guards import RateLimiter
from receiver.process import IDLE_CHECK_SECONDS, KernelDrops
from shared import counternames as names
from shared.counters import Counters
from shared.events import RAW_DECODER
from shared.ipc import MessageChannel

ALLOWED = "10.0.0.1"


def feed(
    datagrams: list[tuple[bytes, str]],
    allowed: frozenset[str] | None,
    limiter: RateLimiter | None,
    batch_size: int = 3,
) -> tuple[BatchingEndpoint, dict[str, int], list[bytes]]:
    channel = MessageChannel(1 << 20)
    counters = Counters()

    async def run() -> BatchingEndpoint:
        endpoint = make_endpoint(
            channel, counters, ReceiveClock(), batch_size, 60_000, 100, allowed, limiter
        )
        for data, source in datagrams:
            endpoint.datagram_received(data, (source, 5000))
        endpoint.flush()
        endpoint.count_drops()
        return endpoint

    try:
        endpoint = asyncio.run(run())
        handed: list[bytes] = []
        while (message := channel.receive(0.0)) is not None:
            handed += RAW_DECODER.decode(message).datagrams
    finally:
        channel.close()
    return endpoint, counters.snapshot(), handed


def test_no_guard_on_means_the_lean_endpoint_and_exact_counts() -> None:
    datagrams = [(b"ok%d" % i, ALLOWED) for i in range(7)] + [(b"x" * 101, ALLOWED)] * 2
    endpoint, counts, handed = feed(datagrams, None, None)
    assert type(endpoint) is BatchingEndpoint
    assert handed == [b"ok%d" % i for i in range(7)]
    assert counts == {
        names.RECEIVED: 9,
        names.QUEUED: 7,
        names.DROPPED_TOO_LARGE: 2,
    }


def test_guards_drop_and_count_each_reason_once() -> None:
    limiter = RateLimiter(120, max_sources=16)  # a full bucket of 2 to start with
    datagrams = (
        [(b"a%d" % i, ALLOWED) for i in range(4)]
        + [(b"stranger", "10.9.9.9")] * 3
        + [(b"y" * 101, ALLOWED)]
    )
    endpoint, counts, handed = feed(datagrams, frozenset({ALLOWED}), limiter)
    assert type(endpoint) is GuardedEndpoint
    assert handed == [b"a0", b"a1"]
    assert counts == {
        names.RECEIVED: 8,
        names.QUEUED: 2,
        names.DROPPED_RATE_LIMITED: 2,  # a2, a3
        names.DROPPED_TOO_LARGE: 1,  # checked first: it takes no token
        names.DROPPED_SOURCE_NOT_ALLOWED: 3,
    }


def test_drops_are_counted_only_when_published() -> None:
    """A reader killed before publishing loses the drop and its `received` together."""
    channel = MessageChannel(1 << 20)
    counters = Counters()

    async def run() -> None:
        endpoint = make_endpoint(channel, counters, ReceiveClock(), 3, 60_000, 10)
        endpoint.datagram_received(b"z" * 11, ("10.0.0.1", 1))
        assert counters.snapshot() == {}
        endpoint.count_drops()
        endpoint.count_drops()

    try:
        asyncio.run(run())
    finally:
        channel.close()
    assert counters.snapshot() == {names.RECEIVED: 1, names.DROPPED_TOO_LARGE: 1}


def test_the_kernel_drop_table_is_read_when_datagrams_came_and_seldom_when_idle() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        drops = KernelDrops(sock)
        assert drops.due(0, 100.0)  # the first check
        assert not drops.due(0, 100.5)  # idle: nothing new, not yet the idle period
        assert drops.due(7, 101.0)  # datagrams came: drops may have come with them
        assert not drops.due(7, 101.5)
        assert drops.due(7, 101.0 + IDLE_CHECK_SECONDS)
        assert drops.read() == 0
