"""A receiver process: one UDP socket (shared with sibling readers via SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time

import uvloop

from receiver.endpoint import BatchingEndpoint, instance_clock, make_endpoint
from receiver.guards import RateLimiter, resolve_sources
from receiver.polling import CoalescingReader
from shared import counternames as names
from shared import exitcodes
from shared.config import Config
from shared.counters import Counters, SharedCounters, beat
from shared.events import RAW_ENCODER, RawBatch
from shared.ipc import REPORT_INTERVAL, Channels, report, start_parent_watch
from shared.logs import setup_logging

log = logging.getLogger("senseflow.receiver")

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
DRAIN_PUT_TIMEOUT = 30.0


class BindError(Exception):
    pass


def run(config: Config, channels: Channels, index: int, parent_pid: int, block: object) -> int:
    name = f"reader-{index}"
    setup_logging(config.pipeline.log_level, config.pipeline.log_format, name)
    start_parent_watch(parent_pid, channels.stop.set)
    try:
        sock = open_socket(config)
    except BindError as exc:
        report(channels, name, "fatal", str(exc))
        return exitcodes.BIND_ERROR
    reader = Reader(config, channels, name, index, sock, SharedCounters(block))
    return uvloop.run(reader.serve())


def open_socket(config: Config) -> socket.socket:
    udp = config.butler.user_events.udp_server_config
    host, port = udp.server_host, udp.port_user_activity_events
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    except socket.gaierror as exc:
        raise BindError(f"cannot resolve serverHost {host!r}: {exc.strerror}") from exc
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if config.pipeline.readers > 1:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    set_receive_buffer(sock, config.pipeline.receive_buffer)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot bind UDP {host}:{port}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


def set_receive_buffer(sock: socket.socket, wanted: int) -> int:
    """Ask for `wanted` bytes, forcing past rmem_max where permitted; log what was granted."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, wanted)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # the kernel doubles it
    if granted < wanted:
        log.warning(
            "UDP receive buffer is %d bytes, not the %d asked for; raise the cap with "
            "`sysctl -w net.core.rmem_max=%d` (or run with CAP_NET_ADMIN)",
            granted,
            wanted,
            wanted,
        )
    else:
        log.info("UDP receive buffer: %d bytes", granted)
    return granted


class Reader:
    def __init__(
        self,
        config: Config,
        channels: Channels,
        name: str,
        index: int,
        sock: socket.socket,
        shared: SharedCounters,
    ) -> None:
        self.config = config
        self.channels = channels
        self.name = name
        self.sock = sock
        # Counted here per datagram, published to the shared block with every batch handed
        # over: a reader killed loses only its partial batch, never counted as received.
        self.counters = Counters()
        self.shared = shared
        self.clock = instance_clock(config.pipeline, index)
        self.kernel_drops = KernelDrops(sock)
        self.index = index
        self.limiter: RateLimiter | None = None
        self.endpoint: BatchingEndpoint | None = None

    def make_endpoint(self) -> BatchingEndpoint:
        udp = self.config.butler.user_events.udp_server_config
        pipe = self.config.pipeline
        allowed = None
        if udp.enable_source_validation:
            allowed = resolve_sources(udp.allowed_sources or [])
            log.info("source validation on: %d allowed address(es)", len(allowed))
        limiter = None
        if udp.rate_limit.enable:
            limiter = RateLimiter(
                udp.rate_limit.max_messages_per_minute,
                max_sources=pipe.rate_limit_max_sources,
                counts=self.channels.sources,
                index=self.index,
            )
        self.limiter = limiter
        self.endpoint = make_endpoint(
            self.channels.raw,
            self.counters,
            self.clock,
            pipe.reader_batch_size,
            pipe.reader_flush_ms,
            udp.max_message_size,
            allowed,
            limiter,
            self.publish_counters,
        )
        return self.endpoint

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        endpoint = self.make_endpoint()
        pipe = self.config.pipeline
        # A poll never waits longer than a batch may: the reader's latency bound stays.
        pause_ms = min(pipe.reader_coalesce_ms, pipe.reader_flush_ms)
        reading = CoalescingReader(self.sock, endpoint, pause_ms)
        reading.start()
        address = self.sock.getsockname()
        log.info("listening on UDP %s:%d", address[0], address[1])
        report(self.channels, self.name, "ready", address[1])
        beat(self.shared)
        while not self.channels.stop.is_set():
            await asyncio.sleep(REPORT_INTERVAL)
            beat(self.shared)
            if self.kernel_drops.due(self.counters.get(names.RECEIVED), time.monotonic()):
                self.count_kernel_drops()
            else:
                self.publish_counters()
            if self.limiter is not None:
                self.limiter.refresh()
        reading.stop()
        reading.read_rest()
        await loop.run_in_executor(None, self.drain, endpoint)
        self.count_kernel_drops()
        return exitcodes.OK

    def drain(self, endpoint: BatchingEndpoint) -> None:
        """Hand over the last partial batch, waiting for room rather than dropping it."""
        datagrams, times = endpoint.take_pending()
        if datagrams:
            self.counters.add(names.RECEIVED, len(datagrams))
            message = RAW_ENCODER.encode(RawBatch(datagrams, times))
            if self.channels.raw.send(message, timeout=DRAIN_PUT_TIMEOUT):
                self.counters.add(names.QUEUED, len(datagrams))
            else:
                self.counters.add(names.DROPPED_QUEUE_FULL, len(datagrams))
        self.publish_counters()

    def count_kernel_drops(self) -> None:
        drops = self.kernel_drops.take_new()
        if drops:
            self.counters.add(names.DROPPED_KERNEL, drops)
        self.publish_counters()

    def publish_counters(self) -> None:
        if self.endpoint is not None:
            self.endpoint.count_drops()
        delta = self.counters.take_delta()
        if delta:
            self.shared.commit(delta)


IDLE_CHECK_SECONDS = 5.0


class KernelDrops:
    """The kernel's drop counter for our socket, from /proc/net/udp{,6} (by socket inode)."""

    def __init__(self, sock: socket.socket) -> None:
        self._inode = str(os.fstat(sock.fileno()).st_ino)
        self._marker = f" {self._inode} "
        self._table = "/proc/net/udp6" if sock.family == socket.AF_INET6 else "/proc/net/udp"
        self._seen = self.read()
        self._received = 0
        self._next_idle_check = 0.0

    def due(self, received: int, now: float) -> bool:
        """Whether to read the table now: when datagrams came since the last read (drops
        happen only then), else every IDLE_CHECK_SECONDS; the table holds every UDP socket
        of the host, so an idle reader does not parse it twice a second."""
        if received != self._received or now >= self._next_idle_check:
            self._received = received
            self._next_idle_check = now + IDLE_CHECK_SECONDS
            return True
        return False

    def read(self) -> int:
        try:
            with open(self._table, encoding="ascii") as table:
                for line in table:
                    if self._marker not in line:
                        continue
                    fields = line.split()
                    if len(fields) >= 13 and fields[9] == self._inode:
                        return int(fields[12])
        except OSError:
            pass
        return 0

    def take_new(self) -> int:
        current = self.read()
        new, self._seen = current - self._seen, current
        return max(new, 0)


if __name__ == "__main__":
    sys.exit("run through `senseflow run`")
