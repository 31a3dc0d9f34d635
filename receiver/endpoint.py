"""The UDP reader's hot path: stamp, guard, append; hand over whole batches.

`datagram_received` does as little as possible: a receive time strictly increasing within
this process (and, with several readers, distinct across them), the guards, one append.
A batch crosses to the workers as one put of one msgpack buffer; when the bounded queue
is full the whole batch is dropped and counted, so the socket is never blocked.
"""

from __future__ import annotations

import asyncio
import socket
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
    """No guard on: `datagram_received` is a size check, a stamp and an append.

    `received` is counted per hand-over (with the batch's outcome), not per datagram, so
    that a reader killed with a partial batch leaves no count behind.
    """

    def __init__(
        self,
        out: MessageChannel,
        counters: Counters,
        clock: ReceiveClock,
        batch_size: int,
        flush_ms: int,
        max_message_size: int = 65507,
        on_flush: Callable[[], None] | None = None,
    ) -> None:
        self._out = out
        self._counters = counters
        self._clock = clock
        self._batch_size = batch_size
        self._flush_s = flush_ms / 1000
        self._max_size = max_message_size
        self._on_flush = on_flush
        self._datagrams: list[bytes] = []
        self._times: list[int] = []
        self._bytes = 0
        self._too_large = 0
        # msgpack adds a few bytes per datagram; leave room for them.
        self._max_bytes = out.max_message // 2
        # The flush timer is armed only while a batch is open: an idle reader never wakes.
        self._timer: asyncio.TimerHandle | None = None
        self._flush_due = 0.0
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        size = len(data)
        if size > self._max_size:
            self._too_large += 1
            return
        if self._bytes + size > self._max_bytes:
            self.flush()
        datagrams = self._datagrams
        datagrams.append(data)
        self._times.append(self._clock.next())
        self._bytes += size + 16
        if len(datagrams) >= self._batch_size:
            self.flush()
        elif self._timer is None:
            self.arm_flush_timer()

    def arm_flush_timer(self) -> None:
        self._flush_due = self._loop.time() + self._flush_s
        self._timer = self._loop.call_later(self._flush_s, self.flush)

    def drain(self, sock: socket.socket, budget: int) -> int:
        """Read up to `budget` datagrams from `sock` (non-blocking), as `datagram_received`
        would take them one by one; returns how many were read (fewer: the socket is empty)."""
        recv = sock.recv
        bufsize = self._max_size + 1  # a longer datagram is cut to this and counted too large
        stamp = self._clock.next
        read = 0
        while read < budget:
            try:
                data = recv(bufsize)
            except BlockingIOError:
                break
            except OSError:  # an error queued on the socket: counted, reading goes on
                self._counters.add(names.SOCKET_ERRORS)
                break
            read += 1
            size = len(data)
            if size > self._max_size:
                self._too_large += 1
                continue
            if self._bytes + size > self._max_bytes:
                self.flush()
            self._datagrams.append(data)
            self._times.append(stamp())
            self._bytes += size + 16
            if len(self._datagrams) >= self._batch_size:
                self.flush()
        if self._datagrams and self._timer is None:
            self.arm_flush_timer()
        return read

    def flush_if_due(self, horizon: float) -> None:
        """Hand over the open batch now if its flush timer would fire by `horizon` (loop
        time): a reader that polls anyway spares the loop that separate wake-up."""
        if self._timer is not None and self._flush_due <= horizon:
            self.flush()

    def count_drops(self) -> None:
        """Move the datagrams dropped since the last call into the counters."""
        if self._too_large:
            self._counters.add(names.RECEIVED, self._too_large)
            self._counters.add(names.DROPPED_TOO_LARGE, self._too_large)
            self._too_large = 0

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


class GuardedEndpoint(BatchingEndpoint):
    """Source allow-list and/or rate limit on; what they drop is counted in batches too."""

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
        super().__init__(out, counters, clock, batch_size, flush_ms, max_message_size, on_flush)
        self._allowed = allowed_sources
        self._limiter = rate_limiter
        self._not_allowed = 0
        self._rate_limited = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) > self._max_size:  # first, as before: it takes no rate token
            self._too_large += 1
            return
        if self._allowed is not None and addr[0] not in self._allowed:
            self._not_allowed += 1
            return
        if self._limiter is not None and not self._limiter.allow(addr[0]):
            self._rate_limited += 1
            return
        super().datagram_received(data, addr)

    def drain(self, sock: socket.socket, budget: int) -> int:
        """As `BatchingEndpoint.drain`, with each datagram's source for the guards."""
        recvfrom = sock.recvfrom
        bufsize = self._max_size + 1
        receive = self.datagram_received
        read = 0
        while read < budget:
            try:
                data, addr = recvfrom(bufsize)
            except BlockingIOError:
                break
            except OSError:  # an error queued on the socket: counted, reading goes on
                self._counters.add(names.SOCKET_ERRORS)
                break
            read += 1
            receive(data, addr)
        return read

    def count_drops(self) -> None:
        super().count_drops()
        for reason, count in (
            (names.DROPPED_SOURCE_NOT_ALLOWED, self._not_allowed),
            (names.DROPPED_RATE_LIMITED, self._rate_limited),
        ):
            if count:
                self._counters.add(names.RECEIVED, count)
                self._counters.add(reason, count)
        self._not_allowed = self._rate_limited = 0


def make_endpoint(
    out: MessageChannel,
    counters: Counters,
    clock: ReceiveClock,
    batch_size: int,
    flush_ms: int,
    max_message_size: int = 65507,
    allowed_sources: frozenset[str] | None = None,
    rate_limiter: RateLimiter | None = None,
    on_flush: Callable[[], None] | None = None,
) -> BatchingEndpoint:
    """The lean endpoint when no guard is on, resolved once rather than per datagram."""
    if allowed_sources is None and rate_limiter is None:
        return BatchingEndpoint(
            out, counters, clock, batch_size, flush_ms, max_message_size, on_flush
        )
    return GuardedEndpoint(
        out,
        counters,
        clock,
        batch_size,
        flush_ms,
        max_message_size,
        allowed_sources,
        rate_limiter,
        on_flush,
    )
