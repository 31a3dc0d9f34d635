"""The supervisor's copy of the writer's session state, kept by the writer's deltas.

`SessionMirror` holds what the writer's state held at its latest publish (a snapshot, then
each `LiveDelta` applied: removals, changed entries, counters, ends) and a copy of the
writer's reorder buffer. It is never changed by anything else, so the next delta always
applies to exactly what the writer had. `view()` makes the `SessionState` the readers use:
the mirror's per-host dicts copied (references only) and the buffered events applied on
top, to copies of just the entries they touch; idle users are swept in the view, never in
the mirror.
"""

from __future__ import annotations

import bisect
import heapq
import operator

import msgspec

from shared.sessiondelta import NOTHING_WAITS, Batch, ReadDelta, decode_entry
from shared.sessionlive import LiveSessions
from shared.sessions import (
    COUNTER_NAMES,
    ENDED_KEEP,
    AppEntry,
    Ended,
    SessionEvent,
    SessionState,
    UserEntry,
    user_key,
)

_EVENTS = msgspec.msgpack.Decoder(list[SessionEvent])
_time = operator.attrgetter("time_ns")
_KEYS_MAX = 1 << 16


class SessionMirror:
    def __init__(self, max_idle_ns: int) -> None:
        self.max_idle_ns = max_idle_ns
        self.epoch = 0
        self.seq = 0
        self.published_ns = 0
        self.clock_ns = 0
        self.hosts: dict[str, dict[str, UserEntry]] = {}
        self.user_hosts: dict[str, int] = {}
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self.ended: list[Ended] = []
        self.ended_seq = 0
        self.waiting: list[SessionEvent] = []
        """The writer's reorder buffer, decoded so far; `pending` holds the rest."""
        self.pending: list[Batch] = []
        self.first_waiting_ns = NOTHING_WAITS
        self._keys: dict[str, tuple[str, str]] = {}

    @classmethod
    def of(cls, live: LiveSessions, max_idle_ns: int) -> SessionMirror:
        mirror = cls(max_idle_ns)
        saved = live.state
        mirror.epoch, mirror.seq, mirror.published_ns = live.epoch, live.seq, live.published_ns
        mirror.clock_ns, mirror.hosts = saved.clock_ns, saved.hosts
        mirror.counters.update(saved.counters)
        mirror.ended, mirror.ended_seq = saved.ended, saved.ended_seq
        for users in mirror.hosts.values():
            for key in users:
                mirror.user_hosts[key] = mirror.user_hosts.get(key, 0) + 1
        mirror.waiting = live.waiting
        return mirror

    # -- deltas ---------------------------------------------------------------------------

    def apply(self, deltas: list[ReadDelta]) -> None:
        """The writer's next publishes, in order (the first is `self.seq + 1`). Entries
        are decoded once per user: the last change of each, in the order of those."""
        latest: dict[tuple[str, str], msgspec.Raw | None] = {}  # None: the user left
        for delta in deltas:
            for end in delta.ended:
                if end.app_id is None:  # a session ended: the user left that host
                    where = (end.host, user_key(end.directory, end.user_id))
                    latest.pop(where, None)
                    latest[where] = None
            for host, key, raw in delta.entries:
                where = (host, key)
                latest.pop(where, None)
                latest[where] = raw
            self._take(delta)
        hosts, user_hosts = self.hosts, self.user_hosts
        for (host, key), encoded in latest.items():
            if encoded is None:
                self._remove(host, key)
                continue
            users = hosts.get(host)
            if users is None:
                users = hosts[host] = {}
            if users.pop(key, None) is None:
                user_hosts[key] = user_hosts.get(key, 0) + 1
            users[key] = decode_entry(encoded)  # at the end: last-seen order, as the writer's

    def _take(self, delta: ReadDelta) -> None:
        """Everything of a delta but its entries."""
        self.ended.extend(delta.ended)
        if len(self.ended) >= 2 * ENDED_KEEP:
            del self.ended[:-ENDED_KEEP]
        self.seq, self.published_ns = delta.seq, delta.published_ns
        self.clock_ns, self.ended_seq = delta.clock_ns, delta.ended_seq
        self.counters.update(delta.counters)
        self.pending.extend(delta.batches)
        self._cut(delta.first_waiting_ns)

    def _remove(self, host: str, key: str) -> None:
        users = self.hosts.get(host)
        if users is None or users.pop(key, None) is None:
            return
        if not users:
            del self.hosts[host]
        left = self.user_hosts[key] - 1
        if left:
            self.user_hosts[key] = left
        else:
            del self.user_hosts[key]

    def _cut(self, first_waiting_ns: int) -> None:
        """Drop what the writer has applied since: everything before its first waiting
        event; batches wholly before it go undecoded."""
        self.first_waiting_ns = first_waiting_ns
        if first_waiting_ns == NOTHING_WAITS:
            self.waiting, self.pending = [], []
            return
        del self.waiting[: bisect.bisect_left(self.waiting, first_waiting_ns, key=_time)]
        self.pending = [b for b in self.pending if b.latest_ns >= first_waiting_ns]

    def buffered(self) -> list[SessionEvent]:
        """The writer's reorder buffer, in its order (pending batches decoded and merged
        as the writer merged them)."""
        for batch in self.pending:
            events = _EVENTS.decode(batch.events)
            events.sort(key=_time)
            merge_into(self.waiting, events)
        self.pending = []
        if self.first_waiting_ns != NOTHING_WAITS:
            self._cut(self.first_waiting_ns)
        return self.waiting

    # -- the view -------------------------------------------------------------------------

    @property
    def buffering(self) -> bool:
        """The writer's reorder buffer holds events (`view` differs from `confirmed`)."""
        return self.first_waiting_ns != NOTHING_WAITS or bool(self.waiting)

    def view(self) -> SessionState:
        """The published state with the reorder buffer applied: the per-host dicts copied
        (references) and the buffered events applied to copies of the entries they touch,
        so the mirror stays as the writer's."""
        view = self._copy()
        waiting = self.buffered()
        if waiting:
            self._overlay(view, waiting)
        return view

    def confirmed(self, now_ns: int) -> SessionState:
        """The published state without the reorder buffer, to be swept at `now_ns`: it
        shares the mirror's dicts (no copy) unless that sweep would change them."""
        cutoff = now_ns - self.max_idle_ns
        if any(next(iter(users.values())).last_seen_ns <= cutoff for users in self.hosts.values()):
            return self._copy()
        view = SessionState(self.max_idle_ns)
        view.clock_ns = self.clock_ns
        view.hosts, view._user_hosts = self.hosts, self.user_hosts
        view.counters.update(self.counters)
        view.ended, view.ended_seq = list(self.ended), self.ended_seq
        return view

    def _copy(self) -> SessionState:
        view = SessionState(self.max_idle_ns)
        view.clock_ns = self.clock_ns
        view.hosts = {host: dict(users) for host, users in self.hosts.items()}
        view._user_hosts = dict(self.user_hosts)
        view.counters.update(self.counters)
        view.ended, view.ended_seq = list(self.ended), self.ended_seq
        return view

    def _overlay(self, view: SessionState, waiting: list[SessionEvent]) -> None:
        touched = dict.fromkeys((e.host, self._key(e)) for e in waiting)
        part = SessionState(self.max_idle_ns)
        part.clock_ns, part.ended_seq = self.clock_ns, self.ended_seq
        seeded, seeded_hosts = part.hosts, part._user_hosts
        for host, key in touched:  # not in last-seen order: each is touched by an event,
            entry = self.hosts.get(host, {}).get(key)  # which finds it expired if it is
            if entry is not None:
                seeded.setdefault(host, {})[key] = copy_entry(entry)
                seeded_hosts[key] = seeded_hosts.get(key, 0) + 1
        part.apply_all(waiting)
        hosts, user_hosts = view.hosts, view._user_hosts
        for host, key in touched:
            shown_before = hosts.get(host)
            if shown_before is not None and shown_before.pop(key, None) is not None:
                user_hosts[key] -= 1
                if not user_hosts[key]:
                    del user_hosts[key]
        for host, users in part.hosts.items():
            shown = hosts.setdefault(host, {})
            for key, entry in users.items():
                shown[key] = entry
                user_hosts[key] = user_hosts.get(key, 0) + 1
        for host in [h for h, users in hosts.items() if not users]:
            del hosts[host]
        for name, count in part.counters.items():
            view.counters[name] = view.counters.get(name, 0) + count
        view.ended.extend(part.ended)
        view.ended_seq = part.ended_seq
        view.clock_ns = max(view.clock_ns, part.clock_ns)

    def _key(self, event: SessionEvent) -> str:
        known = self._keys.get(event.user_id)
        if known is not None and known[0] == event.user_directory:
            return known[1]
        key = user_key(event.user_directory, event.user_id)
        if len(self._keys) >= _KEYS_MAX:
            self._keys.clear()
        self._keys[event.user_id] = (event.user_directory, key)
        return key


def copy_entry(entry: UserEntry) -> UserEntry:
    apps = entry.apps
    return UserEntry(
        entry.directory,
        entry.user_id,
        entry.sessions,
        entry.since_ns,
        entry.last_seen_ns,
        entry.browser,
        entry.os,
        None
        if apps is None
        else {k: AppEntry(a.app_name, a.connections, a.since_ns) for k, a in apps.items()},
    )


def merge_into(waiting: list[SessionEvent], events: list[SessionEvent]) -> None:
    """`events` (sorted) into `waiting` in time order, equal times after those already
    there: as the writer's reorder buffer merges (workers/writer/sessions.py)."""
    if not events:
        return
    if not waiting or events[0].time_ns >= waiting[-1].time_ns:
        waiting.extend(events)
        return
    start = bisect.bisect_right(waiting, events[0].time_ns, key=_time)
    overlap = waiting[start:]
    del waiting[start:]
    waiting.extend(heapq.merge(overlap, events, key=_time))
