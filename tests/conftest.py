"""Real servers for tests: one InfluxDB 1.x and one Mosquitto per test session.

Both are started on first use and always stopped at the end of the session, also when
tests fail. A test that needs to stop or restart a server starts its own instance.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.localservers import InfluxServer, MosquittoServer


@pytest.fixture(scope="session", autouse=True)
def private_state_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A service started without `spool.directory` spools under $STATE_DIRECTORY: keep
    that inside the session's temporary directory, never in /var/lib or the home folder."""
    before = os.environ.get("STATE_DIRECTORY")
    os.environ["STATE_DIRECTORY"] = str(tmp_path_factory.mktemp("state"))
    yield
    if before is None:
        del os.environ["STATE_DIRECTORY"]
    else:
        os.environ["STATE_DIRECTORY"] = before


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
