"""One catalogue of counter names (issue 11): the docs list exactly its counters, and the
runtime code builds no counter name of its own."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from shared import counternames as names

REPO = Path(__file__).resolve().parents[2]
RUNTIME = ("senseflow", "receiver", "workers", "shared")
COUNTER_PREFIXES = (
    *(prefix + "." for prefix in (names.DROPPED, names.INVALID, *names.PER_DESTINATION)),
    "newrelic.written",
    "newrelic.failed",
    names.NEWRELIC_SPLITS,
    names.MQTT_REPUBLISHED,
    names.SOCKET_ERRORS,
    *names.SESSION_OUTCOMES,
    names.HEARTBEAT,
    names.WORKER_NUMBER,
    names.WORKER_HELD,
    names.SPOOLED,
    names.cursor(""),
    names.limbo(""),
    "_seen.",
    "_seen_datagrams.",
)


def documented_counters() -> list[str]:
    """The first column of the counter table in docs/OPERATIONS.md."""
    lines = (REPO / "docs" / "OPERATIONS.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| counter (metric label)"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        found = re.match(r"\| `([^`]+)` \|", line)
        assert found, line
        rows.append(found.group(1))
    return rows


def test_the_docs_counter_table_lists_exactly_the_catalogue() -> None:
    documented = documented_counters()
    assert len(documented) == len(set(documented)), documented
    assert set(documented) == set(names.DOCUMENTED)


def test_drop_reasons_are_the_catalogues_dropped_counters() -> None:
    dropped = {name for name in names.DOCUMENTED if name.startswith(names.DROPPED + ".")}
    expected = {names.dropped(reason) for reason in names.DROP_REASONS}
    per_destination = {names.destination_full(names.DEST), names.spool_mismatch(names.DEST)}
    assert dropped == expected | per_destination


def string_constants(tree: ast.AST) -> list[ast.Constant]:
    """String constants, docstrings left out."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_runtime_code_spells_no_counter_name_outside_the_catalogue() -> None:
    spelled = []
    for package in RUNTIME:
        for path in sorted((REPO / package).rglob("*.py")):
            if path.name == "counternames.py":
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in string_constants(tree):
                value = str(node.value)
                if value.startswith(COUNTER_PREFIXES):
                    spelled.append(f"{path.relative_to(REPO)}:{node.lineno}: {value!r}")
    assert not spelled, "\n".join(spelled)
