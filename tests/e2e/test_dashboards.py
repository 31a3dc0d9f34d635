"""The Grafana dashboards in deploy/grafana/ against what the service actually writes.

user-events.json: every InfluxQL query (panels and template variables), with Grafana's
macros and variables replaced by concrete values, runs without error against a real
InfluxDB filled by the running service, and returns data.
senseflow-metrics.json: every metric name in its PromQL exists in a scrape of the
running service's /metrics.
sessions.json: tests/e2e/test_sessions_dashboard.py (a session scenario with known answers).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from senseflow.commands.corpus import DIRECTORIES, HOSTS, app_names, make_corpus
from senseflow.commands.send import send
from tests.e2e.conftest import StartService
from tests.e2e.harness import REPO
from tests.e2e.observe import metrics_flags, scrape, series_sum, wait_for
from tests.e2e.test_observability import STATS
from tests.localservers import InfluxServer

pytestmark = pytest.mark.slow

DASHBOARDS = REPO / "deploy" / "grafana"
MACROS = {
    "$timeFilter": "time > now() - 1h",
    "$__interval": "10s",
    "$host": ".*",
}
GRAFANA_VARIABLE = re.compile(r"\$(?:\{|[A-Za-z_])")  # `$/` is a regex anchor, not one


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping in a JSON document."""
    if isinstance(node, dict):
        yield node
        for child in node.values():
            yield from walk(child)
    elif isinstance(node, list):
        for child in node:
            yield from walk(child)


def influxql_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, query) for every panel target and template variable."""
    found = []
    for panel in walk(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} {target['refId']}", target["query"]))
    for variable in dashboard["templating"]["list"]:
        found.append((f"variable {variable['name']}", variable["query"]))
    return found


def concrete(query: str, macros: dict[str, str] = MACROS) -> str:
    for macro, text in macros.items():
        query = query.replace(macro, text)
    assert not GRAFANA_VARIABLE.search(query), f"an unreplaced Grafana variable in {query}"
    return query


def has_data(answer: dict[str, Any]) -> bool:
    """Some row holds a value (not only the nulls of `fill(null)`); InfluxDB returns no series
    at all when nothing matched, `fill(0)` included."""
    series = answer["results"][0].get("series", [])
    return any(v is not None for s in series for row in s["values"] for v in row[1:])


def test_user_events_dashboard_queries_run_on_what_we_write(
    tmp_path: Path, start_service: StartService, influx_server: InfluxServer, influx_db: str
) -> None:
    names = tmp_path / "apps.yaml"
    names.write_text(yaml.safe_dump(app_names(), allow_unicode=True), encoding="utf-8")
    service = start_service(mqtt=False, butler_overrides=STATS, appNamesFile=str(names))
    datagrams = make_corpus(5_000, seed=11)
    send(("127.0.0.1", service.udp_port), datagrams, rate=25_000, count=len(datagrams))  # type: ignore[attr-defined]
    service.wait_counter("written.influxdb", len(datagrams))
    wait_for(
        lambda: (
            series_sum(influx_server, influx_db, 'SELECT sum("counter") FROM "event_count"')
            == len(datagrams)
        ),
        15,
        "event counts written",
    )
    wait_for(
        lambda: (
            series_sum(
                influx_server, influx_db, 'SELECT sum("messages_received") FROM "user_events_queue"'
            )
            == len(datagrams)
        ),
        15,
        "queue metrics written",
    )

    dashboard = json.loads((DASHBOARDS / "user-events.json").read_text(encoding="utf-8"))
    queries = influxql_queries(dashboard)
    assert len(queries) >= 21
    assert set(PLAUSIBLE) <= {where for where, _ in queries}
    for where, query in queries:
        answer = influx_server.query(concrete(query), db=influx_db)  # raises on any error
        assert has_data(answer), f"{where} returned no data: {concrete(query)}\n{answer!r:.500}"
        if check := PLAUSIBLE.get(where):
            assert check(values(answer), len(datagrams)), f"{where}: {answer!r:.1000}"


def values(answer: dict[str, Any]) -> list[tuple[dict[str, str], list[Any]]]:
    """(tags, first value column) per series."""
    series = answer["results"][0].get("series", [])
    return [(s.get("tags", {}), [row[1] for row in s["values"]]) for s in series]


PLAUSIBLE: dict[str, Callable[[list[tuple[dict[str, str], list[Any]]], int], bool]] = {
    "panel 'Events by action per host' A": lambda found, sent: (
        sum(sum(v) for _, v in found) == sent and {t["host"] for t, _ in found} >= set(HOSTS)
    ),
    "panel 'Events by origin' A": lambda found, sent: sum(sum(v) for _, v in found) == sent,
    "panel 'Top users by events' A": lambda found, _: (
        len(found[0][1]) == 10 and found[0][1] == sorted(found[0][1], reverse=True)
    ),
    "panel 'Top apps by connection opens' A": lambda found, _: (
        len(found[0][1]) == 10 and min(found[0][1]) > 0
    ),
    "panel 'Users by directory' A": lambda found, _: (
        {t["userDirectory"] for t, _ in found} == set(DIRECTORIES)
    ),
}


PROMQL_NAME = re.compile(r"\bsenseflow_[a-z0-9_]+\b")


def test_metrics_dashboard_uses_only_metrics_we_expose(start_service: StartService) -> None:
    port, keys = metrics_flags()
    start_service(**keys)
    exposed = cast(
        "set[str]",
        wait_for(
            lambda: (
                (names := {name for name, _ in scrape(port)}) >= {"senseflow_spool_bytes"} and names
            ),
            10,
            "the writer's first delivery report",
        ),
    )
    dashboard = json.loads((DASHBOARDS / "senseflow-metrics.json").read_text(encoding="utf-8"))
    used = set()
    for node in walk(dashboard):
        for key in ("expr", "definition"):
            if isinstance(node.get(key), str):
                used.update(PROMQL_NAME.findall(node[key]))
    assert len(used) >= 15
    assert used <= exposed, f"not exposed: {sorted(used - exposed)}"
