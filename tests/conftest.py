"""Real servers for tests: one InfluxDB 1.x and one Mosquitto per test session.

Both are started on first use and always stopped at the end of the session, also when
tests fail. A test that needs to stop or restart a server starts its own instance.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.localservers import InfluxServer, MosquittoServer


@pytest.fixture(scope="session")
def influx_server() -> Iterator[InfluxServer]:
    with InfluxServer() as server:
        yield server


@pytest.fixture(scope="session")
def mosquitto_server() -> Iterator[MosquittoServer]:
    with MosquittoServer() as server:
        yield server


@pytest.fixture
def influx_db(influx_server: InfluxServer) -> Iterator[str]:
    """A new, empty database on the session's InfluxDB; dropped afterwards."""
    name = f"test_{uuid.uuid4().hex}"
    influx_server.create_database(name)
    yield name
    if influx_server.running:
        influx_server.query(f'DROP DATABASE "{name}"')
