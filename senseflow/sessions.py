"""The supervisor's view of the live sessions: `/api/sessions` and Prometheus gauges.

The writer publishes its state (shared/sessionlive.py) into its spool directory; this
module reads that file when asked, only again once it was replaced (stat, then decode), so
a scrape or a request costs a decode at most once per publish (0.5 s). Every reader (the
HTTP thread, the InfluxDB and MQTT exporters) shares one decoded copy under a lock; a view
sweeps idle users at the time it is taken, as the state does (SPEC 3a rule 5).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from senseflow.httpserver import Handler, Request, Response
from shared.config import Config
from shared.sessionlive import LIVE_FILE, decode_live
from shared.sessions import SessionState
from workers.writer.destinations import destination_names
from workers.writer.spooldir import destination_identities, spool_directory

log = logging.getLogger("senseflow.sessions")

OTHER_APPS = "other"
NO_APP = "none"


def live_path(config: Config) -> Path:
    """Where the writer of this configuration publishes: its spool directory."""
    names = destination_names(config)
    return spool_directory(config, destination_identities(config, names)) / LIVE_FILE


class LiveSessionsReader:
    def __init__(self, path: Path, max_idle_ns: int) -> None:
        self.path = path
        self.lock = threading.Lock()
        self._version: tuple[int, int, int] | None = None
        self._state = SessionState(max_idle_ns)
        self.published_ns = 0
        self.confirmed_seq = 0

    @classmethod
    def of(cls, config: Config) -> LiveSessionsReader:
        return cls(live_path(config), config.pipeline.sessions.max_idle * 10**9)

    @contextlib.contextmanager
    def state(self, now_ns: int | None = None) -> Iterator[SessionState]:
        """The latest published state, idle users swept at `now_ns` (default: now)."""
        with self.lock:
            self._refresh()
            self._state.sweep(time.time_ns() if now_ns is None else now_ns)
            yield self._state

    def version(self) -> tuple[int, int, int] | None:
        """Changes whenever a new state is published (stat only)."""
        with self.lock:
            self._refresh()
            return self._version

    def document(
        self, host: str | None = None, user: str | None = None, app: str | None = None
    ) -> dict[str, Any]:
        now = time.time_ns()
        with self.state(now) as state:
            return state.snapshot(now, host, user, app)

    def _refresh(self) -> None:
        try:
            found = os.stat(self.path)
        except FileNotFoundError:
            return
        version = (found.st_ino, found.st_mtime_ns, found.st_size)
        if version == self._version:
            return
        self._version = version  # a bad file is tried once, not at every request
        try:
            published = decode_live(self.path.read_bytes())
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("sessions: cannot read %s (the last state stays): %s", self.path, exc)
            return
        self._state, self.published_ns, self.confirmed_seq = published


# -- HTTP ----------------------------------------------------------------------------------


def sessions_handler(reader: LiveSessionsReader) -> Handler:
    """`GET /api/sessions[?host=H][&user=U][&app=A]` (SPEC 3a)."""

    def answer(request: Request) -> Response:
        query = urllib.parse.parse_qs(request.query)
        host, user, app = (query.get(key, [None])[-1] or None for key in ("host", "user", "app"))
        body = msgspec.json.encode(reader.document(host, user, app))
        return Response(200, "application/json", body, {"Cache-Control": "no-store"})

    return answer


# -- Prometheus ----------------------------------------------------------------------------


class SessionCollector:
    """Gauges per host and per app (top `app_limit` by connections, the rest `other`) and
    the `sessions.*` outcome counters (cumulative: kept in the state's checkpoint)."""

    def __init__(self, reader: LiveSessionsReader, app_limit: int) -> None:
        self.reader = reader
        self.app_limit = app_limit

    def collect(self) -> Iterator[Metric]:
        per_host = {
            name: GaugeMetricFamily(f"senseflow_session_{what}", text, labels=["host"])
            for name, what, text in (
                ("sessions", "count", "Active sessions on the host (sum of users' counts)"),
                ("users", "users", "Users with a session on the host"),
                ("connections", "connections", "Open connections on the host"),
            )
        }
        outcomes = CounterMetricFamily(
            "senseflow_session_outcomes", "Session rule outcomes, by counter", labels=["counter"]
        )
        with self.reader.state() as state:
            apps = app_usage(state)
            for host, users in state.hosts.items():
                entries = users.values()
                per_host["sessions"].add_metric([host], sum(e.sessions for e in entries))
                per_host["users"].add_metric([host], len(users))
                per_host["connections"].add_metric([host], sum(e.connections() for e in entries))
            distinct = state.totals()[1]
            for name, count in sorted(state.counters.items()):
                outcomes.add_metric([name], count)
        yield from per_host.values()
        yield GaugeMetricFamily(
            "senseflow_session_users_distinct",
            "Users with a session on any host (a user on two hosts counts once)",
            value=distinct,
        )
        yield from self.app_families(apps)
        yield outcomes

    def app_families(self, apps: dict[str, tuple[int, set[str]]]) -> Iterator[Metric]:
        connections = GaugeMetricFamily(
            "senseflow_session_app_connections", "Open connections per app", labels=["app"]
        )
        users = GaugeMetricFamily(
            "senseflow_session_app_users", "Users with the app open", labels=["app"]
        )
        ranked = sorted(apps.items(), key=lambda item: (-item[1][0], item[0]))
        for app, (count, who) in ranked[: self.app_limit]:
            connections.add_metric([app], count)
            users.add_metric([app], len(who))
        rest = ranked[self.app_limit :]
        if rest:
            connections.add_metric([OTHER_APPS], sum(count for _, (count, _) in rest))
            users.add_metric([OTHER_APPS], len(set().union(*(who for _, (_, who) in rest))))
        yield connections
        yield users


def app_usage(state: SessionState) -> dict[str, tuple[int, set[str]]]:
    """App id ('none' without one) -> (open connections, keys of the users on it)."""
    usage: dict[str, tuple[int, set[str]]] = {}
    for users in state.hosts.values():
        for key, entry in users.items():
            for app_id, app in (entry.apps or {}).items():
                count, who = usage.get(app_id or NO_APP, (0, set()))
                who.add(key)
                usage[app_id or NO_APP] = (count + app.connections, who)
    return usage
