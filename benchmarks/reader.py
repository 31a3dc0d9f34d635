"""Micro-benchmark of the reader's hot path: µs of CPU per datagram, by batch size and guard.

    python -m benchmarks.reader                  # batch sizes 100, 200, 500; a few seconds
    python -m benchmarks.reader --sizes 50,500 --datagrams 200000

Feeds corpus datagrams straight into the reader's endpoint (`datagram_received`, as uvloop
calls it) on a running event loop, with a real readers -> workers channel that a consumer
empties after each hand-over; the consumer's CPU is timed apart and left out. What remains
is stamp + guards + append + encode + send, per datagram (the socket read itself, in
uvloop, is the same for every variant and is not in it). Every repeat runs every variant
round robin; the figure is the median over repeats. Indicative on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable

from receiver.endpoint import ReceiveClock, make_endpoint
from receiver.guards import RateLimiter
from senseflow.commands.corpus import make_corpus
from shared.counters import Counters
from shared.ipc import MessageChannel

ADDRESS = ("127.0.0.1", 40000)


def run_variant(
    datagrams: list[bytes], batch_size: int, guards: str, channel: MessageChannel
) -> float:
    """µs of CPU per datagram for one pass over `datagrams`."""
    consumer = [0.0]

    def empty_channel() -> None:
        started = time.thread_time()
        while channel.receive(0.0) is not None:
            pass
        consumer[0] += time.thread_time() - started

    async def feed() -> float:
        allowed = frozenset({ADDRESS[0]}) if "source" in guards else None
        limiter = RateLimiter(10**12, max_sources=16) if "rate" in guards else None
        endpoint = make_endpoint(
            channel,
            Counters(),
            ReceiveClock(),
            batch_size,
            60_000,
            allowed_sources=allowed,
            rate_limiter=limiter,
            on_flush=empty_channel,
        )
        receive: Callable[[bytes, tuple[str, int]], None] = endpoint.datagram_received
        started = time.thread_time()
        for data in datagrams:
            receive(data, ADDRESS)
        endpoint.flush()
        return time.thread_time() - started

    spent = asyncio.run(feed())
    return (spent - consumer[0]) / len(datagrams) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,200,500")
    parser.add_argument("--datagrams", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    datagrams = make_corpus(args.datagrams, seed=1)
    variants = [
        (size, guards)
        for guards in ("none", "source+rate")
        for size in map(int, args.sizes.split(","))
    ]
    channel = MessageChannel(64 * 1024 * 1024)
    figures: dict[tuple[int, str], list[float]] = {v: [] for v in variants}
    try:
        for _ in range(args.repeats):
            for size, guards in variants:
                figures[(size, guards)].append(run_variant(datagrams, size, guards, channel))
    finally:
        channel.close()
    print(f"{'batch':>6} {'guards':<12} {'µs/datagram (median)':>22} {'min':>6}")
    for (size, guards), values in figures.items():
        print(f"{size:>6} {guards:<12} {statistics.median(values):>22.3f} {min(values):>6.3f}")


if __name__ == "__main__":
    main()
