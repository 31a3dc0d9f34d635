"""Start-up failures are clear and named: a busy port, an unreachable destination."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from shared import exitcodes
from tests.e2e.harness import Service, influx_count, send_paced, udp_port, write_config
from tests.localservers import InfluxServer, MosquittoServer, free_ports

pytestmark = pytest.mark.slow


def test_busy_udp_port_exits_with_bind_error(
    tmp_path: Path, influx_server: InfluxServer, influx_db: str
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        port = squatter.getsockname()[1]
        config = write_config(tmp_path / "c.yaml", port, influx_server, influx_db)
        service = Service(config, tmp_path / "log")
        try:
            assert service.process.wait(60) == exitcodes.BIND_ERROR
            assert service.lingering_pids() == []  # before stop() kills what is left
        finally:
            service.stop()
    assert f"cannot bind UDP 127.0.0.1:{port}: Address already in use" in service.log


def test_unreachable_influxdb_exits_with_a_clear_message(tmp_path: Path) -> None:
    closed_port = free_ports(1)[0]
    fake = InfluxServer.__new__(InfluxServer)  # only host/port are read by write_config
    fake.host, fake.port = "127.0.0.1", closed_port
    config = write_config(tmp_path / "c.yaml", udp_port(), fake, "db", startupTimeout=2)
    service = Service(config, tmp_path / "log")
    try:
        assert service.process.wait(60) == exitcodes.DESTINATION_UNREACHABLE
        assert service.lingering_pids() == []  # before stop() kills what is left
    finally:
        service.stop()
    assert f"cannot reach InfluxDB at http://127.0.0.1:{closed_port}" in service.log


def test_unreachable_broker_exits_with_a_clear_message(tmp_path: Path) -> None:
    closed_port = free_ports(1)[0]
    fake = MosquittoServer.__new__(MosquittoServer)
    fake.host, fake.port = "127.0.0.1", closed_port
    config = write_config(tmp_path / "c.yaml", udp_port(), broker=fake, startupTimeout=2)
    service = Service(config, tmp_path / "log")
    try:
        assert service.process.wait(60) == exitcodes.DESTINATION_UNREACHABLE
        assert service.lingering_pids() == []  # before stop() kills what is left
    finally:
        service.stop()
    assert f"cannot reach MQTT broker 127.0.0.1:{closed_port}" in service.log


def test_wait_policy_starts_once_influxdb_appears(tmp_path: Path) -> None:
    influx = InfluxServer(tmp_path / "influx")  # not started yet: its port is closed
    port = udp_port()
    config = write_config(
        tmp_path / "c.yaml", port, influx, "waited", onUnreachable="wait", startupTimeout=1
    )
    service = Service(config, tmp_path / "log")
    try:
        service.wait_for_log("waiting for it")
        assert service.process.poll() is None
        influx.start()
        service.wait_running(timeout=60)
        send_paced(
            port, [b"/qseow-proxy-session/;S1;Start session;LAB;joe;Proxy;/hub/;x"] * 10, 100
        )
        service.wait_counter("written.influxdb", 10)
        assert influx_count(influx, "waited") == 10
        assert service.terminate() == 0
    finally:
        service.stop()
        influx.close()
