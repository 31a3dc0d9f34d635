"""Session snapshots in InfluxDB, in the measurements Butler SOS's proxy-session polling
writes, so its user-session dashboards work on what senseflow derives from the events.

What Butler SOS writes (github.com/ptarmiganlabs/butler-sos `src/lib/proxysessionmetrics.js`
prepUserSessionMetrics, `src/lib/influxdb/v1/sessions.js`), per server and virtual proxy,
every `userSessions.pollingInterval` (30 s):

    user_session_summary   session_count, session_user_id_list ("DIR\\u1,DIR\\u2")
    user_session_list      session_user_id_list (2.x/3.x: also session_count)
    user_session_details   one point per session: session_id, user_directory, user_id,
                           tagged also user_session_id, user_session_user_directory,
                           user_session_user_id

all tagged `host`, `user_session_host`, `user_session_virtual_proxy` and the server's tags.
Ours: `host` and `user_session_host` are the event's host, the virtual proxy is
`senseflow.sessions.virtualProxy` (events do not carry it), `source=user_events` tells
these points from Butler SOS's own, plus `userEvents.tags`. `user_session_details` is one
point per active user (events do not tell a user's sessions apart); its session id is
derived from host, user and `since`, so it stays the same while the user stays on.

Field types as Butler SOS's writers produce them, so a database it already wrote to gets
no field-type conflict: on 1.x (node-influx, no schema) every number is a float; on 2.x
`uintField` (`5u`); on 3.x `setIntegerField` (`5i`).
A host that had sessions earlier in this run is written with `session_count` 0 once it
has none, so a dashboard falls to 0 instead of holding the last value.

Ends (senseflow's own measurements), checked every `ENDED_SECONDS`: `user_session_ended`
(field `duration_seconds`) per ended session and `user_connection_ended` (fields
`duration_seconds`, `connections`, `app_name`) per app whose connections closed, tagged
`host`, `user` (`DIR\\userid`), `app` (connections with an app id), `source=user_events`
and `userEvents.tags`, timestamped at the end. The state numbers its ends and keeps the
latest `ENDED_KEEP` in its checkpoint, so a writer restart numbers them the same again and
a supervisor restart writes the kept ones once more: same series, same time, so the
points are overwritten, never doubled.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time

from senseflow.influxstats import (
    REQUEST_TIMEOUT,
    InfluxTarget,
    StatsWriteError,
    config_tags,
    measurement,
    tag_text,
)
from senseflow.sessions import LiveSessionsReader
from shared.config import Config
from shared.logs import RateLimitedLog
from shared.sessions import Ended, UserEntry
from workers.encode import escape_field_string

log = logging.getLogger("senseflow.sessions")

SOURCE = "user_events"
ENDED_SECONDS = 1.0
"""Each check follows the writer's deltas since the last one, which costs what changed
(when it decoded the whole state, a check every second cost ~10 µs per event at 10,000/s,
so it ran every 5 s; the state keeps only its latest 4,096-8,191 ends, ~2,400 a second
there, so most were never written)."""
LINES_PER_POST = 5000


def enabled(config: Config) -> bool:
    butler = config.butler
    return (
        config.pipeline.sessions.enable
        and butler.influxdb_config.enable
        and butler.user_events.send_to_influxdb.enable
    )


def session_id(host: str, entry: UserEntry) -> str:
    key = f"{host}\x00{entry.directory}\x00{entry.user_id}".casefold()
    return hashlib.blake2b(f"{key}\x00{entry.since_ns}".encode(), digest_size=8).hexdigest()


class SnapshotLines:
    """Line protocol of one snapshot; remembers the hosts it wrote (for their zeros)."""

    def __init__(self, config: Config) -> None:
        self.version = config.butler.influxdb_config.version
        self.virtual_proxy = config.pipeline.sessions.virtual_proxy
        self.extra = config_tags(config.butler.user_events.tags)
        self.hosts: set[str] = set()
        self.detail_text: dict[tuple[str, str, str, int], str] = {}
        """Each session's tags and fields: they change only with a new session, and
        building them is most of a snapshot's cost (100,000 users: ~2 s of CPU each)."""

    def count(self, value: int) -> str:
        return {1: f"{float(value)!r}", 2: f"{value}u"}.get(self.version, f"{value}i")

    def lines(self, hosts: dict[str, dict[str, UserEntry]], at_ns: int) -> bytes:
        self.hosts |= hosts.keys()
        out: list[str] = []
        known = self.detail_text
        seen: dict[tuple[str, str, str, int], str] = {}
        for host in sorted(self.hosts):
            users = sorted(
                hosts.get(host, {}).values(), key=lambda e: (e.directory.casefold(), e.user_id)
            )
            tags = [
                ("host", host),
                ("user_session_host", host),
                ("user_session_virtual_proxy", self.virtual_proxy),
                ("source", SOURCE),
                *self.extra,
            ]
            common = tag_text(tags)
            listed = escape_field_string(",".join(f"{e.directory}\\{e.user_id}" for e in users))
            count = self.count(sum(e.sessions for e in users))
            out.append(
                f"user_session_summary{common} session_count={count},"
                f'session_user_id_list="{listed}" {at_ns}'
            )
            list_count = "" if self.version == 1 else f"session_count={count},"
            out.append(
                f'user_session_list{common} {list_count}session_user_id_list="{listed}" {at_ns}'
            )
            out.extend(self.details(host, users, common, at_ns, known, seen))
        self.detail_text = seen
        return "".join(line + "\n" for line in out).encode()

    @staticmethod
    def details(
        host: str,
        users: list[UserEntry],
        common: str,
        at_ns: int,
        known: dict[tuple[str, str, str, int], str],
        seen: dict[tuple[str, str, str, int], str],
    ) -> list[str]:
        prefix = f"{measurement('user_session_details')}{common}"
        lines = []
        for entry in users:
            key = (host, entry.directory, entry.user_id, entry.since_ns)
            text = known.get(key)
            if text is None:
                text = detail_text(host, entry)
            seen[key] = text
            lines.append(f"{prefix}{text} {at_ns}")
        return lines


def detail_text(host: str, entry: UserEntry) -> str:
    """A session's own tags and its fields, as in `user_session_details`."""
    sid = session_id(host, entry)
    own = tag_text(
        [
            ("user_session_id", sid),
            ("user_session_user_directory", entry.directory),
            ("user_session_user_id", entry.user_id),
        ]
    )
    fields = (
        f'session_id="{sid}",user_directory="{escape_field_string(entry.directory)}",'
        f'user_id="{escape_field_string(entry.user_id)}"'
    )
    return f"{own} {fields}"


def chunks(body: bytes, lines: int) -> list[bytes]:
    """`body` cut after every `lines` lines (InfluxDB 1.x refuses bodies over 25 MB)."""
    split = body.splitlines(keepends=True)
    return [b"".join(split[i : i + lines]) for i in range(0, len(split), lines)]


_SERIES: dict[tuple[object, ...], tuple[str, str]] = {}
_SERIES_MAX = 1 << 16


def ended_lines(ended: list[Ended], extra: list[tuple[str, str]], integers: bool) -> bytes:
    out = []
    extra_key = tuple(extra)
    for end in ended:
        where = (end.host, end.directory, end.user_id, end.app_id, end.app_name, extra_key)
        series = _SERIES.get(where)  # escaping is most of the cost, and the users repeat
        if series is None:
            series = _series(end, extra)
            if len(_SERIES) >= _SERIES_MAX:
                _SERIES.clear()
            _SERIES[where] = series
        head, app_name = series
        seconds = f"duration_seconds={max(0, end.end_ns - end.since_ns) / 1e9!r}"
        if end.app_id is None:
            out.append(f"{head} {seconds} {end.end_ns}\n")
        else:
            count = f"{end.connections}i" if integers else f"{float(end.connections)!r}"
            out.append(f"{head} {seconds},connections={count}{app_name} {end.end_ns}\n")
    return "".join(out).encode()


def _series(end: Ended, extra: list[tuple[str, str]]) -> tuple[str, str]:
    """The measurement and tags of an end's line, and its `app_name` field."""
    tags = [("host", end.host), ("user", f"{end.directory}\\{end.user_id}")]
    if end.app_id is None:
        name, app_name = "user_session_ended", ""
    else:
        tags.append(("app", end.app_id))
        name = "user_connection_ended"
        app_name = f',app_name="{escape_field_string(end.app_name)}"'
    return f"{name}{tag_text([*tags, ('source', SOURCE), *extra])}", app_name


class SessionSnapshots:
    """A thread writing a snapshot every `sessions.snapshotInterval` seconds."""

    def __init__(self, config: Config, reader: LiveSessionsReader) -> None:
        self.reader = reader
        self.interval = config.pipeline.sessions.snapshot_interval
        self.target = InfluxTarget(config)
        self.snapshot = SnapshotLines(config)
        self.integers = config.butler.influxdb_config.version != 1
        self.next_seq = 0
        """The first end not written yet (0 after a start: the kept ones again)."""
        self.written_version = (0, 0)
        self.failures = RateLimitedLog(log, interval=60.0)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="sessions-influx", daemon=True)

    def start(self) -> None:
        self.thread.start()
        log.info("session snapshots to InfluxDB every %d s", self.interval)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(REQUEST_TIMEOUT + 1)

    def run(self) -> None:
        due = time.monotonic() + self.interval
        while not self.stopping.wait(ENDED_SECONDS):
            self.write_ended()
            if time.monotonic() >= due:
                due += self.interval
                self.write()
        self.write_ended()

    def write_ended(self) -> None:
        """Ends the writer numbered since the last write, and those of the events still in
        its reorder buffer (numbered here for now: written again once the writer has
        numbered them; the same points, so nothing doubles)."""
        with self.reader.state(buffered=False) as state:
            confirmed = self.reader.confirmed_seq
            new = [e for e in state.ended if e.seq >= self.next_seq]
            version = (self.reader.published_ns, state.ended_seq)
        if not new or version == self.written_version:
            return
        if new[0].seq > self.next_seq and self.next_seq:
            self.failures.warning(
                "sessions: %d ended session(s) were not written (more ended than kept)",
                new[0].seq - self.next_seq,
            )
        body = ended_lines(new, self.snapshot.extra, self.integers)
        try:
            self.target.post(body)
        except StatsWriteError as exc:
            if exc.retryable:
                self.failures.warning("cannot write ended sessions to InfluxDB: %s", exc)
                return  # tried again next time
            self.failures.warning("InfluxDB refused ended sessions (not sent again): %s", exc)
        self.next_seq, self.written_version = confirmed, version

    def write(self) -> None:
        now = time.time_ns()
        with self.reader.state(now) as state:  # the buffer too: at most one replay per interval
            body = self.snapshot.lines(state.hosts, now)
        try:
            for chunk in chunks(body, LINES_PER_POST):
                self.target.post(chunk)
        except StatsWriteError as exc:  # the next snapshot carries the state again
            self.failures.warning("cannot write session snapshots to InfluxDB: %s", exc)
