"""The live session state leaves the writer (issue 13): published by the writer only when it
changed, read by the supervisor, served as `/api/sessions` (filters, auth) and as
Prometheus gauges with an app cardinality cap and the `sessions.*` outcome counters."""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from senseflow.httpserver import HttpLimits
from senseflow.observers import serve_sessions
from senseflow.sessions import LiveSessionsReader, live_path
from shared.config import Config, config_from_document
from shared.events import EncodedBatch
from shared.sessionlive import LIVE_FILE
from shared.sessions import CLOSE, OPEN, START, STOP, SessionEvent, SessionState
from tests.unit.test_http_server import get, metrics_server
from workers.writer.sessionpublish import SessionPublisher
from workers.writer.sessions import CONSUMER, SessionKeeper
from workers.writer.spool import Spool

APPS = ("app-a", "app-b", "app-c")


def events(now_ns: int) -> list[SessionEvent]:
    """On two hosts: ann with app-a twice and app-b, bob with app-a and app-c, cid with
    none; a stray Stop and Close; dan started and stopped."""
    plan = [
        (START, "S1", "ann", ""),
        (OPEN, "S1", "ann", "app-a"),
        (OPEN, "S1", "ann", "app-a"),
        (OPEN, "S1", "ann", "app-b"),
        (OPEN, "S2", "bob", "app-a"),  # implicit start
        (OPEN, "S2", "bob", "app-c"),
        (START, "S2", "cid", ""),
        (STOP, "S2", "eve", ""),  # unmatched stop
        (CLOSE, "S2", "cid", "app-b"),  # unmatched close
        (START, "S1", "dan", ""),
        (STOP, "S1", "dan", ""),
        (START, "S2", "ann", ""),
    ]
    return [
        SessionEvent(now_ns - 10**9 + i * 1000, action, host, "LAB", user, app, app.upper())
        for i, (action, host, user, app) in enumerate(plan)
    ]


def batch(items: list[SessionEvent]) -> EncodedBatch:
    stamps = [e.time_ns for e in items]
    return EncodedBatch(b"", [], b"", [], stamps, {}, sessions=msgspec.msgpack.encode(items))


def config_in(directory: Path, **sessions: Any) -> Config:
    own = {"spool": {"directory": str(directory)}, "sessions": sessions}
    return config_from_document({"senseflow": own}, {})


@contextmanager
def writer_side(directory: Path) -> Iterator[tuple[SessionKeeper, SessionPublisher]]:
    spool = Spool(directory, ["influxdb", CONSUMER])
    keeper = SessionKeeper(config_in(directory).pipeline.sessions, spool, sync=False)
    keeper.start()
    try:
        yield keeper, SessionPublisher(keeper)
    finally:
        spool.close()


def truth(items: list[SessionEvent]) -> SessionState:
    state = SessionState(86_400 * 10**9)
    for event in items:
        state.apply(event)
    return state


def test_the_writer_publishes_on_change_and_the_reader_sees_events_still_reordering(
    tmp_path: Path,
) -> None:
    items = events(time.time_ns())
    with writer_side(tmp_path) as (keeper, publisher):
        assert live_path(config_in(tmp_path)) == publisher.path == tmp_path / LIVE_FILE
        assert publisher.publish()  # the state at start, even empty
        assert not publisher.publish()  # nothing changed: nothing written
        written = publisher.path.stat().st_mtime_ns, publisher.path.stat().st_ino
        deltas = publisher.delta_path.stat().st_size
        spool = keeper.spool
        keeper.add(spool.append(msgspec.msgpack.encode(batch(items)), len(items)), batch(items))
        assert keeper.waiting_events()  # all within the 2 s reorder window: none applied yet
        assert publisher.publish()
        assert publisher.delta_path.stat().st_size > deltas  # a delta, not the whole state
        assert (publisher.path.stat().st_mtime_ns, publisher.path.stat().st_ino) == written
        assert stat.S_IMODE(publisher.path.stat().st_mode) == 0o600  # it names users
    reader = LiveSessionsReader.of(config_in(tmp_path))
    now = time.time_ns()
    with reader.state(now) as state:
        assert state.snapshot(now) == truth(items).snapshot(now)
        assert state.counters == truth(items).counters
        assert state.counters["sessions.implicit_start"] == 1


def document_without_at(document: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in document.items() if key != "at"}


def test_api_sessions_serves_the_contract_with_filters_behind_the_servers_auth(
    tmp_path: Path,
) -> None:
    items = events(time.time_ns())
    with writer_side(tmp_path) as (keeper, publisher):
        keeper.add(keeper.spool.append(b"x", len(items)), batch(items))
        publisher.publish()
    expected = truth(items)
    with metrics_server(HttpLimits(token="s3cret")) as server:
        serve_sessions(server, LiveSessionsReader.of(config_in(tmp_path)), 20)
        assert get(server.port, "/api/sessions")[0] == 401
        auth = {"Authorization": "Bearer s3cret"}
        for query, (host, user, app) in {
            "": (None, None, None),
            "?host=s2": ("s2", None, None),
            "?user=LAB%5Cann": (None, "LAB\\ann", None),
            "?app=APP-A&host=S1": ("S1", None, "APP-A"),
        }.items():
            status, body = get(server.port, "/api/sessions" + query, auth)
            assert status == 200
            shown = json.loads(body)
            now = time.time_ns()
            assert document_without_at(shown) == document_without_at(
                expected.snapshot(now, host, user, app)
            )
        whole = json.loads(get(server.port, "/api/sessions", auth)[1])
        assert whole["totals"] == {"sessions": 4, "users": 3, "connections": 5}
        assert [h["host"] for h in whole["hosts"]] == ["S1", "S2"]
        assert set(whole["hosts"][0]["active"][0]) == {
            "userDirectory", "userId", "sessions", "since", "lastSeen", "browser", "os", "apps"
        }  # fmt: skip


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("senseflow_session")
    }


def test_prometheus_session_gauges_cap_the_apps_and_count_the_outcomes(tmp_path: Path) -> None:
    items = events(time.time_ns())
    with writer_side(tmp_path) as (keeper, publisher):
        keeper.add(keeper.spool.append(b"x", len(items)), batch(items))
        publisher.publish()
    with metrics_server() as server:
        serve_sessions(server, LiveSessionsReader.of(config_in(tmp_path)), 1)
        found = samples(get(server.port, "/metrics")[1].decode())
    assert found[("senseflow_session_count", (("host", "S1"),))] == 1
    assert found[("senseflow_session_count", (("host", "S2"),))] == 3
    assert found[("senseflow_session_users", (("host", "S2"),))] == 3
    assert found[("senseflow_session_connections", (("host", "S1"),))] == 3
    assert found[("senseflow_session_users_distinct", ())] == 3
    apps = {k[1]: v for k, v in found.items() if k[0] == "senseflow_session_app_connections"}
    assert apps == {(("app", "app-a"),): 3, (("app", "other"),): 2}
    users = {k[1]: v for k, v in found.items() if k[0] == "senseflow_session_app_users"}
    assert users == {(("app", "app-a"),): 2, (("app", "other"),): 2}
    outcomes = {
        dict(k[1])["counter"]: v
        for k, v in found.items()
        if k[0] == "senseflow_session_outcomes_total"
    }
    assert outcomes == {
        "sessions.unmatched_stop": 1,
        "sessions.unmatched_close": 1,
        "sessions.implicit_start": 1,
        "sessions.expired": 0,
    }


def test_http_port_is_the_new_name_of_the_metrics_port() -> None:
    from senseflow.cli import apply_run_flags, build_parser
    from shared.config import ConfigError

    parser = build_parser()
    for flags, port in ((["--http-port", "9100"], 9100), (["--metrics-port", "9101"], 9101)):
        pipe = apply_run_flags(Config(), parser.parse_args(["run", *flags])).pipeline
        assert (pipe.http_port or pipe.metrics_port) == port
    both = config_from_document({"senseflow": {"httpPort": 9102, "metricsPort": 9103}}, {})
    assert (both.pipeline.http_port or both.pipeline.metrics_port) == 9102
    with pytest.raises(ConfigError, match=r"senseflow\.httpPort"):
        config_from_document({"senseflow": {"httpPort": 70000}}, {})


def test_a_damaged_live_file_keeps_the_last_state_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    items = events(time.time_ns())
    with writer_side(tmp_path) as (keeper, publisher):
        keeper.add(keeper.spool.append(b"x", len(items)), batch(items))
        publisher.publish()
    reader = LiveSessionsReader.of(config_in(tmp_path))
    before = document_without_at(reader.document())
    assert before["totals"]["users"] == 3
    (tmp_path / "damaged").write_bytes(b"\x93not a state")
    (tmp_path / "damaged").replace(reader.path)
    reader.delta_path.unlink()  # as after a restart whose snapshot is damaged
    assert document_without_at(reader.document()) == before
    assert document_without_at(reader.document()) == before
    assert caplog.text.count("cannot read") == 1
