"""`senseflow who` against a real InfluxDB 1.x holding points made by the real encoder.

Datagrams go through the worker's own pipeline (parse, enrich, encode), their line protocol
into influxd; the ground truth is the same events applied directly to a SessionState.
"""

from __future__ import annotations

import json
import random
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from senseflow.cli import main
from shared.config import config_from_document
from shared.events import ACTIONS, RawBatch, UserEvent
from shared.sessions import SessionState, iso_time, session_event
from tests.localservers import InfluxServer
from workers.pipeline import EventPipeline

T0 = 1_790_000_000 * 10**9  # 2026-09-21
SECOND = 10**9
APPS = {
    "3a64c6ff-94b3-4d4b-9b4e-8a6a8b6f1a11": "Sales, EMEA",
    "5c3e1f0a-1111-4a2b-9c3d-0123456789ab": 'Ops "daily"',
}
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/119.0.0.0 Safari/537.36"
)
USERS = [
    ("LAB", "anna"),
    ("LAB", "Bob Smith"),
    ("MY DIR", "o'brien, jr"),
    ("LAB", "x=1\\"),
    ("DOM\\SUB", "carl"),
]


def document(server: InfluxServer, db: str, max_idle: int) -> dict[str, Any]:
    return {
        "Butler-SOS": {
            "influxdbConfig": {
                "enable": True,
                "host": server.host,
                "port": server.port,
                "v1Config": {"dbName": db, "retentionPolicy": {"name": "autogen"}},
            }
        },
        "senseflow": {"sessions": {"maxIdle": max_idle}},
    }


def datagram(action: str, host: str, user: tuple[str, str], app_id: str = "") -> bytes:
    source = "qseow-proxy-session" if "session" in action else "qseow-proxy-connection"
    context = f"/app/{app_id}?reloadUri=x" if app_id else "/hub"
    message = f"{action} for user '{user[0]}\\{user[1]}' UserAgent: {CHROME}"
    return f"/{source}/;{host};{action};{user[0]};{user[1]};AppAccess;{context};{message}".encode()


class Story:
    """Datagrams in, points in InfluxDB, and the live state they make."""

    def __init__(self, server: InfluxServer, db: str, max_idle: int, tmp_path: Path) -> None:
        self.server, self.db = server, db
        self.config_doc = document(server, db, max_idle)
        self.pipeline = EventPipeline(config_from_document(self.config_doc, {}), APPS)
        self.events: list[UserEvent] = []
        self.config_file = tmp_path / "config.yaml"
        self.config_file.write_text(yaml.safe_dump(self.config_doc))
        self.max_idle_ns = max_idle * SECOND
        self.write: Callable[[str, bytes], None] = server.write

    def send(self, datagrams: list[tuple[int, bytes]]) -> None:
        raw = RawBatch([d for _, d in datagrams], [t for t, _ in datagrams])
        batch = self.pipeline.process_batch(raw)
        assert batch.counters["events"] == len(datagrams)
        self.write(self.db, batch.lines)
        for received_ns, data in datagrams:
            event = self.pipeline.event_or_reason(data, received_ns)
            assert isinstance(event, UserEvent)
            self.events.append(event)

    def truth(self, at_ns: int, *where: str | None) -> dict[str, Any]:
        state = SessionState(self.max_idle_ns)
        for event in self.events:
            if event.received_ns <= at_ns:
                state.apply(session_event(event, ACTIONS.index(event.command)))
        return state.snapshot(at_ns, *where)

    def who(self, capsys: pytest.CaptureFixture[str], *args: str) -> str:
        assert main(["who", "--config", str(self.config_file), *args]) == 0
        return capsys.readouterr().out


@pytest.fixture
def story(influx_server: InfluxServer, influx_db: str, tmp_path: Path) -> Story:
    return Story(influx_server, influx_db, 3600, tmp_path)


def test_who_at_a_past_time_equals_the_live_state(
    story: Story, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(7)
    hosts, apps = ["SENSE1", "SENSE2", "sense3"], [*APPS, ""]
    sent = [
        (
            T0 + i * SECOND + rng.randrange(1000),
            datagram(rng.choice(ACTIONS), rng.choice(hosts), rng.choice(USERS), rng.choice(apps)),
        )
        for i in range(600)
    ]
    story.send(sent)
    for seconds in (59, 300, 599, 1000):  # the last one is after every event
        at = T0 + seconds * SECOND
        shown = json.loads(story.who(capsys, "--at", iso_time(at), "--json"))
        assert shown["at"] == iso_time(at)
        assert shown == story.truth(at)
        assert shown["totals"]["users"] > 0


def test_exact_names_filters_and_table(story: Story, capsys: pytest.CaptureFixture[str]) -> None:
    sales, ops = APPS
    story.send(
        [
            (T0, datagram("Start session", "SENSE1", USERS[3])),
            (T0 + 1, datagram("Open connection", "SENSE1", USERS[3], sales)),
            (T0 + 2, datagram("Open connection", "SENSE2", USERS[2], ops)),  # implicit start
            (T0 + 3, datagram("Start session", "SENSE2", ("lab", "ANNA"))),
            (T0 + 4, datagram("Open connection", "SENSE2", USERS[0], sales)),  # same user
        ]
    )
    at = iso_time(T0 + 10 * SECOND)
    shown = json.loads(story.who(capsys, "--at", at, "--json"))
    assert shown["totals"] == {"sessions": 3, "users": 3, "connections": 3}
    user = shown["hosts"][0]["active"][0]
    assert (user["userDirectory"], user["userId"], user["browser"], user["os"]) == (
        "LAB",
        "x=1\\",
        "Chrome 119",
        "Windows 10",
    )
    assert user["apps"] == [
        {"appId": sales, "appName": "Sales, EMEA", "connections": 1, "since": iso_time(T0 + 1)}
    ]
    anna = shown["hosts"][1]["active"][0]
    assert (anna["userDirectory"], anna["userId"]) == ("lab", "ANNA")  # as first seen
    only = json.loads(story.who(capsys, "--at", at, "--json", "--app", "sales, emea"))
    assert only == story.truth(T0 + 10 * SECOND, None, None, "sales, emea")
    assert [h["host"] for h in only["hosts"]] == ["SENSE1", "SENSE2"]
    table = story.who(capsys, "--at", at, "--host", "sense2", "--user", "MY DIR\\O'BRIEN, JR")
    assert table.splitlines()[0].endswith(": 1 users, 1 sessions, 1 connections")
    assert "MY DIR\\o'brien, jr" in table and 'Ops "daily"' in table


def test_events_older_than_max_idle_are_not_replayed(
    story: Story, capsys: pytest.CaptureFixture[str]
) -> None:
    story.send(
        [
            (T0, datagram("Start session", "SENSE1", USERS[0])),
            (T0 + 1800 * SECOND, datagram("Start session", "SENSE1", USERS[1])),
        ]
    )
    at = T0 + 3600 * SECOND  # anna idle for exactly maxIdle: expired
    shown = json.loads(story.who(capsys, "--at", iso_time(at), "--json"))
    assert [u["userId"] for u in shown["hosts"][0]["active"]] == ["Bob Smith"]
    assert shown == story.truth(at)


def test_a_session_begun_before_the_window_counts_from_the_first_event_in_it(
    story: Story, capsys: pytest.CaptureFixture[str]
) -> None:
    sales = next(iter(APPS))
    story.send(
        [
            (T0, datagram("Start session", "SENSE1", USERS[0])),
            (T0 + 1, datagram("Start session", "SENSE1", USERS[0])),
            (T0 + 1800 * SECOND, datagram("Open connection", "SENSE1", USERS[0], sales)),
        ]
    )
    at = T0 + 3601 * SECOND
    shown = json.loads(story.who(capsys, "--at", iso_time(at), "--json"))
    (anna,) = shown["hosts"][0]["active"]
    assert (anna["sessions"], anna["since"]) == (1, iso_time(T0 + 1800 * SECOND))
    live = story.truth(at)["hosts"][0]["active"][0]
    assert (live["sessions"], live["since"]) == (2, iso_time(T0))


def test_unreachable_influxdb_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"Butler-SOS": {"influxdbConfig": {"port": 1}}}))
    assert main(["who", "--config", str(config), "--at", "2026-11-29T10:42:00Z"]) == 1
    assert capsys.readouterr().err.startswith("senseflow: who: cannot reach InfluxDB")


class AuthInfluxServer(InfluxServer):
    """influxd with authentication on (the session's test server runs without)."""

    def _config_text(self) -> str:
        return super()._config_text().replace("auth-enabled = false", "auth-enabled = true")


def as_admin(server: InfluxServer, path: str, params: dict[str, str], body: bytes) -> None:
    query = urllib.parse.urlencode({"u": "admin", "p": "adm1n", **params})
    request = urllib.request.Request(f"{server.url}{path}?{query}", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status in (200, 204)


def test_who_reads_with_credentials(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with AuthInfluxServer(tmp_path / "influxd") as server:
        server.query("CREATE USER admin WITH PASSWORD 'adm1n' WITH ALL PRIVILEGES")
        for statement in (
            "CREATE DATABASE sense",
            "CREATE USER reader WITH PASSWORD 'rëad:er'",
            "GRANT READ ON sense TO reader",
        ):
            as_admin(server, "/query", {"q": statement}, b"")
        story = Story(server, "sense", 3600, tmp_path)
        story.write = lambda db, lines: as_admin(
            server, "/write", {"db": db, "precision": "ns"}, lines
        )
        story.send([(T0, datagram("Start session", "SENSE1", USERS[1]))])
        at = T0 + SECOND
        for password, code in (("rëad:er", 0), ("wrong", 1)):
            auth = {"enable": True, "username": "reader", "password": password}
            story.config_doc["Butler-SOS"]["influxdbConfig"]["v1Config"]["auth"] = auth
            story.config_file.write_text(yaml.safe_dump(story.config_doc))
            args = ["who", "--config", str(story.config_file), "--at", iso_time(at), "--json"]
            assert main(args) == code
            out, err = capsys.readouterr()
            if code == 0:
                assert json.loads(out) == story.truth(at)
            else:
                where = f"{server.host}:{server.port}"
                assert err == f"senseflow: who: InfluxDB at {where} answered 401\n"
