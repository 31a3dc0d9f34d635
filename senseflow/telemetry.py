"""What the supervisor knows beyond the counters: delivery, latency, event counts, children.

Filled by the supervisor's main thread (`record` from the children's reports,
`observe_children` once per loop) and read by the `/metrics` / `/healthz` thread and the
InfluxDB statistics thread; one lock guards it. Nothing here touches a child process:
`observe_children` gets plain values from the main thread, which alone reaps children.

## The health rule (`/healthz`)

Healthy (200) when all of these hold, else unhealthy (503) with the reasons:

1. the service is not draining (no SIGTERM/SIGINT received);
2. every child (readers, workers, writer) is alive and has reported ready;
3. with at least one destination, the writer reported its delivery status within the
   last `healthDeadline` seconds (a wedged writer stops reporting);
4. no child is crash-looping: restarted CRASH_LOOP_RESTARTS (5) times within the last
   CRASH_LOOP_WINDOW (300) seconds, however far apart the supervisor's backoff put them;
5. no destination is *stalled*: events wait for it (taken by the writer, not yet
   acknowledged nor counted failed) and it acknowledged nothing for more than
   `healthDeadline` seconds (`senseflow.healthDeadline`, default 30).

A destination that is down while nothing waits for it does not make the service
unhealthy: the first event that waits starts its clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from shared.config import Config
from shared.delivery import BATCH_BUCKETS, LATENCY_BUCKETS

log = logging.getLogger("senseflow.supervisor")

CRASH_LOOP_RESTARTS = 5
CRASH_LOOP_WINDOW = 300.0


@dataclass
class Histogram:
    """Cumulative since start: per-bucket counts (last is +Inf), sum, count."""

    buckets: list[int]
    total: float = 0.0
    count: int = 0

    @classmethod
    def empty(cls, bounds: tuple[float, ...]) -> Histogram:
        return cls([0] * (len(bounds) + 1))

    def add(self, delta: dict[str, Any]) -> None:
        for index, value in enumerate(delta["buckets"]):
            self.buckets[index] += value
        self.total += delta["sum"]
        self.count += delta["count"]

    def copy(self) -> Histogram:
        return Histogram(list(self.buckets), self.total, self.count)


@dataclass
class ChildStatus:
    name: str
    pid: int | None
    alive: bool
    ready: bool
    restarts: int = 0
    restart_times: list[float] = field(default_factory=list)
    crash_looping: bool = False


@dataclass
class DestinationStatus:
    pending: int = 0
    waiting: float = 0.0
    latency: Histogram = field(default_factory=lambda: Histogram.empty(LATENCY_BUCKETS))
    batches: Histogram = field(default_factory=lambda: Histogram.empty(BATCH_BUCKETS))


@dataclass
class Health:
    healthy: bool
    reasons: list[str]
    destinations: dict[str, dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        status = "ok" if self.healthy else "unhealthy"
        return {"status": status, "reasons": self.reasons, "destinations": self.destinations}


class Telemetry:
    def __init__(
        self,
        config: Config,
        destinations: Iterable[str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.deadline = config.pipeline.health_deadline
        self.clock = clock
        self.lock = threading.Lock()
        self.destinations = {d: DestinationStatus() for d in destinations}
        self.delivery_seen = clock()
        self.interval_max_latency = 0.0
        self.event_counts: dict[tuple[str, str, str], int] = {}
        self.children: dict[str, ChildStatus] = {}
        self.spool: dict[str, int] | None = None  # {"bytes", "capacity"} of the writer's spool

    # -- main thread ------------------------------------------------------------------------

    def record(self, kind: str, payload: Any) -> None:
        """A "delivery" report of the writer or an "event_counts" report of a worker."""
        with self.lock:
            if kind == "delivery":
                self._record_delivery(payload)
            elif kind == "event_counts":
                for key, count in payload.items():
                    self.event_counts[key] = self.event_counts.get(key, 0) + count

    def _record_delivery(self, payload: dict[str, Any]) -> None:
        self.delivery_seen = self.clock()
        self.spool = payload["spool"]
        for name, report in payload["destinations"].items():
            status = self.destinations.setdefault(name, DestinationStatus())
            status.pending = report["pending"]
            status.waiting = report["waiting"]
            status.latency.add(report["latency"])
            status.batches.add(report["batches"])
            self.interval_max_latency = max(self.interval_max_latency, report["latency"]["max"])

    def observe_children(self, children: Iterable[tuple[str, int | None, bool, bool]]) -> None:
        """(name, pid, alive, ready) per child; a new pid of a known child is a restart."""
        with self.lock:
            for name, pid, alive, ready in children:
                known = self.children.get(name)
                if known is None:
                    self.children[name] = ChildStatus(name, pid, alive, ready)
                    continue
                if pid is not None and pid != known.pid:
                    if known.pid is not None:  # a first spawn is no restart
                        known.restarts += 1
                        known.restart_times.append(self.clock())
                    if name == "writer":
                        self.delivery_seen = self.clock()  # a new writer gets a fresh clock
                known.pid, known.alive, known.ready = pid, alive, ready
                self._watch_crash_loop(known)

    def _watch_crash_loop(self, child: ChildStatus) -> None:
        """CRASH_LOOP_RESTARTS restarts within CRASH_LOOP_WINDOW, whatever the supervisor's
        backoff (capped, it spaces restarts out under its own storm guard): say so loudly."""
        window_start = self.clock() - CRASH_LOOP_WINDOW
        child.restart_times = [t for t in child.restart_times if t >= window_start]
        looping = len(child.restart_times) >= CRASH_LOOP_RESTARTS
        if looping and not child.crash_looping:
            log.error(
                "%s is crash-looping: %d restarts in the last %.0f s; /healthz answers 503 "
                "until it stays up; see its error above",
                child.name,
                len(child.restart_times),
                CRASH_LOOP_WINDOW,
            )
        elif child.crash_looping and not looping:
            log.warning("%s stopped crash-looping", child.name)
        child.crash_looping = looping

    # -- any thread -------------------------------------------------------------------------

    def snapshot(self) -> tuple[list[ChildStatus], dict[str, DestinationStatus]]:
        with self.lock:
            children = [
                ChildStatus(**vars(c) | {"restart_times": list(c.restart_times)})
                for c in self.children.values()
            ]
            destinations = {
                name: DestinationStatus(s.pending, s.waiting, s.latency.copy(), s.batches.copy())
                for name, s in self.destinations.items()
            }
        return children, destinations

    def spool_sizes(self) -> dict[str, int] | None:
        with self.lock:
            return self.spool

    def take_event_counts(self) -> dict[tuple[str, str, str], int]:
        with self.lock:
            counts, self.event_counts = self.event_counts, {}
        return counts

    def restore_event_counts(self, counts: dict[tuple[str, str, str], int]) -> None:
        """Counts that could not be written go back, to be written next time."""
        self.record("event_counts", counts)

    def take_interval_max_latency(self) -> float:
        with self.lock:
            value, self.interval_max_latency = self.interval_max_latency, 0.0
        return value

    def health(self, draining: bool) -> Health:
        now = self.clock()
        reasons = ["draining: stopping on a signal"] if draining else []
        with self.lock:
            for child in self.children.values():
                self._watch_crash_loop(child)
                if child.crash_looping:
                    reasons.append(
                        f"{child.name} is crash-looping ({len(child.restart_times)} restarts "
                        f"in {CRASH_LOOP_WINDOW:.0f} s)"
                    )
                if not child.alive:
                    reasons.append(f"{child.name} is not running")
                elif not child.ready:
                    reasons.append(f"{child.name} is not ready")
            silent = now - self.delivery_seen
            if self.destinations and silent > self.deadline:
                reasons.append(f"writer: no delivery report for {silent:.0f} s")
            details = {}
            for name, status in self.destinations.items():
                waiting = status.waiting + silent if status.pending else 0.0
                stalled = bool(status.pending) and waiting > self.deadline
                details[name] = {
                    "pending": status.pending,
                    "waiting_seconds": round(waiting, 1),
                    "stalled": stalled,
                }
                if stalled:
                    reasons.append(
                        f"{name}: {status.pending} event(s) waiting, nothing acknowledged for "
                        f"{waiting:.0f} s (deadline {self.deadline:g} s)"
                    )
        return Health(not reasons, reasons, details)
