"""deploy/grafana/sessions.json against the live-session points the running service wrote.

A small scenario with known answers, sent to the real service (snapshots every second):
on sense1 ann, bob and cid start a session and open an app; on sense2 dan does, and eve
starts two sessions. About 2 s later ann closes her app and stops; about 4 s after the
start dan stops with his app still open. Every InfluxQL query of the dashboard (Grafana's
macros filled in) must run and return data, and each panel must show what the scenario
implies: sessions and users per server before and after the stops, the peaks, the apps,
the two session lengths in the duration histogram, the browsers and operating systems.
"""

from __future__ import annotations

import functools
import json
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from senseflow.commands.corpus import APP_IDS, USER_AGENTS, app_names
from senseflow.commands.sessionsim import datagram
from tests.e2e.conftest import StartService
from tests.e2e.harness import SENSEFLOW
from tests.e2e.observe import wait_for
from tests.e2e.test_dashboards import DASHBOARDS, concrete, has_data, influxql_queries
from tests.localservers import InfluxServer
from workers.enrich import UserAgentParser

pytestmark = pytest.mark.slow

MACROS = {"$timeFilter": "time > now() - 1h", "$__interval": "1s", "$host": ".*"}
APP_A, APP_B = APP_IDS[0], APP_IDS[1]
AGENTS = {"ann": USER_AGENTS[0], "bob": USER_AGENTS[-1], "cid": USER_AGENTS[0]}
AGENTS |= {"dan": USER_AGENTS[len(USER_AGENTS) // 2], "eve": USER_AGENTS[-1]}
OPENING = [
    ("Start session", "sense1", "ann", ""),
    ("Open connection", "sense1", "ann", APP_A),
    ("Start session", "sense1", "bob", ""),
    ("Open connection", "sense1", "bob", APP_A),
    ("Start session", "sense1", "cid", ""),
    ("Open connection", "sense1", "cid", APP_B),
    ("Start session", "sense2", "dan", ""),
    ("Open connection", "sense2", "dan", APP_B),
    ("Start session", "sense2", "eve", ""),
    ("Start session", "sense2", "eve", ""),
]
ANN_LEAVES = [("Close connection", "sense1", "ann", APP_A), ("Stop session", "sense1", "ann", "")]
DAN_LEAVES = [("Stop session", "sense2", "dan", "")]
BEFORE = {"sense1": 3.0, "sense2": 3.0}
AFTER = {"sense1": 2.0, "sense2": 2.0}
TOLERANCE = 0.5  # seconds between sending and the receiver's timestamp, either end

Series = list[tuple[dict[str, str], list[list[Any]]]]


def series(answer: dict[str, Any]) -> Series:
    return [(s.get("tags", {}), s["values"]) for s in answer["results"][0].get("series", [])]


def by_tag(found: Series, tag: str, pick: Callable[[list[Any]], Any]) -> dict[str, Any]:
    """One value per series, keyed by a tag: `pick` of its non-null first-column values."""
    return {tags[tag]: pick([v[1] for v in values if v[1] is not None]) for tags, values in found}


def last(values: list[Any]) -> Any:
    return values[-1]


def send_timed(sock: socket.socket, events: list[tuple[str, str, str, str]]) -> tuple[float, float]:
    """Send the events; (time before, time after)."""
    before = time.time()
    for action, host, user, app in events:
        sock.send(datagram(action, host, user, app, AGENTS[user]))
    return before, time.time()


def summary(influx: InfluxServer, database: str) -> dict[str, float]:
    answer = influx.query(
        'SELECT last("session_count") FROM "user_session_summary" GROUP BY "host"', db=database
    )
    return by_tag(series(answer), "host", last)


def run_scenario(port: int, influx: InfluxServer, database: str) -> dict[str, tuple[float, float]]:
    """The scenario; the bounds of the two session lengths, by user."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", port))
        start = send_timed(sock, OPENING)
        wait_for(lambda: summary(influx, database) == BEFORE, 20, "the opening snapshot")
        time.sleep(max(0.0, start[1] + 2 - time.time()))  # the sessions' lengths, not a wait
        ann = send_timed(sock, ANN_LEAVES)
        time.sleep(max(0.0, start[1] + 4 - time.time()))
        dan = send_timed(sock, DAN_LEAVES)
    settled = wait_for(lambda: summary(influx, database) == AFTER and time.time(), 20, "after")
    ends = 'SELECT count("duration_seconds") FROM "user_session_ended"'
    wait_for(lambda: series(influx.query(ends, db=database)), 20, "the ended sessions")
    later = int((settled + 1.5) * 1e9)
    newer = f'SELECT count("session_count") FROM "user_session_summary" WHERE time > {later}'
    wait_for(lambda: series(influx.query(newer, db=database)), 20, "a snapshot 1.5 s later")
    return {
        "ann": (ann[0] - start[1], ann[1] - start[0] + TOLERANCE),
        "dan": (dan[0] - start[1], dan[1] - start[0] + TOLERANCE),
    }


def within(values: list[float], bounds: list[tuple[float, float]]) -> bool:
    pairs = zip(sorted(values), bounds, strict=True) if len(values) == len(bounds) else None
    return pairs is not None and all(low - TOLERANCE <= v <= high for v, (low, high) in pairs)


def agent_labels() -> tuple[set[str], set[str]]:
    parser = UserAgentParser()
    parsed = [parser.parse_uncached(agent) for agent in AGENTS.values()]
    return {p[0] for p in parsed}, {p[2] for p in parsed}


def check_panel(title: str, ref: str, found: Series, lengths: list[tuple[float, float]]) -> None:
    """What each panel must show for the scenario."""
    names = app_names()
    browsers, systems = agent_labels()
    values = [v for _, rows in found for row in rows for v in row[1:] if v is not None]
    expected: dict[tuple[str, str], Callable[[], bool]] = {
        ("Sessions now", "A"): lambda: values == [4.0],
        ("Peak sessions (time range)", "A"): lambda: values == [6.0],
        ("Concurrent sessions per server", "A"): lambda: (
            by_tag(found, "host", max) == BEFORE and by_tag(found, "host", last) == AFTER
        ),
        ("Concurrent users per server", "A"): lambda: (
            by_tag(found, "host", max) == {"sense1": 3, "sense2": 2}
            and by_tag(found, "host", last) == {"sense1": 2, "sense2": 1}
        ),
        ("Peak concurrency per day", "A"): lambda: max(values) == 6,
        ("Peak concurrency per day", "B"): lambda: max(values) == 5,
        ("Peak concurrency per day", "C"): lambda: by_tag(found, "host", max) == BEFORE,
        ("Users opening each app", "A"): lambda: (
            {tags["appName"] for tags, _ in found} == {names[APP_A], names[APP_B]}
        ),
        ("App sessions ended per app", "A"): lambda: app_table(found, lengths),
        ("Session duration distribution", "A"): lambda: within(values, lengths),
        ("App duration distribution", "A"): lambda: within(values, lengths),
        ("Session duration percentiles", "A"): lambda: within([max(values)], lengths[1:]),
        ("Sessions ended per server", "A"): lambda: (
            by_tag(found, "host", sum) == {"sense1": 1, "sense2": 1}
        ),
        ("Active users by browser", "A"): lambda: (
            {tags["qs_uaBrowserName"] for tags, _ in found} == browsers
        ),
        ("Active users by operating system", "A"): lambda: (
            {tags["qs_uaOsName"] for tags, _ in found} == systems
        ),
    }
    assert expected[(title, ref)](), f"panel {title!r} {ref}: {found!r:.1500}"


def app_table(found: Series, lengths: list[tuple[float, float]]) -> bool:
    """ann's APP_A closed by her Close (about 2 s), dan's APP_B by his Stop (about 4 s)."""
    names = app_names()
    rows = {tags["app"]: values[0][1:] for tags, values in found}
    ann_a, dan_b = rows.get(APP_A), rows.get(APP_B)
    return (
        set(rows) == {APP_A, APP_B}
        and ann_a is not None
        and dan_b is not None
        and ann_a[:2] == dan_b[:2] == [1, 1]
        and (ann_a[4], dan_b[4]) == (names[APP_A], names[APP_B])
        and within([ann_a[2], dan_b[2]], lengths)
    )


def test_sessions_dashboard_shows_the_scenario(
    tmp_path: Path, start_service: StartService, influx_server: InfluxServer, influx_db: str
) -> None:
    names = tmp_path / "apps.yaml"
    names.write_text(yaml.safe_dump(app_names(), allow_unicode=True), encoding="utf-8")
    service = start_service(mqtt=False, appNamesFile=str(names), sessions={"snapshotInterval": 1})
    bounds = run_scenario(service.udp_port, influx_server, influx_db)  # type: ignore[attr-defined]
    lengths = [bounds["ann"], bounds["dan"]]

    dashboard = json.loads((DASHBOARDS / "sessions.json").read_text(encoding="utf-8"))
    queries = influxql_queries(dashboard)
    assert len(queries) == 16  # 15 panel targets, one variable
    for where, query in queries:
        answer = influx_server.query(concrete(query, MACROS), db=influx_db)
        assert has_data(answer), f"{where} returned no data: {concrete(query, MACROS)}"
        if where.startswith("variable"):
            assert {v[1] for _, rows in series(answer) for v in rows} == {"sense1", "sense2"}
            continue
        title, ref = where.removeprefix("panel ").rsplit(" ", 1)
        check_panel(title.strip("'\""), ref, series(answer), lengths)
    assert service.terminate() == 0


def panel_answer(
    dashboard: dict[str, Any], title: str, ref: str, influx: InfluxServer, db: str
) -> Series:
    """The answer to one panel target, Grafana's macros filled in."""
    wanted = f"panel {title!r} {ref}"
    (query,) = [query for where, query in influxql_queries(dashboard) if where == wanted]
    return series(influx.query(concrete(query, MACROS), db=db))


def test_sessions_dashboard_equals_the_truth_of_send_sessions(
    tmp_path: Path, start_service: StartService, influx_server: InfluxServer, influx_db: str
) -> None:
    """`senseflow send --sessions`: many users on four hosts, implicit starts, unmatched
    stops; the panels' latest values equal the ground truth's sessions and users per host."""
    service = start_service(mqtt=False, workers=2, sessions={"snapshotInterval": 1})
    truth_file = tmp_path / "truth.jsonl"
    command = [*SENSEFLOW, "send", "--port", str(service.udp_port), "--sessions", "60"]  # type: ignore[attr-defined]
    options = ["--count", "4000", "--rate", "3000", "--truth", str(truth_file)]
    subprocess.run([*command, *options], check=True, timeout=60, capture_output=True)
    service.wait_counter("written.influxdb", 4000)
    final = json.loads(truth_file.read_text().splitlines()[-1])["state"]
    sessions = {h["host"]: float(h["sessions"]) for h in final["hosts"]}
    users = {h["host"]: float(h["users"]) for h in final["hosts"]}
    assert len(sessions) >= 3 and sum(sessions.values()) > 20

    def latest() -> dict[str, float]:
        return {host: n for host, n in summary(influx_server, influx_db).items() if n}

    settled = wait_for(lambda: latest() == sessions and time.time(), 20, "the final snapshot")
    later = int((settled + 1.5) * 1e9)
    newer = f'SELECT count("session_count") FROM "user_session_summary" WHERE time > {later}'
    wait_for(lambda: series(influx_server.query(newer, db=influx_db)), 20, "a later snapshot")

    dashboard = json.loads((DASHBOARDS / "sessions.json").read_text(encoding="utf-8"))
    answer = functools.partial(panel_answer, dashboard, influx=influx_server, db=influx_db)
    assert series_values(answer("Sessions now", "A")) == [sum(sessions.values())]
    shown = by_tag(answer("Concurrent sessions per server", "A"), "host", last)
    assert {host: n for host, n in shown.items() if n} == sessions
    assert by_tag(answer("Concurrent users per server", "A"), "host", last) == users
    peak = series_values(answer("Peak sessions (time range)", "A"))
    assert peak[0] >= sum(sessions.values())
    assert service.terminate() == 0


def series_values(found: Series) -> list[Any]:
    return [row[1] for _, rows in found for row in rows]
