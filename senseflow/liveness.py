"""Liveness, as gunicorn's arbiter does it: a child that stops beating is killed.

Every child beats a heartbeat into its shared counter block from its own loop's report
timer (`shared.counters.beat`, every `shared.ipc.REPORT_INTERVAL`). A process that is alive
but no longer works (a wedged loop, a SIGSTOP, a deadlock) stops beating; past
`senseflow.heartbeatTimeout` seconds the supervisor kills it with SIGKILL, and its
ordinary reaping restarts it (a worker's held datagrams are settled by a fence as for any
death). Only ready children are judged: a child still booting is watched by the boot
timeout instead, and the drain by the graceful timeout.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable
from typing import Protocol

from shared.counters import SharedCounters, last_beat

log = logging.getLogger("senseflow.supervisor")


class Beating(Protocol):
    name: str
    counters: SharedCounters
    ready: bool
    started_at: float
    """Monotonic time of its spawn: a new process is not judged by its predecessor's beat."""

    @property
    def alive(self) -> bool: ...

    @property
    def pid(self) -> int | None: ...

    def reap(self) -> None: ...


def silent_for(child: Beating, now: float) -> float:
    """Seconds since the child's process last beat (or started)."""
    return now - max(last_beat(child.counters), child.started_at)


def kill_wedged(children: Iterable[Beating], timeout: float, now: float) -> list[Beating]:
    """SIGKILL every ready child silent for longer than `timeout` s (0: never); returns
    them. The supervisor's reaping restarts them."""
    killed = []
    for child in children:
        if timeout <= 0 or not child.ready or not child.alive or child.pid is None:
            continue
        silence = silent_for(child, now)
        if silence > timeout:
            log.error(
                "%s (pid %s) sent no heartbeat for %.1fs (heartbeatTimeout %gs): killing it",
                child.name,
                child.pid,
                silence,
                timeout,
            )
            os.kill(child.pid, signal.SIGKILL)
            child.reap()
            killed.append(child)
    return killed
