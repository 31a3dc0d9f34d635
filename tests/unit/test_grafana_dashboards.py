"""The structure of every dashboard in deploy/grafana/, as Grafana imports it.

Queries are run against real data in tests/e2e/test_dashboards.py and
tests/e2e/test_sessions_dashboard.py; here only what an import would trip over, or lay
out wrong: the schema version, unique ids and uids, panels inside the 24-column grid and
not on top of each other, a query in every target, data sources that are inputs.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest

DASHBOARDS = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
FILES = sorted(DASHBOARDS.glob("*.json"))
GRID_COLUMNS = 24
INPUT = re.compile(r"^\$\{(\w+)\}$")


def load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return document


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Top-level panels and those inside collapsed rows."""
    panels = list(dashboard["panels"])
    for panel in dashboard["panels"]:
        panels.extend(panel.get("panels", []))
    return panels


def overlap(a: dict[str, int], b: dict[str, int]) -> bool:
    return (
        a["x"] < b["x"] + b["w"]
        and b["x"] < a["x"] + a["w"]
        and a["y"] < b["y"] + b["h"]
        and b["y"] < a["y"] + a["h"]
    )


def query_text(target: dict[str, Any]) -> str:
    """InfluxQL (`query`) or PromQL (`expr`); a variable's query may be an object."""
    text = target.get("expr", target.get("query", ""))
    return str(text["query"] if isinstance(text, dict) else text)


def test_there_are_dashboards_and_the_sessions_one_is_among_them() -> None:
    assert {path.name for path in FILES} >= {
        "user-events.json",
        "senseflow-metrics.json",
        "sessions.json",
    }


def test_uids_and_titles_are_unique() -> None:
    dashboards = [load(path) for path in FILES]
    assert len({d["uid"] for d in dashboards}) == len(dashboards)
    assert len({d["title"] for d in dashboards}) == len(dashboards)


@pytest.mark.parametrize("path", FILES, ids=[path.name for path in FILES])
def test_schema_version_ids_and_grid(path: Path) -> None:
    dashboard = load(path)
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    panels = all_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["y"] >= 0 and grid["w"] >= 1 and grid["h"] >= 1
        assert grid["x"] + grid["w"] <= GRID_COLUMNS, f"{panel['title']!r} is off the grid"
    for a, b in itertools.combinations(dashboard["panels"], 2):
        assert not overlap(a["gridPos"], b["gridPos"]), f"{a['title']!r} / {b['title']!r}"


@pytest.mark.parametrize("path", FILES, ids=[path.name for path in FILES])
def test_every_target_has_a_query_on_a_declared_data_source(path: Path) -> None:
    dashboard = load(path)
    inputs = {item["name"] for item in dashboard["__inputs"]}
    sources = []
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        targets = panel["targets"]
        assert targets, f"{panel['title']!r} has no query"
        assert len({t["refId"] for t in targets}) == len(targets)
        for target in targets:
            text = query_text(target)
            assert text.strip(), f"{panel['title']!r} {target['refId']} has no query"
            assert text.count("(") == text.count(")"), f"unbalanced: {text}"
            sources.append(target.get("datasource", panel.get("datasource")))
    for variable in dashboard["templating"]["list"]:
        assert query_text(variable).strip(), f"variable {variable['name']} has no query"
        sources.append(variable["datasource"])
    for source in sources:
        found = INPUT.match(source["uid"])
        assert found and found.group(1) in inputs, f"{path.name}: data source {source}"
