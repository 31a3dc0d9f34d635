"""What the writer knows about delivery, aggregated there and reported as deltas.

The writer's feeds call `DeliveryTracker.delivered(destination, received_ns)` once per
batch their sink acknowledged (never per event over IPC). The tracker turns that into
histogram deltas of the end-to-end latency (receive time stamped by the reader ->
destination acknowledgement) and of batch sizes, and tells, per destination, how many
events wait and for how long nothing was acknowledged while they did (the `/healthz`
rule). `take_report()` is sent
to the supervisor as a `"delivery"` report every report interval.

Cost: one `sorted()` of the batch's receive times (nearly sorted already: timsort is
linear on that) plus one bisect per bucket bound, per batch.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from shared import counternames as names
from shared.config import Config
from shared.counters import Counting

LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
"""Upper bounds (seconds) of the delivery latency histogram; +Inf is implied."""

BATCH_BUCKETS: tuple[float, ...] = (1, 10, 100, 500, 1000, 2500, 5000, 10000, 50000)
"""Upper bounds (events) of the delivered-batch size histogram; +Inf is implied."""

_LATENCY_BOUNDS_NS = tuple(int(b * 1e9) for b in LATENCY_BUCKETS)


class HistogramDelta:
    """Per-bucket counts (not cumulative; last one is +Inf), sum, count and max."""

    __slots__ = ("buckets", "count", "max", "total")

    def __init__(self, size: int) -> None:
        self.buckets = [0] * (size + 1)
        self.total = 0.0
        self.count = 0
        self.max = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"buckets": self.buckets, "sum": self.total, "count": self.count, "max": self.max}


def observe_latencies(hist: HistogramDelta, received_ns: Sequence[int], now_ns: int) -> None:
    """Add one latency per receive time: `now_ns - received_ns[i]`, in seconds."""
    times = sorted(received_ns)
    n = len(times)
    previous = 0
    for index, bound in enumerate(_LATENCY_BOUNDS_NS):
        at_most = n - bisect_left(times, now_ns - bound)  # latency <= bound
        hist.buckets[index] += at_most - previous
        previous = at_most
    hist.buckets[-1] += n - previous
    hist.total += max(0, n * now_ns - sum(times)) / 1e9
    hist.count += n
    hist.max = max(hist.max, (now_ns - times[0]) / 1e9)


def observe_value(hist: HistogramDelta, bounds: tuple[float, ...], value: float) -> None:
    hist.buckets[bisect_left(bounds, value)] += 1  # first bound >= value
    hist.total += value
    hist.count += 1
    hist.max = max(hist.max, value)


def make_tracker(
    config: Config, destinations: Iterable[str], counters: Counting
) -> DeliveryTracker:
    return DeliveryTracker(destinations, counters)


class DeliveryTracker:
    """Writer side: latency and batch histograms per destination, and who is stuck.

    An event is *waiting* for a destination from the moment the writer takes it until the
    destination counts it `written.<d>`, `failed.<d>` or `dropped.<reason>.<d>`
    (once, however many New Relic accounts it goes to). With a spool, `use_spool(spool)`
    replaces that estimate by the spool's own count of unacknowledged events per
    destination, which also covers the backlog a new writer replays from a previous run.
    """

    def __init__(
        self,
        destinations: Iterable[str],
        counters: Counting,
        clock: Callable[[], float] = time.monotonic,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.destinations = list(destinations)
        self.counters = counters
        self.clock = clock
        self.wall_ns = wall_ns
        self.accepted = 0
        self.spool: Any = None
        self.latency = {d: HistogramDelta(len(LATENCY_BUCKETS)) for d in self.destinations}
        self.batches = {d: HistogramDelta(len(BATCH_BUCKETS)) for d in self.destinations}
        now = clock()
        self.done_seen = dict.fromkeys(self.destinations, 0)
        self.last_progress = dict.fromkeys(self.destinations, now)

    def use_spool(self, spool: Any) -> None:
        """Count the events waiting per destination in `spool` (a workers.writer.spool.Spool:
        its unacknowledged records), and report its size."""
        self.spool = spool

    def accept(self, events: int) -> None:
        """The writer took `events` more events; every destination gets all of them."""
        self.accepted += events

    def delivered(self, destination: str, received_ns: Sequence[int]) -> None:
        """One acknowledged batch: the receive times of its delivered events."""
        if not received_ns or destination not in self.latency:
            return
        observe_latencies(self.latency[destination], received_ns, self.wall_ns())
        observe_value(self.batches[destination], BATCH_BUCKETS, len(received_ns))

    def done(self, destination: str) -> int:
        """Events resolved for a destination: written, failed, or dropped for it."""
        values = self.counters.snapshot()
        suffix = f".{destination}"
        prefix = names.DROPPED + "."
        dropped = sum(v for k, v in values.items() if k.startswith(prefix) and k.endswith(suffix))
        written = values.get(names.written(destination), 0)
        return written + values.get(names.failed(destination), 0) + dropped

    def pending(self, destination: str, done: int) -> int:
        if self.spool is not None:
            spool = self.spool
            return sum(spool.events_in(seq) for seq in spool.pending(destination))
        return max(0, self.accepted - done)

    def status(self, destination: str) -> tuple[int, float]:
        """(events waiting, seconds without any acknowledgement while they waited)."""
        now = self.clock()
        done = self.done(destination)
        pending = self.pending(destination, done)
        if done != self.done_seen[destination] or pending == 0:
            self.done_seen[destination] = done
            self.last_progress[destination] = now
        return pending, (now - self.last_progress[destination]) if pending else 0.0

    def take_report(self) -> dict[str, Any]:
        """Histogram deltas since the last call and the waiting status, per destination;
        the spool's size and bound (None without a spool)."""
        destinations = {}
        for d in self.destinations:
            pending, waiting = self.status(d)
            destinations[d] = {
                "latency": self.latency[d].as_dict(),
                "batches": self.batches[d].as_dict(),
                "pending": pending,
                "waiting": waiting,
            }
            self.latency[d] = HistogramDelta(len(LATENCY_BUCKETS))
            self.batches[d] = HistogramDelta(len(BATCH_BUCKETS))
        spool = self.spool
        sizes = (
            None if spool is None else {"bytes": spool.size_bytes(), "capacity": spool.max_bytes}
        )
        return {"destinations": destinations, "spool": sizes}
