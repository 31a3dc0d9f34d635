"""Coming from Butler SOS: with `senseflow.influxSchema: butler-sos` on InfluxDB 1.x, the
user-events panels of Butler SOS's own Grafana dashboard show what senseflow wrote.

The service runs for real (UDP in, a real influxd out). The panel targets are copied
unchanged from Butler SOS 15's dashboard (data/butler_sos_user_events_targets.json) and
turned into InfluxQL as Grafana's query builder does (`grafana_query`); a few queries of
the same kinds are also written out by hand. Each expected value follows from the
scenario below.
"""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import StartService
from tests.localservers import InfluxServer

pytestmark = pytest.mark.slow

TARGETS = Path(__file__).parent / "data" / "butler_sos_user_events_targets.json"
TIME_FILTER = "time > now() - 1h"
SALES, HR = "2f1ea3c4-7f3b-4a53-a9a3-1b5d3f0c9e11", "8b0c2d6e-1a4f-4e7b-9c3d-5e6f7a8b9c0d"
APP_NAMES = {SALES: "Sales, 2024", HR: "HR app"}
CHROME_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/119.0.0.0 Safari/537.36"
)
FIREFOX_MAC = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10.15; rv:120.0) Gecko/20100101 Firefox/120.0"
CHROME_LINUX = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)
AGENTS = {"alice": CHROME_WINDOWS, "bob": FIREFOX_MAC, "carol": CHROME_LINUX}
# (user, action, origin, app): alice and bob in Sales, alice and carol in HR, carol in Sales.
SCENARIO = [
    ("alice", "Start session", "AppAccess", ""),
    ("alice", "Open connection", "AppAccess", SALES),
    ("alice", "Open connection", "AppAccess", HR),
    ("alice", "Close connection", "AppAccess", SALES),
    ("bob", "Start session", "AppAccess", ""),
    ("bob", "Open connection", "AppAccess", SALES),
    ("bob", "Stop session", "AppAccess", ""),
    ("carol", "Start session", "Hub", ""),
    ("carol", "Open connection", "AppAccess", HR),
    ("carol", "Open connection", "AppAccess", SALES),
]
USERS = ["LAB\\alice", "LAB\\bob", "LAB\\carol"]


def datagram(user: str, action: str, origin: str, app_id: str) -> bytes:
    """Butler SOS's appender format (SPEC 1 A); opening messages carry the user agent."""
    source = "/qseow-proxy-session/" if action.endswith("session") else "/qseow-proxy-connection/"
    context = f"/app/{app_id}" if app_id else "/hub/"
    message = f"{action} for user 'LAB\\{user}'"
    if action in ("Start session", "Open connection"):
        message += f" with UserAgent: '{AGENTS[user]}'"
    fields = (source, "sense1", action, "LAB", user, origin, context, message)
    return ";".join(fields).encode()


def wait_clear_of_a_minute_boundary(margin: float = 10.0) -> None:
    """All events land in one minute (hence one 15 m, 1 h and 1 d bucket too): start sending
    only with `margin` seconds or more left in the current minute."""
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.1)


def grafana_query(target: dict[str, Any]) -> str:
    """InfluxQL as Grafana's InfluxDB query builder renders a target (influx_query_model.ts,
    query_part.ts): `key::tag` becomes `"key"::tag`, the `default` policy is left out, `fill`
    follows the group-by parts without a comma; then `$timeFilter` is replaced."""
    selects = []
    for parts in target["select"]:
        text = ""
        for part in parts:
            kind, params = part["type"], part["params"]
            if kind == "field":
                text = quote_key(params[0])
            elif kind == "alias":
                text = f'{text} AS "{params[0]}"'
            else:
                text = f"{kind}({text})"
        selects.append(text)
    conditions = [
        f"{tag.get('condition', 'AND') + ' ' if i else ''}{quote_key(tag['key'])} "
        f"{tag['operator']} '{tag['value']}'"
        for i, tag in enumerate(target["tags"])
    ]
    assert target["policy"] == "default"
    query = f'SELECT {", ".join(selects)} FROM "{target["measurement"]}" WHERE '
    query += f"({' '.join(conditions)}) AND $timeFilter" if conditions else "$timeFilter"
    group_by = ""
    for i, part in enumerate(target["groupBy"]):
        kind, param = part["type"], part["params"][0]
        if i:
            group_by += " " if kind == "fill" else ", "
        group_by += quote_key(param) if kind == "tag" else f"{kind}({param})"
    if group_by:
        query += f" GROUP BY {group_by}"
    return query.replace("$timeFilter", TIME_FILTER)


def quote_key(key: str) -> str:
    for suffix in ("::tag", "::field"):
        if key.endswith(suffix):
            return f'"{key.removesuffix(suffix)}"{suffix}'
    return f'"{key}"'


def panel_queries() -> dict[str, str]:
    document = json.loads(TARGETS.read_text(encoding="utf-8"))
    return {t["panel"]: grafana_query(t["target"]) for t in document["targets"]}


def values(answer: dict[str, Any]) -> list[Any]:
    """The first column after time of every non-empty row, across all series."""
    series = answer["results"][0].get("series", [])
    return [row[1] for s in series for row in s["values"] if row[1] not in (None, 0)]


def per_tag(answer: dict[str, Any], tag: str) -> dict[str, Any]:
    """{tag value: the sum of the series' values} for a query grouped by `tag`."""
    totals: Counter[str] = Counter()
    for s in answer["results"][0].get("series", []):
        totals[s["tags"][tag]] += sum(row[1] for row in s["values"] if row[1] is not None)
    return {k: v for k, v in totals.items() if v}


@pytest.fixture
def written(
    tmp_path: Path, start_service: StartService, influx_server: InfluxServer, influx_db: str
) -> None:
    """The scenario, sent to a service with `influxSchema: butler-sos` and stored."""
    names = tmp_path / "apps.yaml"
    names.write_text(yaml.safe_dump(APP_NAMES), encoding="utf-8")
    service = start_service(
        mqtt=False,
        butler_overrides={"userEvents": {"tags": [{"name": "qs_env", "value": "dev"}]}},
        appNamesFile=str(names),
        influxSchema="butler-sos",
    )
    wait_clear_of_a_minute_boundary()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for event in SCENARIO:
            sock.sendto(datagram(*event), ("127.0.0.1", service.udp_port))  # type: ignore[attr-defined]
    service.wait_counter("written.influxdb", len(SCENARIO))


@pytest.mark.usefixtures("written")
def test_butler_sos_panel_queries_show_what_senseflow_wrote(
    influx_server: InfluxServer, influx_db: str
) -> None:
    panels = panel_queries()

    def run(panel: str) -> dict[str, Any]:
        return influx_server.query(panels[panel], db=influx_db)

    assert values(run("Unique users (last 15 min)")) == [3]
    assert sorted(values(run("Unique users (per 15 min)"))) == USERS
    by_action = per_tag(run("User events per 1 min window, by event type"), "event_action")
    assert by_action == {
        "Start session": 3,
        "Open connection": 5,
        "Close connection": 1,
        "Stop session": 1,
    }
    by_origin = per_tag(run("User events per 1 min window, by event origin"), "origin")
    assert by_origin == {"AppAccess": 9, "Hub": 1}
    assert per_tag(run("Unique users per app"), "appName") == {"Sales, 2024": 3, "HR app": 2}
    assert per_tag(run("Users per browser"), "uaBrowserName") == {"Chrome": 2, "Firefox": 1}
    assert per_tag(run("Users per OS"), "uaOsName") == {"Windows": 1, "Mac OS X": 1, "Linux": 1}
    table = run("User events")["results"][0]["series"]
    assert sorted(row[1] for s in table for row in s["values"]) == sorted(
        f"LAB\\{user}" for user, *_ in SCENARIO
    )
    # Its "App name" and "App ID" columns read appName_field / appId_field, which Butler SOS
    # itself does not write on 1.x (it writes appName / appId): empty there too.
    assert {tuple(row[2:]) for s in table for row in s["values"]} == {(None, None)}


@pytest.mark.usefixtures("written")
def test_hand_written_dashboard_queries_on_the_butler_sos_names(
    influx_server: InfluxServer, influx_db: str
) -> None:
    def run(query: str) -> dict[str, Any]:
        return influx_server.query(query, db=influx_db)

    distinct_per_minute = run(
        'SELECT count(distinct("userFull")) FROM "user_events" '
        "WHERE time > now()-1h GROUP BY time(1m)"
    )
    assert values(distinct_per_minute) == [3]
    browsers = run(
        'SELECT count(distinct("userId")) FROM "user_events" '
        f'WHERE {TIME_FILTER} GROUP BY "uaBrowserName", "uaBrowserMajorVersion"'
    )
    majors = {
        (s["tags"]["uaBrowserName"], s["tags"]["uaBrowserMajorVersion"]): s["values"][0][1]
        for s in browsers["results"][0]["series"]
        if s["tags"]["uaBrowserName"]
    }
    assert majors == {("Chrome", "119"): 1, ("Chrome", "120"): 1, ("Firefox", "120"): 1}
    os_versions = run(
        'SELECT count(distinct("userFull")) FROM "user_events" '
        f'WHERE {TIME_FILTER} AND "uaOsName" = \'Mac OS X\' GROUP BY "uaOsVersion"'
    )
    assert per_tag(os_versions, "uaOsVersion") == {"10.15": 1}
    apps = run(
        'SELECT count(distinct("userFull")) FROM "user_events" '
        f'WHERE {TIME_FILTER} GROUP BY "appId"'
    )
    assert per_tag(apps, "appId") == {SALES: 3, HR: 2, "": 3}  # "": events of no app
    app_fields = run(f'SELECT "appId", "appName" FROM "user_events" WHERE {TIME_FILTER}')
    rows = app_fields["results"][0]["series"][0]["values"]
    assert Counter(row[2] for row in rows if row[2]) == {"Sales, 2024": 4, "HR app": 2}
