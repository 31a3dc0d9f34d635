"""Channels between processes, and what the supervisor hands every child.

Batches travel over `MessageChannel`s: an AF_UNIX datagram socket pair shared by every
sender and every receiver. Each batch is one datagram, so a send or a receive is atomic
in the kernel: a process killed at any instant (SIGKILL included) can neither leave a
half-written message nor hold a lock that its siblings wait for, which a
`multiprocessing.Queue` cannot promise. The socket buffer bounds the channel in bytes;
a full channel blocks a worker's send (backpressure) and fails a receiver's non-blocking
send, which the receiver counts as a drop.

Reports (readiness, fatal errors, latency and event-count telemetry) go to the supervisor
over a `MessageChannel` too; counters do not: they live in shared memory
(`shared.counters.SharedCounters`), so that a killed child loses none. Nothing here takes a
lock that a process killed at the wrong instant could keep.
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import os
import pickle
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared.config import Config

STOP = b""
REPORT_INTERVAL = 0.5
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
# What the kernel keeps per datagram beyond the payload, counted against the send buffer.
_DATAGRAM_OVERHEAD = 1024


RAW_BYTES_PER_DATAGRAM = 512
"""Sizing estimate of a datagram in the raw channel (Butler SOS's queue counts datagrams)."""
ENCODED_BYTES_PER_EVENT = 2048
MIN_CHANNEL_BYTES = 4 * 1024 * 1024


def raw_channel_bytes(config: Config) -> int:
    """The readers -> workers channel: `queueSize` batches of `readerBatchSize` datagrams,
    and never fewer datagrams than Butler SOS's `messageQueue.maxSize` would queue."""
    pipe = config.pipeline
    queue = config.butler.user_events.udp_server_config.message_queue
    datagrams = max(pipe.queue_size * pipe.reader_batch_size, queue.max_size)
    return max(MIN_CHANNEL_BYTES, datagrams * RAW_BYTES_PER_DATAGRAM)


def encoded_channel_bytes(config: Config) -> int:
    """The workers -> writer channel: `queueSize` batches of `readerBatchSize` events."""
    pipe = config.pipeline
    events = pipe.queue_size * pipe.reader_batch_size
    return max(MIN_CHANNEL_BYTES, events * ENCODED_BYTES_PER_EVENT)


class MessageChannel:
    """Many senders, many receivers, whole messages only, bounded in bytes."""

    def __init__(self, capacity: int) -> None:
        self._send, self._recv = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        granted = _force_buffer(self._send, SO_SNDBUFFORCE, socket.SO_SNDBUF, capacity)
        _force_buffer(self._recv, SO_RCVBUFFORCE, socket.SO_RCVBUF, capacity)
        self.capacity = granted
        self.max_message = granted - _DATAGRAM_OVERHEAD
        self._buffer: memoryview | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_buffer"] = None  # each process maps its own
        return state

    def _receive_buffer(self) -> memoryview:
        """Where messages are received: mapped once per process, its pages touched only as
        far as the largest message. `recv(max_message)` would instead allocate (mmap) and
        free a buffer of the channel's whole capacity for every message and every poll,
        ~100 µs per 150 KB batch. One receiving thread per process and channel."""
        if self._buffer is None:
            self._buffer = memoryview(mmap.mmap(-1, self.max_message + 1))
        return self._buffer

    def send(self, message: bytes, timeout: float | None = None) -> bool:
        """Send, waiting up to `timeout` seconds (None: forever) for room. False if none came."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.send_nowait(message):
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            _wait(self._send, select.POLLOUT, 0.1 if remaining is None else min(remaining, 0.1))

    def send_nowait(self, message: bytes) -> bool:
        if len(message) > self.max_message:
            raise ValueError(
                f"message of {len(message)} bytes exceeds the channel's {self.max_message}"
            )
        try:
            self._send.send(message, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        return True

    def receive(self, timeout: float) -> bytes | None:
        """The next message, or None if none came within `timeout` seconds."""
        return self._next(timeout, socket.MSG_DONTWAIT)

    def peek(self, timeout: float) -> bytes | None:
        """The next message, left in the channel until `discard_next()`; None on timeout.

        Only for a channel with a single receiver (the writer): it takes a batch for good
        only once it has spooled and counted it, so that being killed in between loses
        nothing (its successor peeks the same batch again).
        """
        return self._next(timeout, socket.MSG_DONTWAIT | socket.MSG_PEEK)

    def _next(self, timeout: float, flags: int) -> bytes | None:
        deadline = time.monotonic() + timeout
        buffer = self._receive_buffer()
        while True:
            try:
                size = self._recv.recv_into(buffer, 0, flags)
                return bytes(buffer[:size])
            except (BlockingIOError, InterruptedError):
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            _wait(self._recv, select.POLLIN, remaining)

    def fileno(self) -> int:
        """The receiving socket, for an event loop to wait on (`loop.add_reader`)."""
        return self._recv.fileno()

    def discard_next(self) -> None:
        """Drop the message `peek` returned (a one-byte read discards the rest of a datagram)."""
        self._recv.recv(1, socket.MSG_DONTWAIT)

    def close(self) -> None:
        self._send.close()
        self._recv.close()

    def pending_bytes(self) -> int:
        """Bytes queued and not yet received (Linux SIOCOUTQ on the sending socket)."""
        import fcntl
        import struct
        import termios

        raw = fcntl.ioctl(self._send.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        return int(struct.unpack("i", raw)[0])


def _force_buffer(sock: socket.socket, force: int, plain: int, size: int) -> int:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)
    return sock.getsockopt(socket.SOL_SOCKET, plain) // 2  # the kernel reports it doubled


def _wait(sock: socket.socket, event: int, timeout: float) -> None:
    poller = select.poll()
    poller.register(sock.fileno(), event)
    poller.poll(poll_milliseconds(timeout))


def poll_milliseconds(timeout: float) -> int:
    """poll()'s timeout, rounded up: rounded down, the last millisecond before a deadline
    became poll(0) in a loop, a busy spin at the end of every wait."""
    return max(0, math.ceil(timeout * 1000))


class Flag:
    """A flag in shared memory: set with one store, read with one load, no lock. (A
    `multiprocessing.Event` takes a lock that a child killed while holding it never
    gives back, and the supervisor's `set()` would then wait forever.)"""

    def __init__(self, context: Any) -> None:
        self._value = context.RawValue(ctypes.c_int, 0)

    def set(self) -> None:
        self._value.value = 1

    def is_set(self) -> bool:
        return bool(self._value.value)


class SourceCounts:
    """Sources each reader rate-limits, one slot per reader in shared memory: a reader
    stores its own slot (one store, no lock) and reads the sum (receiver/guards.py)."""

    def __init__(self, context: Any, readers: int) -> None:
        self._slots = context.RawArray(ctypes.c_long, max(1, readers))

    def publish(self, index: int, count: int) -> None:
        self._slots[index] = count

    def total(self) -> int:
        return sum(self._slots)


@dataclass(frozen=True)
class Channels:
    raw: MessageChannel
    encoded: MessageChannel
    reports: MessageChannel
    """Children -> supervisor: one pickled (name, kind, payload) per datagram; like the
    batch channels, nothing a killed child leaves behind can block the others."""
    stop: Flag
    app_names_path: str = ""
    """Where the supervisor publishes the app names it fetches from QRS ('' when it does not)."""
    sources: SourceCounts | None = None
    """Per-reader counts of rate-limited sources, so that the rate limit is service-wide."""


REPORTS_CAPACITY = 4 * 1024 * 1024
REPORT_SEND_TIMEOUT = 5.0


def open_channels(config: Config, context: Any, app_names_path: str = "") -> Channels:
    """Every channel of a run, each sized as its function above says."""
    return Channels(
        raw=MessageChannel(raw_channel_bytes(config)),
        encoded=MessageChannel(encoded_channel_bytes(config)),
        reports=MessageChannel(REPORTS_CAPACITY),
        stop=Flag(context),
        app_names_path=app_names_path,
        sources=SourceCounts(context, config.pipeline.readers),
    )


def report(channels: Channels, name: str, kind: str, payload: Any = None) -> None:
    """kind: "ready", "fatal" (one line), "delivery" or "event_counts" (telemetry)."""
    message = pickle.dumps((name, kind, payload), pickle.HIGHEST_PROTOCOL)
    if not channels.reports.send(message, timeout=REPORT_SEND_TIMEOUT):
        logging.getLogger("senseflow.ipc").warning(
            "the supervisor took no report for %.0fs; dropped a %r report",
            REPORT_SEND_TIMEOUT,
            kind,
        )


def drain_reports(reports: MessageChannel, timeout: float) -> list[Any]:
    """Every report waiting, after waiting up to `timeout` s for the first one."""
    items = []
    message = reports.receive(timeout)
    while message is not None:
        items.append(pickle.loads(message))
        message = reports.receive(0.0)
    return items


def start_parent_watch(
    parent_pid: int, on_orphan: Callable[[], None], interval: float = 1.0
) -> None:
    """Call `on_orphan()` once the supervisor is gone, so that no child outlives it.

    The supervisor is watched through a pidfd, which becomes readable when it exits: the
    thread sleeps until then (no periodic wake-up), and it works whoever the child's
    parent is (children are forked by the fork server, not by the supervisor). Without
    pidfds (Linux < 5.3), the parent pid is polled every `interval` s.
    """

    def watch() -> None:
        try:
            exited = os.pidfd_open(parent_pid)
        except ProcessLookupError:
            on_orphan()
            return
        except OSError:
            _poll_parent(parent_pid, interval)
        else:
            poller = select.poll()
            poller.register(exited, select.POLLIN)
            while not poller.poll():
                pass
            os.close(exited)
        on_orphan()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _poll_parent(parent_pid: int, interval: float) -> None:
    while True:
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass
        time.sleep(interval)
