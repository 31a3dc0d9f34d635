"""`senseflow send --sessions N`: simulated users with a known ground truth (issue 13).

N users wander across the corpus hosts: they start sessions, open and close apps (and the
hub: a connection without an app id), stop; now and then one opens an app without a Start
(an implicit start), sends a Stop twice (an unmatched stop) or a Close with nothing open
(an unmatched close). The ground truth is the session state (shared/sessions.py, the
service's own rules) of the same events in sending order, taken every `every` datagrams:
one JSON line per checkpoint, `{"sent", "at", "state", "counters"}`, `state` being the
`/api/sessions` document (times are the simulation's, not the service's: compare without
`since`, `lastSeen` and `at`).

Sent from one socket per host, so each host's events keep their order at a receiver with
one reader (the state of a host depends only on its own events).
"""

from __future__ import annotations

import random
import socket
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from senseflow.commands.corpus import APP_IDS, HOSTS, USER_AGENTS
from shared.events import ACTIONS
from shared.sessions import SessionEvent, SessionState

DIRECTORY = "SIM"
APPS: tuple[str, ...] = (*APP_IDS[:6], "")
"""A few apps, and '' for the hub (no app id)."""


def datagram(action: str, host: str, user: str, app_id: str, agent: str) -> bytes:
    source = "qseow-proxy-session" if "session" in action else "qseow-proxy-connection"
    context = f"/app/{app_id}" if app_id else "/hub"
    message = f"{action} for user '{DIRECTORY}\\{user}' UserAgent: {agent}"
    fields = (f"/{source}/", host, action, DIRECTORY, user, "AppAccess", context, message)
    return ";".join(fields).encode()


@dataclass
class Simulation:
    """Datagrams with their host's index, and the truth after each of them (on demand)."""

    users: int
    seed: int
    hosts: tuple[str, ...] = HOSTS
    truth: SessionState = field(default_factory=lambda: SessionState(86_400 * 10**9))
    _open: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    _sent: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def next(self) -> tuple[int, bytes]:
        """One more datagram, applied to the truth: (host index, datagram)."""
        rng = self.rng
        host_index = rng.randrange(len(self.hosts))
        host, user = self.hosts[host_index], f"user{rng.randrange(self.users)}"
        action, app = self._choose(host, user)
        agent = USER_AGENTS[zlib.crc32(user.encode()) % len(USER_AGENTS)]
        event = SessionEvent(self._sent, ACTIONS.index(action), host, DIRECTORY, user, app)
        self.truth.apply(event)
        self._sent += 1
        return host_index, datagram(action, host, user, app, agent)

    def _choose(self, host: str, user: str) -> tuple[str, str]:
        rng = self.rng
        apps = self._open.get((host, user))
        if apps is None:
            if rng.random() < 0.05:
                return "Stop session", ""  # unmatched
            if rng.random() < 0.1:
                app = rng.choice(APPS)
                self._open[(host, user)] = [app]
                return "Open connection", app  # an implicit start
            self._open[(host, user)] = []
            return "Start session", ""
        if apps and rng.random() < 0.4:
            return "Close connection", apps.pop(rng.randrange(len(apps)))
        if not apps and rng.random() < 0.03:
            return "Close connection", rng.choice(APPS)  # nothing open: unmatched
        if rng.random() < 0.15:
            del self._open[(host, user)]
            return "Stop session", ""
        app = rng.choice(APPS)
        apps.append(app)
        return "Open connection", app

    def checkpoint(self, at: float) -> dict[str, Any]:
        state = self.truth.snapshot(self.truth.clock_ns + 1)
        return {"sent": self._sent, "at": at, "state": state, "counters": self.truth.counters}

    def datagrams(self, count: int) -> Iterator[tuple[int, bytes]]:
        for _ in range(count):
            yield self.next()


def send_sessions(
    address: tuple[str, int],
    simulation: Simulation,
    count: int,
    rate: float,
    every: int,
    truth_path: str | None,
) -> int:
    """Send `count` datagrams at `rate`/s, one socket per host; write the truth every
    `every` datagrams and at the end. Returns how many were sent."""
    family = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_DGRAM)[0][0]
    sockets = [socket.socket(family, socket.SOCK_DGRAM) for _ in simulation.hosts]
    out = open(truth_path, "wb") if truth_path else None  # noqa: SIM115 - closed below
    start = time.perf_counter()
    sent = 0
    try:
        for sock in sockets:
            sock.connect(address)
        for host_index, data in simulation.datagrams(count):
            sockets[host_index].send(data)
            sent += 1
            if (
                rate
                and sent % 50 == 0
                and (ahead := sent / rate - (time.perf_counter() - start)) > 0
            ):
                time.sleep(ahead)
            if out is not None and (sent % every == 0 or sent == count):
                out.write(orjson.dumps(simulation.checkpoint(time.time())) + b"\n")
    finally:
        for sock in sockets:
            sock.close()
        if out is not None:
            out.close()
    return sent
