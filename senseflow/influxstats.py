"""Butler SOS's own statistics in InfluxDB: the user-event queue metrics and event counts.

Which process writes them: the supervisor, from a thread of its own. It alone holds the
summed counters of every process, the channels' fill and the latency deltas; the writer
sees only its own share. Routing these few points through the writer would need a
channel from the supervisor to the writer (data flows one way only) and would queue them
behind up to `pendingEvents` user events exactly when InfluxDB is slow, which is when
queue metrics matter. So: one small line-protocol POST per interval (stdlib HTTP, no
event loop), isolated from the event path; a failed write is logged (rate-limited) and,
unless InfluxDB refused it with a 4xx (which may be a partial write), its counts are kept
for the next attempt.

What Butler SOS writes, and where we read it (github.com/ptarmiganlabs/butler-sos):

- Queue metrics (`src/lib/influxdb/shared/queue-metrics-builder.js` QUEUE_METRIC_FIELDS,
  `src/lib/influxdb/v1/queue-metrics.js`, `src/lib/udp-queue-manager.js` getMetrics):
  measurement `userEvents.udpServerConfig.queueMetrics.influxdb.measurementName`
  (default `user_events_queue`), tags `queue_type=user_events`, `host=<our host name>`
  and the configured tags, every `writeFrequency` ms. Counters cover the interval since
  the previous write (Butler SOS clears them after each write). Fields, and ours:

      queue_size                   datagrams queued for the workers, not yet parsed
      queue_max_size               raw channel capacity / 512 bytes (the sizing estimate)
      queue_utilization_pct        raw channel fill in bytes, percent (exact)
      queue_running                events the writer holds, not yet acknowledged (max over
                                   destinations); also as queue_pending, its older name
      messages_received            datagrams read
      messages_queued              datagrams handed to the workers
      messages_processed           datagrams the workers finished (events, excluded, invalid)
      messages_failed              events a destination rejected (sum of failed.*)
      messages_dropped_total       all drops (incl. source_not_allowed and kernel)
      messages_dropped_rate_limit  dropped.rate_limited
      messages_dropped_queue_full  dropped.queue_full
      messages_dropped_size        dropped.too_large
      processing_time_avg_ms       delivery latency (receive -> acknowledgement), mean
      processing_time_p95_ms       ... 95th percentile (interpolated in the histogram)
      processing_time_max_ms       ... maximum
      rate_limit_current           datagrams per minute over the interval (0 unless the
                                   rate limit is enabled, as in Butler SOS)
      backpressure_active          1 from messageQueue.backpressureThreshold % fill (or any
                                   queue-full drop) until the fill is below 80 % of it, at
                                   any time in the interval (the supervisor's one tracker,
                                   senseflow/backpressure.py)

- Event counts (`src/lib/influxdb/v1/event-counts.js`, `src/lib/udp-event.js`): measurement
  `qlikSenseEvents.eventCount.influxdb.measurementName` (default `event_count`), one point
  per (source, host, subsystem) with tags `event_type=user`, `source`, `host`,
  `subsystem` and the configured tags, field `counter`; written every
  `qlikSenseEvents.influxdb.writeFrequency` ms when `qlikSenseEvents.influxdb.enable` and
  `qlikSenseEvents.eventCount.enable`, counts since the previous write.

Ours on top, on both measurements: the tag `senseflow_instance=<senseflow.instance>` (like
Butler SOS's own `butler_sos_instance` on its other measurements), so that several
instances, even on one host, write separate series; Butler SOS's dashboards group by the
tags above and ignore it.

Field types follow Butler SOS per InfluxDB version: its 1.x writer (node-influx, no schema)
stores every number as a float, its 2.x/3.x writers use integer fields where the builder
says `int`; an existing database therefore gets no field-type conflict.
"""

from __future__ import annotations

import base64
import logging
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from senseflow.telemetry import Histogram
from shared import counternames as names
from shared import influxql
from shared.config import Config, NameValue, instance_name, redact
from shared.counters import total
from shared.delivery import LATENCY_BUCKETS
from shared.ipc import RAW_BYTES_PER_DATAGRAM
from shared.logs import RateLimitedLog
from shared.tls import client_context, scheme
from workers.encode import escape_tag
from workers.eventcount import event_counts_enabled

if TYPE_CHECKING:
    from senseflow.metrics import Observed

log = logging.getLogger("senseflow.influxstats")

REQUEST_TIMEOUT = 10.0
FINAL_TIMEOUT = 3.0
QUEUE_TYPE = "user_events"
INSTANCE_TAG = "senseflow_instance"
FLOAT_FIELDS = frozenset(
    {
        "queue_utilization_pct",
        "processing_time_avg_ms",
        "processing_time_p95_ms",
        "processing_time_max_ms",
    }
)


class StatsWriteError(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def retryable(self) -> bool:
        """No answer, 5xx, 408 or 429. Any other 4xx may have written part of the body
        (InfluxDB's "partial write"), and sending it again would not help anyway."""
        return self.status is None or self.status >= 500 or self.status in (408, 429)


class InfluxTarget:
    """Where and how to POST line protocol, for InfluxDB 1.x, 2.x and 3.x."""

    def __init__(self, config: Config) -> None:
        cfg = config.butler.influxdb_config
        self.config = config
        self.version = cfg.version
        tls = config.pipeline.influx_tls
        self.base = f"{scheme(tls)}://{cfg.host}:{cfg.port}"
        self.tls_error = ""
        try:
            self.context = client_context(tls)
        except OSError as exc:  # ssl.SSLError is one; fail closed: system trust only
            self.tls_error = f"cannot load senseflow.influxTls files: {exc}"
            log.error("InfluxDB statistics: %s", self.tls_error)
            self.context = ssl.create_default_context()
        self.headers = {"Content-Type": "text/plain; charset=utf-8"}
        if cfg.version == 1:
            v1 = cfg.v1_config
            params = {"db": v1.db_name, "precision": "ns"}
            if v1.retention_policy.name:
                params["rp"] = v1.retention_policy.name
            if v1.auth.enable:
                pair = f"{v1.auth.username}:{v1.auth.password}".encode()
                self.headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
            self.database = v1.db_name
            self.policy = v1.retention_policy
            self.url = f"{self.base}/write?{urllib.parse.urlencode(params)}"
        else:
            token = cfg.v2_config.token if cfg.version == 2 else cfg.v3_config.token
            params = (
                {"org": cfg.v2_config.org, "bucket": cfg.v2_config.bucket}
                if cfg.version == 2
                else {"bucket": cfg.v3_config.database}
            )
            self.headers["Authorization"] = f"Token {token}"
            query = urllib.parse.urlencode({**params, "precision": "ns"})
            self.url = f"{self.base}/api/v2/write?{query}"
        self.created = False

    def post(self, body: bytes, timeout: float = REQUEST_TIMEOUT) -> None:
        try:
            self.send(self.url, body, timeout)
        except StatsWriteError as exc:
            if self.version != 1 or self.created or "database not found" not in str(exc):
                raise
            self.created = True  # as the sink does at start: the database may not exist yet
            self.create_database(timeout)
            self.send(self.url, body, timeout)

    def create_database(self, timeout: float) -> None:
        """As the sink does: the configured retention policy becomes the default of a
        database we create, so queries that name no policy see the points."""
        statements = [influxql.create_database(self.database)]
        if influxql.names_a_policy(self.policy):
            statements.append(influxql.create_policy(self.database, self.policy, default=True))
        for statement in statements:
            query = urllib.parse.urlencode({"q": statement}).encode()
            self.send(f"{self.base}/query", query, timeout, form=True)
        log.info("InfluxDB: created the database %s (%s)", self.database, "; ".join(statements))

    def send(self, url: str, body: bytes, timeout: float, form: bool = False) -> None:
        headers = dict(self.headers)
        if form:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        request = urllib.request.Request(url, data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self.context) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                text = exc.read().decode("utf-8", "replace")[:300]
            message = redact(f"HTTP {exc.code}: {text.strip()}", self.config)
            raise StatsWriteError(message, exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            raise StatsWriteError(redact(f"{self.base}: {exc}", self.config)) from exc


# -- line protocol -------------------------------------------------------------------------


def measurement(name: str) -> str:
    return name.replace(",", "\\,").replace(" ", "\\ ")


def tag_text(tags: list[tuple[str, str]]) -> str:
    pairs = ((escape_tag(k), escape_tag(v)) for k, v in tags)
    return "".join(f",{k}={v}" for k, v in pairs if k and v)


def field_text(fields: dict[str, float], integers: bool) -> str:
    """Butler SOS's types: floats on 1.x; on 2.x/3.x ints except FLOAT_FIELDS."""
    parts = []
    for key, value in fields.items():
        if key in FLOAT_FIELDS or not integers:
            parts.append(f"{escape_tag(key)}={float(value)!r}")
        else:
            parts.append(f"{escape_tag(key)}={int(value)}i")
    return ",".join(parts)


def point(
    name: str, tags: list[tuple[str, str]], fields: dict[str, float], integers: bool, now_ns: int
) -> bytes:
    return f"{measurement(name)}{tag_text(tags)} {field_text(fields, integers)} {now_ns}\n".encode()


def config_tags(tags: list[NameValue] | None) -> list[tuple[str, str]]:
    return [(t.name, t.value) for t in tags or []]


# -- queue metrics -------------------------------------------------------------------------


def quantile(bounds: tuple[float, ...], buckets: list[int], q: float, maximum: float) -> float:
    """The q-quantile of a histogram, interpolated linearly within its bucket."""
    count = sum(buckets)
    if not count:
        return 0.0
    rank, cumulative, lower = q * count, 0, 0.0
    for index, in_bucket in enumerate(buckets):
        upper = bounds[index] if index < len(bounds) else maximum
        if in_bucket and cumulative + in_bucket >= rank:
            value = lower + (max(upper, lower) - lower) * (rank - cumulative) / in_bucket
            return min(value, maximum) if maximum > 0 else value
        cumulative += in_bucket
        lower = upper
    return maximum


def merged_latency(statuses: dict[str, Any]) -> Histogram:
    merged = Histogram.empty(LATENCY_BUCKETS)
    for status in statuses.values():
        hist = status.latency
        merged.add({"buckets": hist.buckets, "sum": hist.total, "count": hist.count})
    return merged


class QueueMetrics:
    """Butler SOS's user-event queue fields over the interval since the last `fields()`."""

    def __init__(self, supervisor: Observed, clock: Callable[[], float] = time.monotonic) -> None:
        self.supervisor = supervisor
        self.clock = clock
        udp = supervisor.config.butler.user_events.udp_server_config
        self.rate_limited = udp.rate_limit.enable
        self.previous: dict[str, int] = {}
        self.previous_latency = Histogram.empty(LATENCY_BUCKETS)
        self.previous_time = clock()

    def fields(self) -> dict[str, float]:
        totals = dict(self.supervisor.totals)
        delta = {k: v - self.previous.get(k, 0) for k, v in totals.items()}
        self.previous = totals
        now = self.clock()
        elapsed, self.previous_time = max(now - self.previous_time, 1e-3), now
        raw = self.supervisor.channels.raw
        utilization = 100.0 * raw.pending_bytes() / raw.capacity
        processed = (
            totals.get(names.EVENTS, 0)
            + totals.get(names.EXCLUDED, 0)
            + total(totals, names.INVALID)
            + totals.get(names.DROPPED_WORKER_CRASH, 0)
        )
        _, statuses = self.supervisor.telemetry.snapshot()
        running = max((s.pending for s in statuses.values()), default=0)
        return {
            "queue_size": max(0, totals.get(names.QUEUED, 0) - processed),
            "queue_max_size": raw.capacity // RAW_BYTES_PER_DATAGRAM,
            "queue_utilization_pct": round(utilization, 2),
            "queue_running": running,
            "queue_pending": running,  # the field's name in Butler SOS before the builder
            "messages_received": delta.get(names.RECEIVED, 0),
            "messages_queued": delta.get(names.QUEUED, 0),
            "messages_processed": delta.get(names.EVENTS, 0)
            + delta.get(names.EXCLUDED, 0)
            + total(delta, names.INVALID),
            "messages_failed": total(delta, names.FAILED),
            "messages_dropped_total": total(delta, names.DROPPED),
            "messages_dropped_rate_limit": delta.get(names.DROPPED_RATE_LIMITED, 0),
            "messages_dropped_queue_full": delta.get(names.DROPPED_QUEUE_FULL, 0),
            "messages_dropped_size": delta.get(names.DROPPED_TOO_LARGE, 0),
            **self.processing_times(statuses),
            "rate_limit_current": round(delta.get(names.RECEIVED, 0) / elapsed * 60)
            if self.rate_limited
            else 0,
            "backpressure_active": int(self.supervisor.backpressure.take_active()),
        }

    def processing_times(self, statuses: dict[str, Any]) -> dict[str, float]:
        latency = merged_latency(statuses)
        previous = self.previous_latency.buckets
        buckets = [a - b for a, b in zip(latency.buckets, previous, strict=True)]
        count = latency.count - self.previous_latency.count
        seconds = latency.total - self.previous_latency.total
        self.previous_latency = latency
        maximum = self.supervisor.telemetry.take_interval_max_latency()
        p95 = quantile(LATENCY_BUCKETS, buckets, 0.95, maximum)
        return {
            "processing_time_avg_ms": round(seconds / count * 1000, 3) if count else 0.0,
            "processing_time_p95_ms": round(p95 * 1000, 3),
            "processing_time_max_ms": round(maximum * 1000, 3),
        }


# -- the thread ----------------------------------------------------------------------------


class InfluxStats:
    """Writes the queue metrics and event counts on their own schedules; `stop()` writes
    once more (so the last interval's counts are not lost) and joins."""

    def __init__(self, supervisor: Observed) -> None:
        config = supervisor.config
        butler = config.butler
        self.supervisor = supervisor
        self.target = InfluxTarget(config)
        self.integers = butler.influxdb_config.version != 1
        self.host = socket.gethostname()
        self.instance = instance_name(config.pipeline)
        queue = butler.user_events.udp_server_config.queue_metrics.influxdb
        self.queue = queue if queue.enable and butler.influxdb_config.enable else None
        self.queue_metrics = QueueMetrics(supervisor)
        self.counts = butler.qlik_sense_events if event_counts_enabled(config) else None
        self.failures = RateLimitedLog(log, interval=60.0)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="influx-stats")

    @property
    def enabled(self) -> bool:
        return self.queue is not None or self.counts is not None

    def start(self) -> None:
        self.thread.start()
        if self.queue is not None:
            log.info(
                "queue metrics to InfluxDB measurement %s every %d ms",
                self.queue.measurement_name,
                self.queue.write_frequency,
            )
        if self.counts is not None:
            log.info(
                "event counts to InfluxDB measurement %s every %d ms",
                self.counts.event_count.influxdb.measurement_name,
                self.counts.influxdb.write_frequency,
            )

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(2 * FINAL_TIMEOUT + 5)

    def run(self) -> None:
        schedule = self.schedule()
        due = {name: time.monotonic() + every for name, every in schedule.items()}
        while not self.stopping.wait(max(0.0, min(due.values()) - time.monotonic())):
            now = time.monotonic()
            for name in [n for n, at in due.items() if at <= now]:
                self.write(name, REQUEST_TIMEOUT)
                due[name] = now + schedule[name]
        for name in schedule:
            self.write(name, FINAL_TIMEOUT)

    def schedule(self) -> dict[str, float]:
        schedule = {}
        if self.queue is not None:
            schedule["queue"] = max(self.queue.write_frequency, 100) / 1000
        if self.counts is not None:
            schedule["counts"] = max(self.counts.influxdb.write_frequency, 100) / 1000
        return schedule

    def write(self, name: str, timeout: float) -> None:
        if name == "queue":
            self.write_queue_metrics(timeout)
        else:
            self.write_event_counts(timeout)

    def write_queue_metrics(self, timeout: float) -> None:
        assert self.queue is not None
        tags = [
            ("queue_type", QUEUE_TYPE),
            ("host", self.host),
            (INSTANCE_TAG, self.instance),
            *config_tags(self.queue.tags),
        ]
        body = point(
            self.queue.measurement_name,
            tags,
            self.queue_metrics.fields(),
            self.integers,
            time.time_ns(),
        )
        try:
            self.target.post(body, timeout)
        except StatsWriteError as exc:
            self.failures.warning("cannot write queue metrics to InfluxDB: %s", exc)

    def write_event_counts(self, timeout: float) -> None:
        assert self.counts is not None
        counts = self.supervisor.telemetry.take_event_counts()
        if not counts:
            return
        influx = self.counts.event_count.influxdb
        extra = config_tags(influx.tags)
        series: dict[str, int] = {}  # two keys may escape to one series: add them up
        for (source, host, subsystem), count in counts.items():
            tags = [
                ("event_type", "user"),
                ("source", source),
                ("host", host),
                ("subsystem", subsystem),
                (INSTANCE_TAG, self.instance),
                *extra,
            ]
            key = measurement(influx.measurement_name) + tag_text(tags)
            series[key] = series.get(key, 0) + count
        now = time.time_ns()
        body = "".join(
            f"{key} {field_text({'counter': count}, self.integers)} {now}\n"
            for key, count in sorted(series.items())
        ).encode()
        try:
            self.target.post(body, timeout)
        except StatsWriteError as exc:
            if not exc.retryable:
                self.failures.warning("InfluxDB refused event counts (not sent again): %s", exc)
                return
            self.supervisor.telemetry.restore_event_counts(counts)
            self.failures.warning("cannot write event counts to InfluxDB (kept for later): %s", exc)
