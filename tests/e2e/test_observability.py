"""Issue 6 end to end: /metrics and /healthz of a running service, Butler SOS's queue
metrics and event counts in a real InfluxDB, `appender-xml` and `check-config`."""

from __future__ import annotations

import socket
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from senseflow.commands.corpus import make_corpus
from senseflow.commands.send import send
from tests.e2e.conftest import StartService
from tests.e2e.harness import REPO, SENSEFLOW, Service, influx_count, udp_port, write_config
from tests.e2e.observe import health, metrics_flags, scrape, series_sum, value, wait_for
from tests.localservers import InfluxServer, MosquittoServer, free_ports
from workers.parse import parse_datagram

pytestmark = pytest.mark.slow

QUEUE_FIELDS = {
    "queue_size", "queue_max_size", "queue_utilization_pct", "queue_running", "queue_pending",
    "messages_received", "messages_queued", "messages_processed", "messages_failed",
    "messages_dropped_total", "messages_dropped_rate_limit", "messages_dropped_queue_full",
    "messages_dropped_size", "processing_time_avg_ms", "processing_time_p95_ms",
    "processing_time_max_ms", "rate_limit_current", "backpressure_active",
}  # fmt: skip
STATS = {
    "userEvents": {"udpServerConfig": {"queueMetrics": {"influxdb": {
        "enable": True, "writeFrequency": 300, "tags": [{"name": "qs_env", "value": "stats"}],
    }}}},
    "qlikSenseEvents": {
        "influxdb": {"enable": True, "writeFrequency": 300},
        "eventCount": {"enable": True, "influxdb": {"tags": [{"name": "dc", "value": "lab"}]}},
    },
}  # fmt: skip


def outcomes(datagrams: list[bytes]) -> Counter[str]:
    """What the parser says each datagram is: 'event' or 'invalid.<reason>'."""
    result: Counter[str] = Counter()
    for datagram in datagrams:
        parsed = parse_datagram(datagram, 1)
        result[f"invalid.{parsed}" if isinstance(parsed, str) else "event"] += 1
    return result


def test_metrics_count_exactly_what_was_sent(start_service: StartService) -> None:
    port, keys = metrics_flags()
    service = start_service(**keys)
    datagrams = make_corpus(20_000, seed=6, invalid_share=0.05)
    expected = outcomes(datagrams)
    events = expected["event"]
    sent = send(("127.0.0.1", service.udp_port), datagrams, rate=25_000, count=len(datagrams))  # type: ignore[attr-defined]
    assert sent.sent == len(datagrams) and not sent.errors

    def delivered() -> Any:
        samples = scrape(port)
        written = [
            value(samples, "senseflow_events_written_total", destination=d)
            for d in ("influxdb", "mqtt")
        ]
        parsed = value(samples, "senseflow_events_parsed_total")
        # Latency histograms arrive in the writer's reports (every 0.5 s), after the counts.
        timed = [
            value(samples, "senseflow_delivery_latency_seconds_count", destination=d)
            for d in ("influxdb", "mqtt")
        ]
        done = written == [events, events] == timed and parsed == events
        return samples if done else None

    samples = wait_for(delivered, 30, "every event parsed and written to both destinations")
    assert value(samples, "senseflow_datagrams_received_total") == len(datagrams)
    assert value(samples, "senseflow_datagrams_queued_total") == len(datagrams)
    assert value(samples, "senseflow_events_parsed_total") == events
    for key, count in expected.items():
        if key != "event":
            reason = key.removeprefix("invalid.")
            assert value(samples, "senseflow_datagrams_invalid_total", reason=reason) == count
    for reason in ("too_large", "source_not_allowed", "rate_limited", "queue_full", "kernel"):
        assert value(samples, "senseflow_datagrams_dropped_total", reason=reason) == 0
    for destination in ("influxdb", "mqtt"):
        assert value(samples, "senseflow_events_failed_total", destination=destination) == 0
        latency = ("senseflow_delivery_latency_seconds_count", {"destination": destination})
        batches = ("senseflow_delivered_batch_events_sum", {"destination": destination})
        assert value(samples, latency[0], **latency[1]) == events
        assert value(samples, batches[0], **batches[1]) == events
    for child in ("reader-0", "worker-0", "worker-1", "writer"):
        assert value(samples, "senseflow_child_up", child=child) == 1
        assert value(samples, "senseflow_child_restarts_total", child=child) == 0
    assert health(port)[0] == 200
    assert service.terminate() == 0


def test_healthz_turns_unhealthy_while_influxdb_is_down(tmp_path: Path) -> None:
    port, keys = metrics_flags()
    with InfluxServer() as influx:
        influx.create_database("health")
        udp = udp_port()
        config = write_config(
            tmp_path / "config.yaml", udp, influx, "health", None, healthDeadline=1.5, **keys
        )
        service = Service(config, tmp_path / "senseflow.log")
        try:
            service.wait_running()
            assert wait_for(lambda: health(port)[0] == 200, 10, "healthy at start")
            influx.stop()
            datagrams = make_corpus(500, seed=8, formats="a")
            send(("127.0.0.1", udp), datagrams, rate=5_000, count=len(datagrams))

            def unhealthy_with_all_waiting() -> tuple[int, dict[str, Any]] | None:
                status, body = health(port)
                waiting = body["destinations"]["influxdb"]["pending"]
                return (status, body) if status == 503 and waiting == len(datagrams) else None

            _, body = wait_for(unhealthy_with_all_waiting, 15, "503 while InfluxDB is down")
            assert any(reason.startswith("influxdb: ") for reason in body["reasons"]), body
            assert value(scrape(port), "senseflow_destination_healthy", destination="influxdb") == 0
            influx.start()
            wait_for(lambda: health(port)[0] == 200, 20, "healthy again once InfluxDB is back")
            assert influx_count(influx, "health") == len(datagrams)
            assert service.terminate() == 0
        finally:
            service.stop()


def test_queue_metrics_and_event_counts_reach_influxdb(
    start_service: StartService, influx_server: InfluxServer, influx_db: str
) -> None:
    service = start_service(mqtt=False, butler_overrides=STATS)
    datagrams = make_corpus(3_000, seed=9, invalid_share=0.1)
    events = outcomes(datagrams)["event"]
    send(("127.0.0.1", service.udp_port), datagrams, rate=20_000, count=len(datagrams))  # type: ignore[attr-defined]
    service.wait_counter("written.influxdb", events)

    def total(query: str) -> float:
        return series_sum(influx_server, influx_db, query)

    wait_for(
        lambda: total('SELECT sum("counter") FROM "event_count"') == len(datagrams),
        15,
        "event counts add up to every datagram sent",
    )
    wait_for(
        lambda: total('SELECT sum("messages_received") FROM "user_events_queue"') == len(datagrams),
        15,
        "queue metrics count every datagram received",
    )
    assert total('SELECT sum("messages_processed") FROM "user_events_queue"') == len(datagrams)

    keys = influx_server.query('SHOW FIELD KEYS FROM "user_events_queue"', db=influx_db)
    fields = dict(keys["results"][0]["series"][0]["values"])
    assert set(fields) == QUEUE_FIELDS
    assert set(fields.values()) == {"float"}  # as Butler SOS writes to InfluxDB 1.x
    assert tag_keys(influx_server, influx_db, "user_events_queue") == {
        "queue_type",
        "host",
        "senseflow_instance",
        "qs_env",
    }
    assert tag_keys(influx_server, influx_db, "event_count") == {
        "event_type",
        "source",
        "host",
        "subsystem",
        "senseflow_instance",
        "dc",
    }
    assert per_source_host_subsystem(influx_server, influx_db) == expected_counts(datagrams)


def tag_keys(influx: InfluxServer, database: str, measurement: str) -> set[str]:
    answer = influx.query(f'SHOW TAG KEYS FROM "{measurement}"', db=database)
    return {row[0] for row in answer["results"][0]["series"][0]["values"]}


def per_source_host_subsystem(influx: InfluxServer, database: str) -> dict[tuple[str, ...], int]:
    answer = influx.query(
        'SELECT sum("counter") FROM "event_count" WHERE "event_type" = \'user\' '
        'GROUP BY "source", "host", "subsystem"',
        db=database,
    )
    return {
        (s["tags"]["source"], s["tags"]["host"], s["tags"]["subsystem"]): int(s["values"][0][1])
        for s in answer["results"][0]["series"]
    }


def expected_counts(datagrams: list[bytes]) -> dict[tuple[str, ...], int]:
    counts: Counter[tuple[str, ...]] = Counter()
    for datagram in datagrams:
        event = parse_datagram(datagram, 1)
        key = (
            ("Unknown",) * 3
            if isinstance(event, str)
            else (event.message_type, event.host, event.origin)
        )
        counts[key] += 1
    return dict(counts)


def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*SENSEFLOW, *args], input=stdin, capture_output=True, cwd=REPO, timeout=60, check=False
    )


def test_appender_xml_configures_datagrams_that_parse() -> None:
    answer = cli("appender-xml", "--host", "senseflow.example.com", "--port", "9997")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.startswith(b'<?xml version="1.0" encoding="UTF-8"?>')
    root = ET.fromstring(answer.stdout)
    values = {
        "%hostname": "sense1.example.com", "%property{Command}": "Start session",
        "%property{UserDirectory}": "LAB", "%property{UserId}": "anna.berg",
        "%property{Origin}": "AppAccess", "%property{Context}": "/hub/",
        "%message": "Start session for user 'LAB\\anna.berg'; UserAgent: Mozilla/5.0",
    }  # fmt: skip
    lines = []
    for appender in root.findall("appender"):
        layout = appender.find("layout")
        assert layout is not None
        pattern = next(
            p.get("value") for p in layout.findall("param") if p.get("name") == "conversionpattern"
        )
        assert pattern is not None
        for placeholder, text in values.items():
            pattern = pattern.replace(placeholder, text)
        lines.append(pattern.encode("utf-8"))
    parsed = cli("parse", "--format", "json", stdin=b"\n".join(lines) + b"\n")
    assert parsed.returncode == 0, parsed.stderr
    events = [orjson.loads(line) for line in parsed.stdout.splitlines()]
    assert len(events) == 2, parsed.stdout
    for event in events:
        text = orjson.dumps(event).decode()
        assert "sense1.example.com" in text and "anna.berg" in text and "invalid" not in text


def test_check_config_reports_a_stopped_destination(
    tmp_path: Path, influx_server: InfluxServer, influx_db: str, mosquitto_server: MosquittoServer
) -> None:
    good = write_config(tmp_path / "good.yaml", 9997, influx_server, influx_db, mosquitto_server)
    answer = cli("check-config", str(good))
    text = answer.stdout.decode()
    assert answer.returncode == 0, text
    influx_line = next(line for line in text.splitlines() if line.startswith("influxdb: "))
    assert influx_line.startswith("influxdb: ok: InfluxDB 1.")
    assert influx_line.endswith(f'at {influx_server.url}, database "{influx_db}": write permitted')
    assert "mqtt: ok: MQTT broker" in text and "newrelic: ok: disabled" in text

    stopped = InfluxServer(port=free_ports(1)[0])  # configured, never started: nothing listens
    bad = write_config(tmp_path / "bad.yaml", 9997, stopped, "db", mosquitto_server)
    answer = cli("check-config", str(bad), "--timeout", "5")
    lines = answer.stdout.decode().splitlines()
    assert answer.returncode == 4, lines
    assert lines[0] == f"config: ok ({bad})"
    assert lines[1].startswith(f"influxdb: FAILED: cannot connect to InfluxDB at {stopped.url}: ")
    assert lines[2].startswith("mqtt: ok: ")
    stopped.close()

    broken = tmp_path / "broken.yaml"
    broken.write_text("senseflow:\n  workers: none\n", encoding="utf-8")
    answer = cli("check-config", str(broken))
    assert answer.returncode == 2
    assert answer.stdout.decode().startswith(
        "config: FAILED: senseflow.workers: expected an integer"
    )


def test_a_metrics_port_in_use_stops_the_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "config.yaml", udp_port(), None, "", None,
                              metricsPort=port, metricsHost="127.0.0.1")  # fmt: skip
        service = Service(config, tmp_path / "senseflow.log")
        try:
            assert service.process.wait(30) == 3  # exitcodes.BIND_ERROR, before any child
            assert f"cannot serve metrics on 127.0.0.1:{port}" in service.log
            assert "started writer" not in service.log
        finally:
            service.stop()
