"""Reading the UDP socket with interrupt coalescing, as NAPI does for a network card.

Woken by the loop for every datagram, a reader at a moderate rate pays one wake-up (epoll,
the loop's turn, a context switch) per datagram: ~9 µs of CPU at 10,000/s against ~4 µs
per datagram when each wake-up finds many. So, while datagrams come at least
`MIN_PER_POLL` per `pause`, the reader stops watching the socket and reads it on a timer
every `pause` instead, all that queued in the kernel's buffer at once (at 100,000/s a 2 ms
pause is ~200 datagrams, a few hundred KB of the receive buffer). Interrupt mode (the
socket watched, each wake-up drained) comes back as soon as a poll finds fewer than
`MIN_PER_POLL`, so a slow trickle is read at once, and an idle reader never wakes. A wake-up
or poll that reads a whole `BUDGET` leaves the socket watched (more is waiting: no pause).

The receive time is taken when a datagram is read, so a pause delays it by up to `pause`;
times stay strictly increasing (one clock, one reader).
"""

from __future__ import annotations

import asyncio
import socket

from receiver.endpoint import BatchingEndpoint

BUDGET = 1024
"""Datagrams read per wake-up or poll at most, so the loop's other work gets its turn."""
READ_REST_LIMIT = 200_000
"""Datagrams read on the way out at most (a few tenths of a second)."""
MIN_PER_POLL = 8
"""Datagrams a pause must gather to be worth a timer wake-up (which costs more than a
socket's); below that rate the reader stays in interrupt mode."""


class CoalescingReader:
    """Feeds `endpoint` from `sock`: watched while traffic is light, polled while it flows."""

    def __init__(self, sock: socket.socket, endpoint: BatchingEndpoint, pause_ms: int) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._endpoint = endpoint
        self._pause = pause_ms / 1000
        self._loop = asyncio.get_running_loop()
        self._poll: asyncio.TimerHandle | None = None
        self._window_start = 0.0
        self._window_read = 0
        self.wakeups = 0
        """Times the loop woke the reader (socket readable or poll timer): for tests."""
        self.polls = 0

    @property
    def polling(self) -> bool:
        """Whether the socket is read on the timer now (else watched)."""
        return self._poll is not None

    def start(self) -> None:
        self._watch()

    def stop(self) -> None:
        """Stop reading; what is still in the socket stays for `read_rest`."""
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        else:
            self._loop.remove_reader(self._fd)

    def read_rest(self, limit: int = READ_REST_LIMIT) -> int:
        """Read what is left in the socket (after `stop`, on the way out), at most `limit`
        datagrams: a sender that outpaces the reader must not keep it from exiting."""
        total = 0
        while total < limit and (read := self._endpoint.drain(self._sock, BUDGET)) > 0:
            total += read
        return total

    def _watch(self) -> None:
        self._poll = None
        self._window_start, self._window_read = self._loop.time(), 0
        self._loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        self.wakeups += 1
        read = self._endpoint.drain(self._sock, BUDGET)
        if not self._pause or read >= BUDGET:
            return
        now = self._loop.time()
        if now - self._window_start >= self._pause:
            self._window_start, self._window_read = now, 0
        self._window_read += read
        if self._window_read >= MIN_PER_POLL:
            self._loop.remove_reader(self._fd)
            self._poll = self._loop.call_later(self._pause, self._on_poll)

    def _on_poll(self) -> None:
        self.wakeups += 1
        self.polls += 1
        read = 0  # should the hand-over raise (the loop logs it), the socket is watched again
        try:
            read = self._endpoint.drain(self._sock, BUDGET)
            self._endpoint.flush_if_due(self._loop.time() + self._pause)
        finally:
            if MIN_PER_POLL <= read < BUDGET:
                self._poll = self._loop.call_later(self._pause, self._on_poll)
            else:
                self._watch()
