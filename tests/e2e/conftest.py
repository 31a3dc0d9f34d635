from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import Service, Subscriber, udp_port, write_config
from tests.localservers import InfluxServer, MosquittoServer

StartService = Callable[..., Service]


@pytest.fixture
def start_service(
    tmp_path: Path, influx_server: InfluxServer, influx_db: str, mosquitto_server: MosquittoServer
) -> Iterator[StartService]:
    """Start `senseflow run` against the session's InfluxDB and Mosquitto; always stopped."""
    started: list[Service] = []

    def start(
        *flags: str,
        influx: bool = True,
        mqtt: bool = True,
        butler_overrides: dict[str, Any] | None = None,
        **pipeline: Any,
    ) -> Service:
        port = udp_port()
        config = write_config(
            tmp_path / f"config-{len(started)}.yaml",
            port,
            influx_server if influx else None,
            influx_db,
            mosquitto_server if mqtt else None,
            butler_overrides=butler_overrides,
            **pipeline,
        )
        service = Service(config, tmp_path / f"senseflow-{len(started)}.log", *flags)
        service.udp_port = port  # type: ignore[attr-defined]
        started.append(service)
        service.wait_running()
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture
def subscriber(tmp_path: Path, mosquitto_server: MosquittoServer) -> Iterator[Subscriber]:
    sub = Subscriber(mosquitto_server, "qliksense/#", tmp_path / "mqtt.txt")
    yield sub
    sub.stop()
