"""Live sessions (SPEC 3a): who is on which Sense host, derived from the user events.

The state is pure: events go in (`apply`, in receive-time order), counts and snapshots come
out. The writer keeps one from the spool, `senseflow who` rebuilds one from InfluxDB, and
both use this code, so they agree by construction.

Layout, chosen for memory (100,000 sessions must fit well under 200 MB): per host one dict
from the user's key to a `UserEntry`, kept in last-seen order (an event moves its user to the
end), so expiry only looks at the front of each dict. An entry exists exactly while the user
has at least one session there; a user's connections live in `apps`, None until the first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import msgspec

from shared import counternames
from shared.events import UserEvent
from shared.sessionview import iso_time as iso_time  # re-exported: times as shown
from shared.sessionview import sessions_document

START, STOP, OPEN, CLOSE = range(4)
"""Action codes, the indexes of `shared.events.ACTIONS`."""

UNMATCHED_STOP = counternames.SESSIONS_UNMATCHED_STOP
UNMATCHED_CLOSE = counternames.SESSIONS_UNMATCHED_CLOSE
IMPLICIT_START = counternames.SESSIONS_IMPLICIT_START
EXPIRED = counternames.SESSIONS_EXPIRED
COUNTER_NAMES = counternames.SESSION_OUTCOMES

SWEEP_EVERY_NS = 1_000_000_000
"""Idle users are swept at most once per second of event time (and before every snapshot);
a user's own event always finds its stale entry first, so lazy sweeps change nothing."""


class SessionEvent(msgspec.Struct, array_like=True, gc=False):
    """What the session state needs of one user event; '' means not known.

    Workers send these as plain msgpack arrays (`EncodedBatch.sessions`), in this order.
    """

    time_ns: int
    action: int
    host: str
    user_directory: str
    user_id: str
    app_id: str = ""
    app_name: str = ""
    browser_name: str = ""
    browser_major: str = ""
    os_name: str = ""
    os_version: str = ""


class AppEntry(msgspec.Struct, array_like=True, gc=False):
    app_name: str
    connections: int
    since_ns: int


class UserEntry(msgspec.Struct, array_like=True, gc=False):
    """One user on one host: `directory` and `user_id` as first seen there."""

    directory: str
    user_id: str
    sessions: int
    since_ns: int
    last_seen_ns: int
    browser: str = ""
    os: str = ""
    apps: dict[str, AppEntry] | None = None

    def connections(self) -> int:
        return sum(a.connections for a in self.apps.values()) if self.apps else 0


class Ended(msgspec.Struct, array_like=True, gc=False):
    """A session (`app_id` None) or an app's connections (`connections` of them) that
    ended at `end_ns`, open since `since_ns`; `seq` numbers them in the order they ended."""

    seq: int
    end_ns: int
    since_ns: int
    host: str
    directory: str
    user_id: str
    app_id: str | None = None
    app_name: str = ""
    connections: int = 0


ENDED_KEEP = 4096
"""The latest ends the state keeps (in its checkpoint) for the InfluxDB export to pick up."""


class Checkpoint(msgspec.Struct, array_like=True):
    """The whole state, for a checkpoint; dict order (last-seen order) survives msgpack."""

    max_idle_ns: int
    clock_ns: int
    hosts: dict[str, dict[str, UserEntry]]
    counters: dict[str, int]
    ended: list[Ended] = []
    ended_seq: int = 0


def user_key(directory: str, user_id: str) -> str:
    """Users compare case-insensitively, as `excludeUser` does; fields never hold NUL."""
    return f"{directory}\x00{user_id}".casefold()


def browser_label(name: str, version: str) -> str:
    """`Chrome 119`, `Windows 10`: name and version, as shown."""
    return f"{name} {version}" if name and version else name


def session_event(event: UserEvent, action: int) -> SessionEvent:
    """The session view of an enriched event (`action` is its index in ACTIONS)."""
    return SessionEvent(
        event.received_ns,
        action,
        event.host,
        event.user_directory,
        event.user_id,
        event.app_id,
        event.app_name,
        event.ua_browser_name,
        event.ua_browser_major,
        event.ua_os_name,
        event.ua_os_version,
    )


class SessionState:
    """Rules 1-6 of SPEC 3a, with per-host and total counts kept up to date."""

    def __init__(self, max_idle_ns: int, sweep_every_ns: int = SWEEP_EVERY_NS) -> None:
        self.max_idle_ns = max_idle_ns
        self.sweep_every_ns = sweep_every_ns
        self.clock_ns = 0
        self.hosts: dict[str, dict[str, UserEntry]] = {}
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self._user_hosts: dict[str, int] = {}
        self._next_sweep_ns = 0
        self.ended: list[Ended] = []
        self.ended_seq = 0

    # -- events ----------------------------------------------------------------------------

    def apply(self, event: SessionEvent) -> None:
        self.apply_all((event,))

    def apply_all(self, events: Iterable[SessionEvent]) -> None:
        """Apply `events`, in receive-time order.

        The writer's per-event cost: one frame for a whole run of events, with the common
        paths (a known user's open, close, start) inline; the rare ones call out.
        """
        clock, next_sweep = self.clock_ns, self._next_sweep_ns
        hosts, max_idle, counters = self.hosts, self.max_idle_ns, self.counters
        labels, ended, keys, user_hosts = _LABELS, self.ended, _KEYS, self._user_hosts
        for event in events:
            now = event.time_ns
            if now < clock:  # a late event: time does not go back
                now = clock
            else:
                clock = now
            if now >= next_sweep:
                self.clock_ns = clock
                self.sweep(now)
                next_sweep = self._next_sweep_ns
            host = event.host
            # Subscripts, not .get: cheaper on the hit, and misses are rare.
            try:
                users = hosts[host]
            except KeyError:
                users = hosts[host] = {}
            known = keys.get(event.user_id)  # user_key, cached: user names repeat
            if known is not None and known[0] == event.user_directory:
                key = known[1]
            else:  # (not an exception: with many users, misses are not rare)
                key = _new_key(event.user_directory, event.user_id)
            entry = users.pop(key, None)
            if entry is not None and now - entry.last_seen_ns >= max_idle:
                self._end(host, entry, entry.last_seen_ns)
                self._forget(key, counted=True)
                entry = None
            action = event.action
            if entry is None:  # _begin, inlined
                if action in (STOP, CLOSE):
                    counters[UNMATCHED_STOP if action == STOP else UNMATCHED_CLOSE] += 1
                    if not users:
                        del hosts[host]
                    continue
                entry = UserEntry(event.user_directory, event.user_id, 1, now, now)
                user_hosts[key] = user_hosts.get(key, 0) + 1
                if action == OPEN:
                    counters[IMPLICIT_START] += 1
                    entry.apps = {_shared(event.app_id): AppEntry(_shared(event.app_name), 1, now)}
            elif action == OPEN:
                apps = entry.apps
                if apps is None:
                    apps = entry.apps = {}
                app = apps.get(event.app_id)
                if app is None:
                    apps[_shared(event.app_id)] = AppEntry(_shared(event.app_name), 1, now)
                else:
                    app.connections += 1
                    name = event.app_name
                    if name and name != app.app_name:
                        app.app_name = _shared(name)
            elif action == CLOSE:
                apps = entry.apps
                app_id = event.app_id
                app = apps.get(app_id) if apps else None
                if app is None:
                    counters[UNMATCHED_CLOSE] += 1
                else:  # _record, inlined
                    ended.append(
                        Ended(
                            self.ended_seq,
                            now,
                            app.since_ns,
                            host,
                            entry.directory,
                            entry.user_id,
                            app_id,
                            app.app_name,
                            1,
                        )
                    )
                    self.ended_seq += 1
                    if len(ended) >= 2 * ENDED_KEEP:
                        del ended[:-ENDED_KEEP]
                    app.connections -= 1
                    if not app.connections:
                        del apps[app_id]  # type: ignore[union-attr]
                        if not apps:
                            entry.apps = None
            elif action == START:
                entry.sessions += 1
            else:  # STOP
                entry.sessions -= 1
                if not entry.sessions:  # the user's last session there
                    self._end(host, entry, now)
                    entry.apps = None
                    self._forget(key, counted=False)
                    if not users:
                        del hosts[host]
                    continue
            entry.last_seen_ns = now
            name = event.browser_name
            if name:  # _label, its hit inlined
                try:
                    entry.browser = labels[name][event.browser_major]
                except KeyError:
                    entry.browser = _label(name, event.browser_major)
            name = event.os_name
            if name:
                try:
                    entry.os = labels[name][event.os_version]
                except KeyError:
                    entry.os = _label(name, event.os_version)
            users[key] = entry  # at the end: the dict stays in last-seen order
        self.clock_ns = clock

    def _end(self, host: str, entry: UserEntry, end_ns: int) -> None:
        """The user's session on the host ended, and with it their open connections."""
        for app_id, app in (entry.apps or {}).items():
            self._record(host, entry, end_ns, app.since_ns, app_id, app.app_name, app.connections)
        self._record(host, entry, end_ns, entry.since_ns)

    def _record(
        self,
        host: str,
        entry: UserEntry,
        end_ns: int,
        since_ns: int,
        app_id: str | None = None,
        app_name: str = "",
        connections: int = 0,
    ) -> None:
        ended = self.ended
        ended.append(
            Ended(
                self.ended_seq,
                end_ns,
                since_ns,
                host,
                entry.directory,
                entry.user_id,
                app_id,
                app_name,
                connections,
            )
        )
        self.ended_seq += 1
        if len(ended) >= 2 * ENDED_KEEP:
            del ended[:-ENDED_KEEP]

    def _forget(self, key: str, *, counted: bool) -> None:
        """A user (already popped from a host's dict) leaves that host."""
        if counted:
            self.counters[EXPIRED] += 1
        left = self._user_hosts[key] - 1
        if left:
            self._user_hosts[key] = left
        else:
            del self._user_hosts[key]

    # -- time ------------------------------------------------------------------------------

    def sweep(self, now_ns: int) -> None:
        """Remove every user idle for `max_idle_ns` at `now_ns` (rule 5)."""
        self.clock_ns = max(self.clock_ns, now_ns)
        self._next_sweep_ns = self.clock_ns + self.sweep_every_ns
        cutoff = self.clock_ns - self.max_idle_ns
        for host, users in list(self.hosts.items()):
            stale = []
            for key, entry in users.items():
                if entry.last_seen_ns > cutoff:
                    break
                stale.append(key)
            for key in stale:  # an expired session ends at its last event
                entry = users.pop(key)
                self._end(host, entry, entry.last_seen_ns)
                self._forget(key, counted=True)
            if not users:
                del self.hosts[host]

    # -- counts ----------------------------------------------------------------------------

    def totals(self) -> tuple[int, int, int]:
        """(sessions, users, connections) over all hosts; a user on two hosts counts once."""
        sessions = connections = 0
        for entry in self.entries():
            sessions += entry.sessions
            connections += entry.connections()
        return sessions, len(self._user_hosts), connections

    def entries(self) -> Iterator[UserEntry]:
        for users in self.hosts.values():
            yield from users.values()

    def snapshot(
        self,
        at_ns: int,
        host: str | None = None,
        user: str | None = None,
        app: str | None = None,
    ) -> dict[str, Any]:
        """The `/api/sessions` document at `at_ns` (idle users swept first), filtered."""
        self.sweep(at_ns)
        return sessions_document(self.hosts, at_ns, host, user, app)

    # -- checkpoints -----------------------------------------------------------------------

    def checkpoint(self) -> bytes:
        return _ENCODER.encode(self.saved())

    def saved(self) -> Checkpoint:
        """The state as a `Checkpoint` (sharing, not copying, the entries)."""
        return Checkpoint(
            self.max_idle_ns,
            self.clock_ns,
            self.hosts,
            dict(self.counters),
            self.ended[-ENDED_KEEP:],
            self.ended_seq,
        )

    @classmethod
    def restore(
        cls, data: bytes, max_idle_ns: int | None = None, sweep_every_ns: int = SWEEP_EVERY_NS
    ) -> SessionState:
        return cls.from_checkpoint(_DECODER.decode(data), max_idle_ns, sweep_every_ns)

    @classmethod
    def from_checkpoint(
        cls, saved: Checkpoint, max_idle_ns: int | None = None, sweep_every_ns: int = SWEEP_EVERY_NS
    ) -> SessionState:
        state = cls(saved.max_idle_ns if max_idle_ns is None else max_idle_ns, sweep_every_ns)
        state.clock_ns = saved.clock_ns
        state.hosts = saved.hosts
        state.counters.update(saved.counters)
        state.ended, state.ended_seq = saved.ended, saved.ended_seq
        for users in state.hosts.values():
            for key, entry in users.items():
                state._user_hosts[key] = state._user_hosts.get(key, 0) + 1
                entry.browser, entry.os = _shared(entry.browser), _shared(entry.os)
        return state


_LABELS: dict[str, dict[str, str]] = {}
_VERSIONS_MAX = 256


def _label(name: str, version: str) -> str:
    """`browser_label`, one shared copy of each (bounded: the values come from outside)."""
    by_version = _LABELS.get(name)
    if by_version is not None:
        label = by_version.get(version)
        if label is not None:
            return label
    label = browser_label(name, version)
    if by_version is None and len(_LABELS) < _SHARED_MAX:
        by_version = _LABELS[name] = {}
    if by_version is not None and len(by_version) < _VERSIONS_MAX:
        by_version[version] = label
    return label


_KEYS: dict[str, tuple[str, str]] = {}
_KEYS_MAX = 1 << 16


def _new_key(directory: str, user_id: str) -> str:
    """`user_key`, remembered by user id (a bounded number: the values come from outside)."""
    key = user_key(directory, user_id)
    if len(_KEYS) >= _KEYS_MAX:
        _KEYS.clear()
    _KEYS[user_id] = (directory, key)
    return key


_SHARED: dict[str, str] = {}
_SHARED_MAX = 4096


def _shared(text: str) -> str:
    """Browsers, systems and app names repeat: keep one copy of each (a bounded number:
    the values come from outside, and `sys.intern` would keep them for good)."""
    found = _SHARED.get(text)
    if found is not None:
        return found
    if len(_SHARED) < _SHARED_MAX:
        _SHARED[text] = text
    return text


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Checkpoint)
