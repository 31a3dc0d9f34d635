"""Retained per-host session summaries on a real mosquitto (senseflow/sessionsmqtt.py): a
subscriber that comes late gets every host's current summary at once, and a host whose
users all left is replaced by zeros (a retained message stays until replaced)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from senseflow.sessions import LiveSessionsReader
from senseflow.sessionsmqtt import SessionSummaries
from shared.config import Config, config_from_document
from shared.sessionlive import encode_live, write_atomically
from shared.sessions import OPEN, START, STOP, SessionEvent, SessionState
from tests.e2e.harness import Subscriber
from tests.localservers import MosquittoServer


def config_for(broker: MosquittoServer, directory: Path, topic: str) -> Config:
    butler = {
        "mqttConfig": {"enable": True, "brokerHost": broker.host, "brokerPort": broker.port},
        "userEvents": {"sendToMQTT": {"enable": True}},
    }
    own = {"spool": {"directory": str(directory)}, "sessions": {"mqttTopic": topic}}
    return config_from_document({"Butler-SOS": butler, "senseflow": own}, {})


@pytest.fixture
def summaries(
    mosquitto_server: MosquittoServer, tmp_path: Path
) -> Iterator[tuple[SessionSummaries, SessionState]]:
    topic = f"qliksense/userevent/test-{uuid.uuid4().hex[:8]}"
    config = config_for(mosquitto_server, tmp_path, topic)
    reader = LiveSessionsReader.of(config)
    state = SessionState(86_400 * 10**9)
    now = time.time_ns()
    for i, (action, host, user, app) in enumerate(
        [(START, "S1", "ann", ""), (OPEN, "S1", "ann", "a1"), (START, "S2", "bob", "")]
    ):
        state.apply(SessionEvent(now - 10**9 + i, action, host, "LAB", user, app))
    write_atomically(reader.path, encode_live(state, [], now))
    exporter = SessionSummaries(config, reader)
    exporter.start()
    try:
        yield exporter, state
    finally:
        exporter.stop()


def retained(broker: MosquittoServer, base: str, path: Path, hosts: int) -> dict[str, Any]:
    """What a subscriber arriving now gets on `base/#`: the retained summaries."""
    deadline = time.monotonic() + 30
    while True:
        late = Subscriber(broker, "qliksense/userevent/#", path)
        try:
            found = {
                topic.rpartition("/")[2]: json.loads(payload)
                for topic, payload in late.messages()
                if topic.startswith(base + "/")
            }
        finally:
            late.stop()
        if len(found) == hosts or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_a_late_subscriber_gets_every_hosts_summary_and_zeros_for_an_emptied_host(
    mosquitto_server: MosquittoServer,
    tmp_path: Path,
    summaries: tuple[SessionSummaries, SessionState],
) -> None:
    exporter, state = summaries
    first = retained(mosquitto_server, exporter.base, tmp_path / "first.txt", 2)
    assert {h: (s["sessions"], s["connections"], s["userList"]) for h, s in first.items()} == {
        "S1": (1, 1, ["LAB\\ann"]),
        "S2": (1, 0, ["LAB\\bob"]),
    }
    assert first["S1"]["host"] == "S1" and first["S1"]["at"].endswith("Z")

    state.apply(SessionEvent(time.time_ns(), STOP, "S2", "LAB", "bob"))
    write_atomically(exporter.reader.path, encode_live(state, [], time.time_ns()))
    deadline = time.monotonic() + 30
    while (second := retained(mosquitto_server, exporter.base, tmp_path / "2.txt", 2))["S2"][
        "users"
    ]:
        assert time.monotonic() < deadline, second
    assert second["S2"] | {"at": ""} == {
        "host": "S2", "sessions": 0, "users": 0, "connections": 0, "userList": [], "at": ""
    }  # fmt: skip
    assert second["S1"]["users"] == 1
