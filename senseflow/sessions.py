"""The supervisor's view of the live sessions: `/api/sessions` and Prometheus gauges.

The writer publishes its state into its spool directory: a snapshot now and then
(shared/sessionlive.py) and a delta per publish (shared/sessiondelta.py). This module keeps
a copy (senseflow/sessionmirror.py): when asked, it reads the deltas appended since (a stat
and a read), so a scrape or a request costs what changed, not the state's size. A snapshot
is decoded only at start, after a writer restart or when the deltas cannot follow on. Every
reader (the HTTP thread, the InfluxDB and MQTT exporters) shares one view per publish under
a lock; a view sweeps idle users at the time it is taken, as the state does (SPEC 3a rule 5).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from senseflow.httpserver import Request, Response
from senseflow.sessionmirror import SessionMirror
from shared.config import Config
from shared.sessiondelta import (
    DELTA_FILE,
    DeltaHeader,
    ReadDelta,
    decode_delta,
    decode_header,
    split_frames,
)
from shared.sessionlive import LIVE_FILE, decode_snapshot
from shared.sessions import SessionState
from workers.writer.destinations import destination_names
from workers.writer.spooldir import destination_identities, spool_directory

log = logging.getLogger("senseflow.sessions")

OTHER_APPS = "other"
NO_APP = "none"
SETTLED_NS = 2 * 10**9
"""The writer published nothing for this long: its reorder buffer stays as it is."""


def live_path(config: Config) -> Path:
    """Where the writer of this configuration publishes: its spool directory."""
    names = destination_names(config)
    return spool_directory(config, destination_identities(config, names)) / LIVE_FILE


class DeltaLog:
    """`sessions.delta` as opened once: its header, then the frames appended since. Kept
    open: when the writer starts a new file, what it appended to this one still reads."""

    def __init__(self, path: Path, fd: int, header: DeltaHeader, offset: int) -> None:
        self.path = path
        self.fd = fd
        self._closer = weakref.finalize(self, os.close, fd)
        self.header = header
        self.inode = os.fstat(fd).st_ino
        self.offset = offset
        self.unread = b""

    @classmethod
    def open(cls, path: Path) -> DeltaLog | None:
        """None when there is none, or its header does not read (a new one comes)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        try:
            frames, offset = split_frames(os.pread(fd, 64, 0))
            return cls(path, fd, decode_header(frames[0]), offset)
        except (OSError, IndexError, msgspec.DecodeError):
            os.close(fd)
            return None

    def frames(self) -> list[memoryview]:
        """The whole frames appended since the last call (one read of what is new)."""
        size = os.fstat(self.fd).st_size
        data = self.unread + os.pread(self.fd, max(0, size - self.offset), self.offset)
        self.offset += len(data) - len(self.unread)
        frames, used = split_frames(data)
        self.unread = data[used:]
        return frames

    def replaced(self) -> bool:
        try:
            return os.stat(self.path).st_ino != self.inode
        except FileNotFoundError:
            return True

    def close(self) -> None:
        self._closer()


class LiveSessionsReader:
    def __init__(self, path: Path, max_idle_ns: int) -> None:
        self.path = path
        self.delta_path = path.with_name(DELTA_FILE)
        self.max_idle_ns = max_idle_ns
        self.lock = threading.Lock()
        self._snapshot_version: tuple[int, int, int] | None = None
        self._mirror = SessionMirror(max_idle_ns)
        self._log: DeltaLog | None = None
        self._view: SessionState | None = None
        self._view_of: tuple[int, int, int] | None = None
        self.snapshots_read = 0
        """Whole snapshots decoded (at start and resyncs only, while the deltas follow on)."""

    @classmethod
    def of(cls, config: Config) -> LiveSessionsReader:
        return cls(live_path(config), config.pipeline.sessions.max_idle * 10**9)

    @property
    def published_ns(self) -> int:
        return self._mirror.published_ns

    @property
    def confirmed_seq(self) -> int:
        """Ends numbered below this are the writer's own; the ones its reorder buffer made
        here may yet be numbered otherwise (a late batch can still sort before them)."""
        return self._mirror.ended_seq

    @contextlib.contextmanager
    def state(self, now_ns: int | None = None, *, buffered: bool = True) -> Iterator[SessionState]:
        """The latest published state, idle users swept at `now_ns` (default: now).

        `buffered`: with the events still in the writer's reorder buffer applied, so the
        view follows the events within a publish (`/api/sessions`, Prometheus, the InfluxDB
        snapshots). False (the checks every few seconds: ends, MQTT summaries, the chart):
        only once the writer has been idle for
        `SETTLED_NS`; while events keep coming it applies them itself within its 2 s
        window, and the view costs no replay of its buffer."""
        now = time.time_ns() if now_ns is None else now_ns
        with self.lock:
            self._refresh()
            mirror = self._mirror
            settled = time.time_ns() - mirror.published_ns >= SETTLED_NS
            if mirror.buffering and (buffered or settled):
                version = self._current()
                if self._view is None or self._view_of != version:  # one per publish
                    self._view, self._view_of = mirror.view(), version
                state = self._view
            else:
                state = mirror.confirmed(now)
            state.sweep(now)
            yield state

    def version(self) -> tuple[int, int, int] | None:
        """Changes whenever a new state is published."""
        with self.lock:
            self._refresh()
            return self._current() if self._mirror.published_ns else None

    def _current(self) -> tuple[int, int, int]:
        """(snapshots read, the last delta applied, its time): moves with every publish."""
        mirror = self._mirror
        return self.snapshots_read, mirror.seq, mirror.published_ns

    def document(
        self, host: str | None = None, user: str | None = None, app: str | None = None
    ) -> dict[str, Any]:
        now = time.time_ns()
        with self.state(now) as state:
            return state.snapshot(now, host, user, app)

    # -- following the writer -------------------------------------------------------------

    def _refresh(self) -> None:
        """The deltas appended since; on to the next file when the writer started one
        (after a snapshot); the snapshot only when the deltas do not follow on."""
        log_file = self._log
        if log_file is not None:
            replaced = log_file.replaced()  # first: then what it holds is all it gets
            if self._follow(log_file) and not replaced:
                return
        self._switch()

    def _follow(self, log_file: DeltaLog) -> bool:
        """Apply its new deltas; False when they do not follow on from the mirror."""
        mirror = self._mirror
        if log_file.header.epoch != mirror.epoch or log_file.header.base_seq > mirror.seq:
            return False
        deltas: list[ReadDelta] = []
        follows = True
        for payload in log_file.frames():
            try:
                delta = decode_delta(payload)
            except msgspec.DecodeError as exc:
                log.warning(
                    "sessions: a damaged delta in %s (%s); reading the snapshot", log_file.path, exc
                )
                follows = False
                break
            if delta.seq <= mirror.seq + len(deltas):
                continue
            if delta.seq != mirror.seq + len(deltas) + 1:
                follows = False
                break
            deltas.append(delta)
        if deltas:
            mirror.apply(deltas)
        return follows

    def _switch(self) -> None:
        self._drop_log()
        log_file = DeltaLog.open(self.delta_path)
        if log_file is not None and self._follow(log_file):
            self._log = log_file
            return
        self._read_snapshot()
        if log_file is not None and self._follow(log_file):
            self._log = log_file
        elif log_file is not None:
            log_file.close()

    def _drop_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _read_snapshot(self) -> None:
        try:
            found = os.stat(self.path)
        except FileNotFoundError:
            return
        version = (found.st_ino, found.st_mtime_ns, found.st_size)
        if version == self._snapshot_version:
            return
        self._snapshot_version = version  # a bad file is tried once, not at every request
        try:
            live = decode_snapshot(self.path.read_bytes())
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("sessions: cannot read %s (the last state stays): %s", self.path, exc)
            return
        self._mirror = SessionMirror.of(live, self.max_idle_ns)
        self.snapshots_read += 1


# -- HTTP ----------------------------------------------------------------------------------


def sessions_handler(reader: LiveSessionsReader) -> Callable[[Request], Response]:
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
        with self.reader.state() as state:  # scraped every 15-60 s: the buffer too
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
