"""`/metrics` (Prometheus) and `/healthz`, served by the supervisor.

A small HTTP server thread, started only when `senseflow.metricsPort` (or
`--metrics-port`) is > 0. Every scrape reads the supervisor's summed counters (a copy of
the dict: one C-level operation under the GIL), the channels' fill in bytes, and the
`Telemetry` the supervisor keeps from the children's reports. Nothing is computed per
event here; scrapes cost the same at 10 or 100,000 events per second.

Metrics (counters are cumulative since start; `*_total` per Prometheus conventions):

    senseflow_datagrams_received_total                 UDP datagrams read from the socket
    senseflow_datagrams_queued_total                   handed to the workers
    senseflow_datagrams_invalid_total{reason}          not a user event (SPEC 1), by reason
    senseflow_datagrams_dropped_total{reason}          too_large, source_not_allowed,
                                                       rate_limited, queue_full, kernel,
                                                       worker_crash (held by a killed worker),
                                                       spool_corrupt (spool records, not
                                                       datagrams, unreadable on disk)
    senseflow_events_parsed_total                      valid user events
    senseflow_events_excluded_total                    valid, but the user is excluded
    senseflow_events_written_total{destination}        acknowledged by the destination
    senseflow_events_failed_total{destination}         rejected by the destination (4xx)
    senseflow_events_dropped_total{destination,reason} given up for one destination
                                                       (destination_full: its spool backlog
                                                       passed the bound, oldest dropped)
    senseflow_destination_retries_total{destination}   failed attempts that were retried
    senseflow_events_recovered_total{destination}      left in the spool by a previous run
    senseflow_mqtt_republished_total                   re-sent after a reconnect (QoS 1)
    senseflow_other_events_total{counter}              any other internal counter
    senseflow_queue_bytes{queue}                       bytes waiting in a channel
                                                       (raw: readers -> workers,
                                                       encoded: workers -> writer)
    senseflow_queue_capacity_bytes{queue}              the channel's capacity
    senseflow_destination_pending_events{destination}  taken by the writer, not yet acked
    senseflow_destination_waiting_seconds{destination} acked nothing while events waited
    senseflow_destination_healthy{destination}         0 when stalled past healthDeadline
    senseflow_delivery_latency_seconds{destination}    histogram: receive -> acknowledgement
    senseflow_delivered_batch_events{destination}      histogram: events per acked batch
    senseflow_child_up{child}                          1 while the process runs
    senseflow_child_restarts_total{child}              restarts after a crash
    senseflow_child_crash_looping{child}               1 while it restarted 5 times in 5 min
    senseflow_healthy                                  1 when /healthz answers 200
    senseflow_spool_bytes, senseflow_spool_capacity_bytes  the writer's spool on disk, its bound
    senseflow_instance_info{senseflow_instance,instance_index,instances}  always 1: which
                                                       instance this is (`senseflow.instance`);
                                                       the target labels themselves come from
                                                       the scrape config, as usual
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from senseflow.backpressure import Backpressure
from senseflow.httpserver import HttpLimits, HttpServer, Request, Response
from senseflow.telemetry import Histogram, Telemetry
from shared import counternames as names
from shared.config import Config, Pipeline, instance_name
from shared.counternames import DROP_REASONS
from shared.delivery import BATCH_BUCKETS, LATENCY_BUCKETS
from shared.ipc import Channels
from workers.parse import INVALID_REASONS

log = logging.getLogger("senseflow.metrics")

_PLAIN = {
    names.RECEIVED: ("senseflow_datagrams_received", "UDP datagrams read from the socket"),
    names.QUEUED: ("senseflow_datagrams_queued", "Datagrams handed to the workers"),
    names.EVENTS: ("senseflow_events_parsed", "Valid user events parsed by the workers"),
    names.EXCLUDED: (
        "senseflow_events_excluded",
        "Valid events dropped because the user is excluded",
    ),
    names.MQTT_REPUBLISHED: (
        "senseflow_mqtt_republished",
        "MQTT messages re-sent after a reconnect",
    ),
}
_BY_LABEL = {
    names.INVALID: ("senseflow_datagrams_invalid", "Invalid datagrams, by reason", "reason"),
    names.DROPPED: (
        "senseflow_datagrams_dropped",
        "Datagrams dropped unparsed, by reason",
        "reason",
    ),
}
_PER_DESTINATION = {
    names.WRITTEN: ("senseflow_events_written", "Events acknowledged by the destination"),
    names.FAILED: ("senseflow_events_failed", "Events the destination rejected"),
    names.RETRIES: ("senseflow_destination_retries", "Failed write attempts that were retried"),
    names.RECOVERED: (
        "senseflow_events_recovered",
        "Events a previous run left in the spool, delivered by this run",
    ),
}


class Observed(Protocol):
    """What the observers (this collector, the InfluxDB stats) read from the supervisor."""

    config: Config
    totals: dict[str, int]
    signals: list[int]
    channels: Channels
    telemetry: Telemetry
    backpressure: Backpressure

    def destinations(self) -> list[str]: ...


class SenseflowCollector:
    def __init__(self, supervisor: Observed) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        totals = dict(self.supervisor.totals)
        destinations = self.supervisor.destinations()
        yield from counter_metrics(totals, destinations)
        yield from queue_metrics(self.supervisor.channels)
        yield from telemetry_metrics(self.supervisor, destinations)
        yield instance_info(self.supervisor.config.pipeline)


def instance_info(pipe: Pipeline) -> GaugeMetricFamily:
    info = GaugeMetricFamily(
        "senseflow_instance_info",
        "Which senseflow instance this is (senseflow.instance), always 1",
        labels=["senseflow_instance", "instance_index", "instances"],
    )
    info.add_metric([instance_name(pipe), str(pipe.instance_index), str(pipe.instances)], 1)
    return info


def counter_metrics(totals: dict[str, int], destinations: list[str]) -> Iterator[Metric]:
    used: set[str] = set()
    for key, (name, text) in _PLAIN.items():
        yield CounterMetricFamily(name, text, value=totals.get(key, 0))
        used.add(key)
    defaults = {names.INVALID: INVALID_REASONS, names.DROPPED: DROP_REASONS}
    for prefix, (name, text, label) in _BY_LABEL.items():
        family = CounterMetricFamily(name, text, labels=[label])
        for value, count in labelled(totals, prefix, defaults[prefix], used):
            family.add_metric([value], count)
        yield family
    for prefix, (name, text) in _PER_DESTINATION.items():
        family = CounterMetricFamily(name, text, labels=["destination"])
        for value, count in labelled(totals, prefix, destinations, used):
            family.add_metric([value], count)
        yield family
    yield destination_drops(totals, destinations, used)
    other = CounterMetricFamily(
        "senseflow_other_events", "Other internal counters, by name", labels=["counter"]
    )
    for key in sorted(totals.keys() - used):
        other.add_metric([key], totals[key])
    yield other


def destination_drops(
    totals: dict[str, int], destinations: list[str], used: set[str]
) -> CounterMetricFamily:
    """`dropped.<reason>.<destination>`: events given up for one destination (spool full)."""
    values = {(names.DESTINATION_FULL, d): 0 for d in destinations}
    for key, count in totals.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == names.DROPPED:
            values[(parts[1], parts[2])] = count
            used.add(key)
    family = CounterMetricFamily(
        "senseflow_events_dropped",
        "Events given up for one destination, by reason",
        labels=["destination", "reason"],
    )
    for (reason, destination), count in sorted(values.items()):
        family.add_metric([destination, reason], count)
    return family


def labelled(
    totals: dict[str, int], prefix: str, defaults: tuple[str, ...] | list[str], used: set[str]
) -> list[tuple[str, int]]:
    """(label value, count) for every `prefix.<value>` counter; `defaults` show as 0."""
    values = dict.fromkeys(defaults, 0)
    for key, count in totals.items():
        head, dot, rest = key.partition(".")
        if head == prefix and dot and "." not in rest:
            values[rest] = count
            used.add(key)
    return sorted(values.items())


def queue_metrics(channels: Channels) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        "senseflow_queue_bytes", "Bytes waiting in a channel", labels=["queue"]
    )
    capacity = GaugeMetricFamily(
        "senseflow_queue_capacity_bytes", "Capacity of a channel in bytes", labels=["queue"]
    )
    for name, channel in (("raw", channels.raw), ("encoded", channels.encoded)):
        depth.add_metric([name], channel.pending_bytes())
        capacity.add_metric([name], channel.capacity)
    yield depth
    yield capacity


def telemetry_metrics(supervisor: Observed, destinations: list[str]) -> Iterator[Metric]:
    telemetry = supervisor.telemetry
    children, statuses = telemetry.snapshot()
    health = telemetry.health(draining=bool(supervisor.signals))
    yield from destination_gauges(statuses, health.destinations)
    yield histogram(
        "senseflow_delivery_latency_seconds",
        "Receive time to destination acknowledgement",
        LATENCY_BUCKETS,
        {d: s.latency for d, s in statuses.items()},
    )
    yield histogram(
        "senseflow_delivered_batch_events",
        "Events per batch acknowledged by a destination",
        BATCH_BUCKETS,
        {d: s.batches for d, s in statuses.items()},
    )
    up = GaugeMetricFamily("senseflow_child_up", "1 while the child process runs", labels=["child"])
    restarts = CounterMetricFamily(
        "senseflow_child_restarts", "Restarts of a child after it died", labels=["child"]
    )
    looping = GaugeMetricFamily(
        "senseflow_child_crash_looping",
        "1 while the child restarted 5 times within 5 minutes",
        labels=["child"],
    )
    for child in children:
        up.add_metric([child.name], 1 if child.alive else 0)
        restarts.add_metric([child.name], child.restarts)
        looping.add_metric([child.name], 1 if child.crash_looping else 0)
    yield up
    yield restarts
    yield looping
    yield GaugeMetricFamily(
        "senseflow_healthy", "1 when /healthz answers 200", value=1 if health.healthy else 0
    )
    spool = telemetry.spool_sizes()
    if spool is not None:
        yield GaugeMetricFamily(
            "senseflow_spool_bytes", "Bytes in the writer's spool on disk", value=spool["bytes"]
        )
        yield GaugeMetricFamily(
            "senseflow_spool_capacity_bytes", "The spool's bound in bytes", value=spool["capacity"]
        )


def destination_gauges(
    statuses: dict[str, Any], details: dict[str, dict[str, Any]]
) -> Iterator[Metric]:
    pending = GaugeMetricFamily(
        "senseflow_destination_pending_events",
        "Events taken by the writer and not yet acknowledged",
        labels=["destination"],
    )
    waiting = GaugeMetricFamily(
        "senseflow_destination_waiting_seconds",
        "Seconds without acknowledgement while events waited",
        labels=["destination"],
    )
    healthy = GaugeMetricFamily(
        "senseflow_destination_healthy",
        "0 when events waited longer than healthDeadline without acknowledgement",
        labels=["destination"],
    )
    for name in statuses:
        detail = details.get(name, {"pending": 0, "waiting_seconds": 0.0, "stalled": False})
        pending.add_metric([name], detail["pending"])
        waiting.add_metric([name], detail["waiting_seconds"])
        healthy.add_metric([name], 0 if detail["stalled"] else 1)
    yield pending
    yield waiting
    yield healthy


def histogram(
    name: str, text: str, bounds: tuple[float, ...], per_destination: dict[str, Histogram]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, text, labels=["destination"])
    for destination, hist in per_destination.items():
        cumulative, buckets = 0, []
        for bound, count in zip([*bounds, float("inf")], hist.buckets, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", cumulative))
        family.add_metric([destination], buckets, hist.total)
    return family


class MetricsServer:
    """`/metrics` and `/healthz` on the supervisor's HTTP server; `stop()` shuts it down."""

    def __init__(
        self, supervisor: Observed, host: str, port: int, limits: HttpLimits | None = None
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SenseflowCollector(supervisor))
        self.supervisor = supervisor
        self.http = HttpServer(host, port, limits)
        self.http.route("/metrics", self.metrics_answer)
        self.http.route("/healthz", self.health_answer, public=True)
        self.http.route("/health", self.health_answer, public=True)
        self.port = self.http.port

    def start(self) -> None:
        self.http.start()
        log.info(
            "metrics on http://%s:%d/metrics, health on /healthz%s",
            self.http.address[0],
            self.port,
            " (credentials required but for /healthz)" if self.http.limits.auth_required else "",
        )

    def stop(self) -> None:
        self.http.stop()

    def metrics(self) -> bytes:
        return generate_latest(self.registry)

    def metrics_answer(self, request: Request) -> Response:
        return Response(200, CONTENT_TYPE_PLAIN_0_0_4, self.metrics())

    def health_answer(self, request: Request) -> Response:
        health = self.supervisor.telemetry.health(draining=bool(self.supervisor.signals))
        body = json.dumps(health.as_dict()).encode()
        return Response(200 if health.healthy else 503, "application/json", body)
