"""senseflow/influxstats.py against a real InfluxDB 1.x (issue 12 §4)."""

from __future__ import annotations

from types import SimpleNamespace

from senseflow.influxstats import InfluxStats
from senseflow.telemetry import Telemetry
from shared.config import config_from_document
from tests.localservers import InfluxServer


def stats_for(influx_server: InfluxServer, db: str) -> InfluxStats:
    config = config_from_document(
        {
            "Butler-SOS": {
                "influxdbConfig": {
                    "enable": True,
                    "host": influx_server.host,
                    "port": influx_server.port,
                    "v1Config": {"dbName": db},
                },
                "qlikSenseEvents": {"influxdb": {"enable": True}, "eventCount": {"enable": True}},
            }
        },
        {},
    )
    supervisor = SimpleNamespace(config=config, telemetry=Telemetry(config, ["influxdb"]))
    return InfluxStats(supervisor)


def test_event_counts_are_not_posted_again_after_a_partial_write(
    influx_server: InfluxServer, influx_db: str
) -> None:
    stats = stats_for(influx_server, influx_db)
    telemetry = stats.supervisor.telemetry
    too_long = "h" * 70_000  # InfluxDB drops this one point (max key length), keeps the rest
    counts = {("qseow-proxy-session", "sense1", "Proxy"): 5, ("x", too_long, "Proxy"): 3}
    telemetry.restore_event_counts(counts)
    stats.write_event_counts(5.0)  # HTTP 400 "partial write"
    assert telemetry.take_event_counts() == {}  # nothing kept to grow or to post again
    telemetry.restore_event_counts({("qseow-proxy-session", "sense1", "Proxy"): 2})
    stats.write_event_counts(5.0)
    answer = influx_server.query('SELECT sum("counter") FROM "event_count"', influx_db)
    assert answer["results"][0]["series"][0]["values"][0][1] == 7
