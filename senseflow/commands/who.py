"""`senseflow who --at TIME`: who was on Qlik Sense at TIME, rebuilt from InfluxDB.

The `user_events` points of the `maxIdle` window before TIME are replayed, in time order,
through the same session state the service keeps (shared/sessions.py), and the state at TIME
is printed as a table or as the `/api/sessions` JSON. A user seen in the window whose Start
lies before it counts one session from their first event in the window (as an implicit
start): the live service, which saw the Start, may show an earlier `since`.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO, Any

from shared import exitcodes
from shared.config import Config, InfluxdbConfig, load_config
from shared.events import ACTIONS
from shared.influxql import identifier
from shared.sessions import SessionEvent, SessionState
from workers.writer.sinks.influx import basic_auth

QUERY_TIMEOUT = 300.0
CHUNK_SIZE = 10_000
_ACTION_CODES = {action: code for code, action in enumerate(ACTIONS)}
# (column, InfluxQL type) in the order SessionEvent needs them (SPEC 3, `seed` schema).
_COLUMNS = (
    ("event_action", "tag"),
    ("host", "tag"),
    ("userFull_field", "field"),
    ("userId_field", "field"),
    ("appId_field", "field"),
    ("appName_field", "field"),
    ("qs_uaBrowserName", "tag"),
    ("qs_uaBrowserMajorVersion", "tag"),
    ("qs_uaOsName", "tag"),
    ("qs_uaOsVersion", "tag"),
)


class WhoError(Exception):
    """InfluxDB could not answer; the message says why, without secrets."""


def add_who_command(commands: Any) -> None:
    parser = commands.add_parser(
        "who",
        help="who was on Qlik Sense at a time, rebuilt from the user events in InfluxDB",
        description="Replay the user events of the maxIdle window before TIME (InfluxDB 1.x) "
        "and print the sessions at TIME.",
    )
    parser.add_argument("--config", "-c", metavar="FILE", help="Butler SOS YAML config file")
    parser.add_argument(
        "--at",
        required=True,
        type=parse_time,
        metavar="TIME",
        help="ISO 8601 time (UTC unless it names an offset), or 'now'",
    )
    parser.add_argument("--host", help="only this Sense host")
    parser.add_argument("--user", help="only this user (DIR\\userid or userid)")
    parser.add_argument("--app", help="only users with this app open (app id or name)")
    parser.add_argument("--json", action="store_true", help="print the /api/sessions JSON")
    parser.set_defaults(command=run_who)


def parse_time(text: str) -> int:
    """Nanoseconds since the epoch."""
    if text == "now":
        moment = datetime.now(UTC)
    else:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an ISO 8601 time such as 2026-11-29T10:42:00Z, found {text!r}"
            ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000


def run_who(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if config.butler.influxdb_config.version != 1:
        print("senseflow: who: reads InfluxDB 1.x only (influxdbConfig.version)", file=sys.stderr)
        return exitcodes.FAILURE
    try:
        document = sessions_at(config, args.at, args.host, args.user, args.app)
    except WhoError as exc:
        print(f"senseflow: who: {exc}", file=sys.stderr)
        return exitcodes.FAILURE
    if args.json:
        json.dump(document, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print_table(document, sys.stdout)
    return exitcodes.OK


def sessions_at(
    config: Config, at_ns: int, host: str | None, user: str | None, app: str | None
) -> dict[str, Any]:
    max_idle_ns = config.pipeline.sessions.max_idle * 10**9
    state = SessionState(max_idle_ns)
    for event in window_events(config.butler.influxdb_config, at_ns - max_idle_ns, at_ns):
        state.apply(event)
    return state.snapshot(at_ns, host, user, app)


def window_events(cfg: InfluxdbConfig, after_ns: int, until_ns: int) -> Iterator[SessionEvent]:
    """The `user_events` points with after_ns < time <= until_ns, oldest first."""
    columns = ", ".join(f"{identifier(name)}::{kind}" for name, kind in _COLUMNS)
    query = (
        f'SELECT {columns} FROM "user_events" '
        f"WHERE time > {after_ns} AND time <= {until_ns} ORDER BY time ASC"
    )
    for chunk in _query_chunks(cfg, query):
        for series in chunk:
            index = {name: i for i, name in enumerate(series["columns"])}
            for row in series.get("values", []):
                event = _session_event(row, index)
                if event is not None:
                    yield event


def _session_event(row: list[Any], index: dict[str, int]) -> SessionEvent | None:
    def value(name: str) -> str:
        position = index.get(name)
        found = row[position] if position is not None else None
        return found if isinstance(found, str) else ""

    action = _ACTION_CODES.get(value("event_action"))
    user_full, user_id = value("userFull_field"), value("userId_field")
    if action is None or not user_id or not user_full.endswith(f"\\{user_id}"):
        return None  # not a point senseflow (or Butler SOS) writes
    return SessionEvent(
        row[index["time"]],
        action,
        value("host"),
        user_full[: -len(user_id) - 1],
        user_id,
        value("appId_field"),
        value("appName_field"),
        value("qs_uaBrowserName"),
        value("qs_uaBrowserMajorVersion"),
        value("qs_uaOsName"),
        value("qs_uaOsVersion"),
    )


def _query_chunks(cfg: InfluxdbConfig, query: str) -> Iterator[list[dict[str, Any]]]:
    """Each chunk's series; InfluxDB streams chunked answers as one JSON document a line."""
    v1 = cfg.v1_config
    params = {"db": v1.db_name, "q": query, "epoch": "ns", "chunked": "true"}
    params["chunk_size"] = str(CHUNK_SIZE)
    if v1.retention_policy.name:
        params["rp"] = v1.retention_policy.name
    request = urllib.request.Request(
        f"http://{cfg.host}:{cfg.port}/query",
        data=urllib.parse.urlencode(params).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    if v1.auth.enable:
        request.add_header("Authorization", basic_auth(v1.auth.username, v1.auth.password))
    try:
        with urllib.request.urlopen(request, timeout=QUERY_TIMEOUT) as response:
            for line in response:
                yield from _results(json.loads(line))
    except urllib.error.HTTPError as exc:
        raise WhoError(f"InfluxDB at {cfg.host}:{cfg.port} answered {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise WhoError(f"cannot reach InfluxDB at {cfg.host}:{cfg.port}: {exc}") from None


def _results(answer: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
    errors = [answer.get("error")] + [r.get("error") for r in answer.get("results", [])]
    found = [e for e in errors if e]
    if found:
        raise WhoError(f"InfluxDB: {found[0]}")
    for result in answer.get("results", []):
        yield result.get("series", [])


def print_table(document: dict[str, Any], out: IO[str]) -> None:
    totals = document["totals"]
    out.write(
        f"at {document['at']}: {totals['users']} users, {totals['sessions']} sessions, "
        f"{totals['connections']} connections\n"
    )
    rows = [("HOST", "USER", "SESSIONS", "SINCE", "LAST SEEN", "BROWSER", "OS", "APPS")]
    for host in document["hosts"]:
        for user in host["active"]:
            rows.append(
                (
                    host["host"],
                    f"{user['userDirectory']}\\{user['userId']}",
                    str(user["sessions"]),
                    user["since"],
                    user["lastSeen"],
                    user["browser"] or "-",
                    user["os"] or "-",
                    ", ".join(_app_label(a) for a in user["apps"]) or "-",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        out.write("  ".join([*cells, row[-1]]).rstrip() + "\n")


def _app_label(app: dict[str, Any]) -> str:
    name = app["appName"] or app["appId"] or "(no app)"
    return f"{name} x{app['connections']}" if app["connections"] > 1 else name
