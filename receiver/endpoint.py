"""The UDP reader's hot path: stamp, guard, append; hand over whole batches.

`datagram_received` does as little as possible: a receive time strictly increasing within
this process (and, with several readers, distinct across them), the guards, one append.
A batch crosses to the workers as one put of one msgpack buffer; when the bounded queue
is full the whole batch is dropped and counted, so the socket is never blocked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from receiver.guards import RateLimiter
from shared import counternames as names
from shared.config import Pipeline
from shared.counters import Counters
from shared.events import RAW_ENCODER, RawBatch
from shared.ipc import MessageChannel


class ReceiveClock:
    """Nanosecond receive times, strictly increasing; `stride` keeps readers apart.

    Reader i of n only hands out times congruent to i modulo n, so two readers can never
    stamp the same time (InfluxDB would silently overwrite one of the two points).
    """

    def __init__(self, index: int = 0, stride: int = 1) -> None:
        self._index = index
        self._stride = stride
        self._last = -1

    def next(self) -> int:
        now = time.time_ns()
        stride = self._stride
        if stride > 1:
            now += (self._index - now) % stride
        if now <= self._last:
            now = self._last + stride
        self._last = now
        return now


def instance_clock(pipeline: Pipeline, reader_index: int) -> ReceiveClock:
    """Reader r of instance i: times congruent to i * readers + r modulo instances * readers,
    so no two readers of no two instances ever stamp the same nanosecond."""
    readers = pipeline.readers
    return ReceiveClock(
        pipeline.instance_index * readers + reader_index, pipeline.instances * readers
    )


class BatchingEndpoint(asyncio.DatagramProtocol):
    def __init__(
        self,
        out: MessageChannel,
        counters: Counters,
        clock: ReceiveClock,
        batch_size: int,
        flush_ms: int,
        max_message_size: int = 65507,
        allowed_sources: frozenset[str] | None = None,
        rate_limiter: RateLimiter | None = None,
        on_flush: Callable[[], None] | None = None,
    ) -> None:
        self._out = out
        self._counters = counters
        self._clock = clock
        self._batch_size = batch_size
        self._flush_s = flush_ms / 1000
        self._max_size = max_message_size
        self._allowed = allowed_sources
        self._limiter = rate_limiter
        self._on_flush = on_flush
        self._datagrams: list[bytes] = []
        self._times: list[int] = []
        self._bytes = 0
        # msgpack adds a few bytes per datagram; leave room for them.
        self._max_bytes = out.max_message // 2
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # `received` is counted with the outcome: at a guard's drop, or when the batch is
        # handed over, so that a reader killed with a partial batch leaves no count behind.
        if len(data) > self._max_size:
            self._drop(names.DROPPED_TOO_LARGE)
            return
        if self._allowed is not None and addr[0] not in self._allowed:
            self._drop(names.DROPPED_SOURCE_NOT_ALLOWED)
            return
        if self._limiter is not None and not self._limiter.allow(addr[0]):
            self._drop(names.DROPPED_RATE_LIMITED)
            return
        if self._bytes + len(data) > self._max_bytes:
            self.flush()
        self._datagrams.append(data)
        self._times.append(self._clock.next())
        self._bytes += len(data) + 16
        if len(self._datagrams) >= self._batch_size:
            self.flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(self._flush_s, self.flush)

    def _drop(self, reason: str) -> None:
        self._counters.add(names.RECEIVED)
        self._counters.add(reason)

    def error_received(self, exc: Exception) -> None:
        self._counters.add(names.SOCKET_ERRORS)

    def take_pending(self) -> tuple[list[bytes], list[int]]:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        datagrams, times = self._datagrams, self._times
        self._datagrams, self._times, self._bytes = [], [], 0
        return datagrams, times

    def flush(self) -> None:
        datagrams, times = self.take_pending()
        if not datagrams:
            return
        self._counters.add(names.RECEIVED, len(datagrams))
        if self._out.send_nowait(RAW_ENCODER.encode(RawBatch(datagrams, times))):
            self._counters.add(names.QUEUED, len(datagrams))
        else:
            self._counters.add(names.DROPPED_QUEUE_FULL, len(datagrams))
        if self._on_flush is not None:
            self._on_flush()
