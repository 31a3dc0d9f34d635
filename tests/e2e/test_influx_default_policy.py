"""Issue 12, 1: with Butler SOS's own config (`retentionPolicy: {name: 10d, duration: 10d}`)
against a fresh InfluxDB 1.x, queries that name no retention policy see the points: the
README's `influx -database senseops -execute 'SELECT * FROM user_events ...'` as printed."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from senseflow.commands.corpus import make_corpus
from senseflow.influxstats import InfluxTarget
from shared.config import config_from_document
from tests.e2e.harness import Service, send_paced, udp_port, write_config
from tests.localservers import InfluxServer

pytestmark = pytest.mark.slow

BUTLER_POLICY = {"name": "10d", "duration": "10d"}
README_QUERY = "SELECT * FROM user_events ORDER BY time DESC LIMIT 10"
README_ARGUMENTS = ["-database", "senseops", "-execute", README_QUERY]  # as README.md prints it
INFLUX_CLI = ["influx", "-host"]


@pytest.fixture
def fresh_influx(tmp_path: Path) -> Iterator[InfluxServer]:
    """An influxd of this test's own: no database exists yet."""
    with InfluxServer(tmp_path / "influxd") as server:
        yield server


def v1_overrides(database: str) -> dict[str, Any]:
    return {"influxdbConfig": {"v1Config": {"dbName": database, "retentionPolicy": BUTLER_POLICY}}}


def policies(influx: InfluxServer, database: str) -> dict[str, bool]:
    answer = influx.query(f'SHOW RETENTION POLICIES ON "{database}"')
    return {row[0]: row[4] for row in answer["results"][0]["series"][0]["values"]}


def test_readme_query_sees_the_events_written_with_butler_sos_policy(
    tmp_path: Path, fresh_influx: InfluxServer
) -> None:
    port = udp_port()
    config = write_config(
        tmp_path / "config.yaml",
        port,
        fresh_influx,
        "senseops",
        butler_overrides=v1_overrides("senseops"),
    )
    service = Service(config, tmp_path / "senseflow.log")
    try:
        service.wait_running()
        sent = send_paced(port, make_corpus(200, seed=12), rate=2000)
        service.wait_counter("written.influxdb", sent)
        assert service.terminate() == 0
    finally:
        service.stop()

    shown = subprocess.run(
        [*INFLUX_CLI, fresh_influx.host, "-port", str(fresh_influx.port), *README_ARGUMENTS],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert shown.startswith("name: user_events"), shown
    rows = shown.strip().splitlines()[3:]  # name, column header, dashes
    assert len(rows) == 10, shown
    assert policies(fresh_influx, "senseops") == {"autogen": False, "10d": True}
    assert "created the retention policy 10d as its default" in service.log


def test_queue_metrics_writer_creates_the_database_with_the_policy_as_default(
    fresh_influx: InfluxServer,
) -> None:
    butler = {
        "influxdbConfig": {"enable": True, "host": fresh_influx.host, "port": fresh_influx.port}
    }
    butler["influxdbConfig"] |= v1_overrides("queue_stats")["influxdbConfig"]
    target = InfluxTarget(config_from_document({"Butler-SOS": butler}, {}))

    target.post(b"user_events_queue queue_size=3 %d\n" % time.time_ns(), timeout=10.0)

    assert policies(fresh_influx, "queue_stats") == {"autogen": False, "10d": True}
    answer = fresh_influx.query("SELECT * FROM user_events_queue", db="queue_stats")
    assert answer["results"][0]["series"][0]["values"][0][1:] == [3.0]
