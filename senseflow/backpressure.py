"""Backpressure on the readers -> workers channel: one tracker per run.

The supervisor's loop updates it from the raw channel's fill and the queue-full drops and
logs when it turns on and off (as Butler SOS does); the InfluxDB queue metrics
(senseflow/influxstats.py) report `take_active()` for their interval.
"""

from __future__ import annotations

import logging

from shared.ipc import MessageChannel

log = logging.getLogger("senseflow.supervisor")


class Backpressure:
    """`messageQueue.backpressureThreshold` with Butler SOS's hysteresis: on when the raw
    queue is that % full (or dropped batches), off again below 80 % of it."""

    def __init__(self, threshold_pct: float) -> None:
        self.threshold = threshold_pct
        self.active = False
        self.active_since_taken = False
        self.queue_full_seen = 0

    def update(self, utilization_pct: float, queue_full_drops: int = 0) -> bool:
        if utilization_pct >= self.threshold or queue_full_drops:
            self.active = True
        elif utilization_pct < self.threshold * 0.8:
            self.active = False
        self.active_since_taken = self.active_since_taken or self.active
        return self.active

    def take_active(self) -> bool:
        """Whether it was on at any update since the last call (or is on now)."""
        active = self.active_since_taken or self.active
        self.active_since_taken = self.active
        return active

    def watch(self, raw: MessageChannel, queue_full_total: int) -> None:
        """Update from the channel's fill and the drops counted so far; log a change."""
        utilization = 100.0 * raw.pending_bytes() / raw.capacity
        new_drops = queue_full_total - self.queue_full_seen
        self.queue_full_seen = queue_full_total
        was_active = self.active
        if self.update(utilization, new_drops) and not was_active:
            log.warning(
                "backpressure: the workers' queue is %.0f%% full%s (threshold %s%%); "
                "add --workers if it persists",
                utilization,
                f", {new_drops} datagram(s) dropped" if new_drops else "",
                self.threshold,
            )
        elif was_active and not self.active:
            log.info("backpressure over: the workers' queue is %.0f%% full", utilization)
