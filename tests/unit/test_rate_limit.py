"""Issue 12 §4: the UDP rate limit is service-wide (not per reader) and per source (one
flooding address cannot take the budget of the others); its source table is bounded."""

from __future__ import annotations

import asyncio
import multiprocessing

from receiver.endpoint import GuardedEndpoint, ReceiveClock
from receiver.guards import RateLimiter
from shared.counters import Counters
from shared.ipc import MessageChannel, SourceCounts

PER_MINUTE = 600  # 10 a second


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_flood_from_one_proxy_does_not_starve_another() -> None:
    """Through the reader's endpoint: proxy B's one event a second all pass while A floods."""
    clock = FakeClock()
    counters = Counters()
    channel = MessageChannel(1 << 20)

    async def feed() -> list[bytes]:
        limiter = RateLimiter(PER_MINUTE, clock=clock)
        endpoint = GuardedEndpoint(
            channel, counters, ReceiveClock(), 100_000, 60_000, rate_limiter=limiter
        )
        for tick in range(600):  # one minute in steps of 0.1 s
            clock.now += 0.1
            for _ in range(100):
                endpoint.datagram_received(b"flood", ("10.0.0.66", 5000))
            if tick % 10 == 0:
                endpoint.datagram_received(b"legit", ("10.0.0.7", 5000))
        return endpoint.take_pending()[0]

    try:
        passed = asyncio.run(feed())
    finally:
        channel.close()
    assert passed.count(b"legit") == 60  # nothing of B's was dropped
    assert len(passed) <= PER_MINUTE + 10  # A got at most its half, one second's burst aside


def test_the_limit_holds_for_the_service_not_for_each_reader() -> None:
    clock = FakeClock()
    counts = SourceCounts(multiprocessing.get_context("spawn"), 2)
    readers = [RateLimiter(PER_MINUTE, clock=clock, counts=counts, index=i) for i in range(2)]
    passed = 0
    for _ in range(600):
        clock.now += 0.1
        for index, reader in enumerate(readers):
            for _ in range(50):  # each reader's own flooding source (SO_REUSEPORT hashing)
                passed += reader.allow(f"10.0.0.{index}")
        for reader in readers:
            reader.refresh()
    assert PER_MINUTE - 20 <= passed <= PER_MINUTE + 20


def test_a_single_source_gets_the_whole_rate_and_idle_sources_give_their_share_back() -> None:
    clock = FakeClock()
    limiter = RateLimiter(PER_MINUTE, clock=clock)
    limiter.allow("10.0.0.9")  # another proxy, then silent
    passed = 0
    for _ in range(1200):  # two minutes: the silent one leaves after one
        clock.now += 0.1
        passed += sum(limiter.allow("10.0.0.1") for _ in range(50))
        limiter.refresh()
    assert passed >= 1.4 * PER_MINUTE  # first minute half the rate, then all of it


def test_the_source_table_is_bounded() -> None:
    clock = FakeClock()
    limiter = RateLimiter(PER_MINUTE, clock=clock, max_sources=4)
    assert all(limiter.allow(f"10.1.0.{i}") for i in range(4))
    assert not any(limiter.allow(f"10.2.{i // 256}.{i % 256}") for i in range(10_000))
    clock.now += 0.5
    assert limiter.allow("10.1.0.0")  # the known ones keep their budget
    clock.now += 61
    limiter.refresh()
    assert limiter.allow("10.3.0.1")  # idle ones left, so a new one gets in
