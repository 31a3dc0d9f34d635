"""Units of issue 6: delivery histograms, health rule, event counts, stats line protocol,
the Prometheus collector, the appender XML and the invalid-datagram sample."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from senseflow.backpressure import Backpressure
from senseflow.commands.tools import appender_xml
from senseflow.influxstats import QueueMetrics, field_text, point, quantile
from senseflow.metrics import SenseflowCollector
from senseflow.telemetry import Telemetry
from shared.config import Config, Pipeline
from shared.counters import Counters
from shared.delivery import (
    BATCH_BUCKETS,
    LATENCY_BUCKETS,
    DeliveryTracker,
    HistogramDelta,
    observe_latencies,
    observe_value,
)
from shared.events import RawBatch
from shared.ipc import Channels, MessageChannel
from workers.eventcount import MAX_KEYS, OVERFLOW_KEY, UNKNOWN_KEY, EventCounts
from workers.samples import SAMPLE_BYTES, InvalidSample

NOW = 1_700_000_000_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- histograms ----------------------------------------------------------------------------


def test_latencies_land_in_their_buckets() -> None:
    hist = HistogramDelta(len(LATENCY_BUCKETS))
    ages = [0.0005, 0.001, 0.02, 2.0, 1000.0]
    observe_latencies(hist, [NOW - int(a * 1e9) for a in reversed(ages)], NOW)
    assert hist.count == 5
    assert hist.buckets[LATENCY_BUCKETS.index(0.001)] == 2  # 0.5 ms and exactly 1 ms
    assert hist.buckets[LATENCY_BUCKETS.index(0.025)] == 1
    assert hist.buckets[LATENCY_BUCKETS.index(2.5)] == 1
    assert hist.buckets[-1] == 1  # beyond the last bound: +Inf
    assert hist.total == pytest.approx(sum(ages))
    assert hist.max == pytest.approx(1000.0)


def test_batch_sizes_land_in_their_buckets() -> None:
    hist = HistogramDelta(len(BATCH_BUCKETS))
    for size in (1, 500, 501, 10**6):
        observe_value(hist, BATCH_BUCKETS, size)
    assert hist.buckets[BATCH_BUCKETS.index(1)] == 1
    assert hist.buckets[BATCH_BUCKETS.index(500)] == 1
    assert hist.buckets[BATCH_BUCKETS.index(1000)] == 1
    assert hist.buckets[-1] == 1


def test_quantile_interpolates_and_is_capped_by_the_maximum() -> None:
    bounds = (1.0, 2.0, 4.0)
    assert quantile(bounds, [0, 0, 0, 0], 0.95, 0.0) == 0.0
    assert quantile(bounds, [0, 10, 0, 0], 0.5, 3.0) == pytest.approx(1.5)
    assert quantile(bounds, [0, 10, 0, 0], 0.95, 1.2) == pytest.approx(1.2)
    assert quantile(bounds, [0, 0, 0, 4], 0.95, 9.0) == pytest.approx(8.8, abs=0.3)


# -- who waits -----------------------------------------------------------------------------


def test_tracker_reports_waiting_only_while_nothing_is_acknowledged() -> None:
    clock, counters = FakeClock(), Counters()
    tracker = DeliveryTracker(["influxdb", "newrelic"], counters, clock, lambda: NOW)
    assert tracker.status("influxdb") == (0, 0.0)
    tracker.accept(10)
    clock.now += 5
    assert tracker.status("influxdb") == (10, 5.0)
    assert tracker.status("newrelic") == (10, 5.0)  # once, whatever the number of accounts
    counters.add("written.influxdb", 4)
    clock.now += 1
    assert tracker.status("influxdb") == (6, 0.0)  # progress resets the clock
    clock.now += 3
    assert tracker.status("influxdb") == (6, 3.0)
    counters.add("failed.influxdb", 6)
    counters.add("written.newrelic", 10)
    assert tracker.status("influxdb") == (0, 0.0)
    assert tracker.status("newrelic") == (0, 0.0)


def test_tracker_report_carries_deltas_once() -> None:
    tracker = DeliveryTracker(["mqtt"], Counters(), FakeClock(), lambda: NOW)
    tracker.delivered("mqtt", [NOW - 10**7] * 3)
    tracker.delivered("unknown", [NOW])  # ignored, never raises
    first = tracker.take_report()
    assert first["spool"] is None
    mqtt = first["destinations"]["mqtt"]
    assert mqtt["latency"]["count"] == 3 and mqtt["batches"]["count"] == 1
    assert tracker.take_report()["destinations"]["mqtt"]["latency"]["count"] == 0


def test_health_rule() -> None:
    clock = FakeClock()
    config = Config(pipeline=Pipeline(health_deadline=10))
    telemetry = Telemetry(config, ["influxdb"], clock)
    telemetry.observe_children([("writer", 1, True, True), ("reader-0", 2, True, False)])
    assert telemetry.health(False).reasons == ["reader-0 is not ready"]
    telemetry.observe_children([("writer", 1, True, True), ("reader-0", 2, True, True)])
    assert telemetry.health(False).healthy
    assert not telemetry.health(True).healthy  # draining

    def delivery(pending: int, waiting: float) -> dict[str, Any]:
        empty = {"buckets": [0] * (len(LATENCY_BUCKETS) + 1), "sum": 0.0, "count": 0, "max": 0.0}
        batches = {**empty, "buckets": [0] * (len(BATCH_BUCKETS) + 1)}
        report = {"pending": pending, "waiting": waiting, "latency": empty, "batches": batches}
        return {"destinations": {"influxdb": report}, "spool": {"bytes": 10, "capacity": 100}}

    telemetry.record("delivery", delivery(50, 9.0))
    assert telemetry.health(False).healthy
    clock.now += 2  # the last report's age counts too
    health = telemetry.health(False)
    assert not health.healthy and "influxdb: 50 event(s) waiting" in health.reasons[0]
    telemetry.record("delivery", delivery(0, 0.0))
    assert telemetry.health(False).healthy
    clock.now += 11
    assert telemetry.health(False).reasons == ["writer: no delivery report for 11 s"]
    telemetry.observe_children([("writer", 7, False, False)])
    children, _ = telemetry.snapshot()
    writer = next(c for c in children if c.name == "writer")
    assert writer.restarts == 1 and not writer.alive


# -- event counts --------------------------------------------------------------------------


def test_event_counts_forget_an_abandoned_batch_and_stay_bounded() -> None:
    counts = EventCounts()
    counts.add("qseow-proxy-session", "sense1", "AppAccess")
    counts.begin()  # the batch was re-processed in halves: forget its first pass
    counts.add("qseow-proxy-session", "sense1", "AppAccess")
    counts.add_unknown()
    counts.commit()
    assert counts.take() == {("qseow-proxy-session", "sense1", "AppAccess"): 1, UNKNOWN_KEY: 1}
    for index in range(MAX_KEYS + 5):
        counts.add("s", f"host{index}", "x")
    counts.commit()
    taken = counts.take()
    assert len(taken) == MAX_KEYS + 1 and taken[OVERFLOW_KEY] == 5


# -- InfluxDB statistics -------------------------------------------------------------------


def test_stats_fields_take_butler_sos_types_per_influxdb_version() -> None:
    fields = {"queue_size": 3, "queue_utilization_pct": 12.5}
    assert field_text(fields, integers=False) == "queue_size=3.0,queue_utilization_pct=12.5"
    assert field_text(fields, integers=True) == "queue_size=3i,queue_utilization_pct=12.5"
    line = point("my queue", [("host", "a b"), ("env", ""), ("k,=", "v")], {"x": 1}, True, 5)
    assert line == b"my\\ queue,host=a\\ b,k\\,\\==v x=1i 5\n"  # the empty tag is left out


def test_backpressure_follows_butler_sos_hysteresis() -> None:
    threshold = Config().butler.user_events.udp_server_config.message_queue
    backpressure = Backpressure(threshold.backpressure_threshold)  # 80
    assert not backpressure.update(79.0, 0)
    assert backpressure.update(80.0, 0)
    assert backpressure.update(65.0, 0)  # stays on down to 80 % of the threshold
    assert not backpressure.update(63.9, 0)
    assert backpressure.update(0.0, 1)  # a queue-full drop is backpressure


def test_queue_metrics_report_the_supervisors_one_backpressure_tracker() -> None:
    raw = MessageChannel(1 << 20)
    backpressure = Backpressure(80)
    supervisor = SimpleNamespace(
        config=Config(),
        totals={},
        channels=SimpleNamespace(raw=raw),
        telemetry=Telemetry(Config(), []),
        backpressure=backpressure,
    )
    metrics = QueueMetrics(supervisor)
    try:
        assert metrics.fields()["backpressure_active"] == 0
        backpressure.update(0.0, 5)  # the supervisor saw queue-full drops...
        backpressure.update(0.0, 0)  # ...and the queue empty again before the next write
        assert metrics.fields()["backpressure_active"] == 1  # on during that interval
        assert metrics.fields()["backpressure_active"] == 0
    finally:
        raw.close()


# -- Prometheus ----------------------------------------------------------------------------


def test_collector_exposes_the_summed_counters() -> None:
    raw, encoded = MessageChannel(1 << 20), MessageChannel(1 << 20)
    raw.send(b"x" * 1000)
    supervisor = SimpleNamespace(
        config=Config(),
        totals={
            "received": 10,
            "events": 6,
            "invalid.unknown_source": 3,
            "dropped.kernel": 2,
            "written.influxdb": 6,
            "retries.influxdb": 4,
            "newrelic.splits": 1,
        },
        signals=[],
        channels=Channels(raw, encoded, None, None),  # type: ignore[arg-type]
        telemetry=Telemetry(Config(), ["influxdb"]),
        destinations=lambda: ["influxdb"],
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SenseflowCollector(supervisor))
    try:
        text = generate_latest(registry).decode()
    finally:
        for channel in (raw, encoded):
            channel._send.close()
            channel._recv.close()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("senseflow_datagrams_received_total", ())] == 10
    assert samples[("senseflow_datagrams_invalid_total", (("reason", "unknown_source"),))] == 3
    assert samples[("senseflow_datagrams_invalid_total", (("reason", "missing_host"),))] == 0
    assert samples[("senseflow_datagrams_dropped_total", (("reason", "kernel"),))] == 2
    assert samples[("senseflow_events_written_total", (("destination", "influxdb"),))] == 6
    assert samples[("senseflow_events_failed_total", (("destination", "influxdb"),))] == 0
    assert samples[("senseflow_destination_retries_total", (("destination", "influxdb"),))] == 4
    assert samples[("senseflow_other_events_total", (("counter", "newrelic.splits"),))] == 1
    assert samples[("senseflow_queue_bytes", (("queue", "raw"),))] >= 1000
    assert samples[("senseflow_queue_capacity_bytes", (("queue", "raw"),))] == raw.capacity
    latency_inf = (
        "senseflow_delivery_latency_seconds_bucket",
        (("destination", "influxdb"), ("le", "+Inf")),
    )
    assert samples[latency_inf] == 0


# -- operator tools and logs ---------------------------------------------------------------


def test_appender_xml_is_well_formed_even_for_odd_host_names() -> None:
    root = ET.fromstring(appender_xml('sense-flow&"<x>--', 9999).encode("utf-8"))
    appenders = root.findall("appender")
    assert [a.get("name") for a in appenders] == ["EventSession", "EventConnection"]
    for appender in appenders:
        params = {p.get("name"): p.get("value") for p in appender.findall("param")}
        assert params == {
            "remoteAddress": 'sense-flow&"<x>--',
            "remotePort": "9999",
            "encoding": "utf-8",
        }
    refs = root.findall("./logger[@name='AuditActivity.Proxy']/appender-ref")
    assert [r.get("ref") for r in refs] == ["EventSession", "EventConnection"]


def test_invalid_sample_shows_the_reason_and_a_truncated_datagram() -> None:
    long = b"/nope/;" + b"x" * 1000
    raw = RawBatch([b"/qseow-proxy-session/;h;Start session;D;u;o;c;m", long], [1, 2])
    text = str(InvalidSample(raw))
    assert text.startswith("unknown_source: b'/nope/;xxx")
    assert text.endswith(f"... ({len(long) - SAMPLE_BYTES} more bytes)")


def test_message_queue_max_size_is_the_fewest_datagrams_the_raw_queue_holds() -> None:
    from shared.config import config_from_document
    from shared.ipc import MIN_CHANNEL_BYTES, RAW_BYTES_PER_DATAGRAM, raw_channel_bytes

    def sized(max_size: int, **own: int) -> int:
        queue = {"udpServerConfig": {"messageQueue": {"maxSize": max_size}}}
        document = {"Butler-SOS": {"userEvents": queue}, "senseflow": own}
        return raw_channel_bytes(config_from_document(document, {}))

    assert sized(200) == 64 * 500 * RAW_BYTES_PER_DATAGRAM  # queueSize x readerBatchSize wins
    assert sized(100_000) == 100_000 * RAW_BYTES_PER_DATAGRAM  # maxSize wins
    assert sized(10, queueSize=1, readerBatchSize=10) == MIN_CHANNEL_BYTES
