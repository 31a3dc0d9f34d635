"""A plain, obviously correct model of SPEC 3a, to check shared/sessions.py against.

No ordering tricks, no lazy sweeps, no shared strings: before every event, every idle user
everywhere is expired; each rule is written as the SPEC states it; snapshots are computed
from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.sessions import SessionEvent, iso_time

START, STOP, OPEN, CLOSE = range(4)


@dataclass
class App:
    name: str
    connections: int
    since: int


@dataclass
class User:
    directory: str
    user_id: str
    sessions: int
    since: int
    last_seen: int
    browser: str = ""
    os: str = ""
    apps: dict[str, App] = field(default_factory=dict)


@dataclass
class ReferenceState:
    max_idle: int
    clock: int = 0
    users: dict[tuple[str, str, str], User] = field(default_factory=dict)
    counters: dict[str, int] = field(
        default_factory=lambda: {
            "sessions.unmatched_stop": 0,
            "sessions.unmatched_close": 0,
            "sessions.implicit_start": 0,
            "sessions.expired": 0,
        }
    )

    def expire(self, now: int) -> None:
        self.clock = max(self.clock, now)
        for key, user in list(self.users.items()):
            if self.clock - user.last_seen >= self.max_idle:
                del self.users[key]
                self.counters["sessions.expired"] += 1

    def apply(self, event: SessionEvent) -> None:
        self.expire(event.time_ns)
        now = self.clock
        key = (event.host, event.user_directory.casefold(), event.user_id.casefold())
        user = self.users.get(key)
        if event.action == START:
            if user is None:
                user = self.users[key] = User(event.user_directory, event.user_id, 0, now, now)
            user.sessions += 1
        elif event.action == STOP:
            if user is None:
                self.counters["sessions.unmatched_stop"] += 1
                return
            user.sessions -= 1
            if user.sessions == 0:
                del self.users[key]
                return
        elif event.action == OPEN:
            if user is None:
                self.counters["sessions.implicit_start"] += 1
                user = self.users[key] = User(event.user_directory, event.user_id, 1, now, now)
            if event.app_id in user.apps:
                user.apps[event.app_id].connections += 1
            else:
                user.apps[event.app_id] = App("", 1, now)
            if event.app_name:
                user.apps[event.app_id].name = event.app_name
        else:
            if user is None or event.app_id not in user.apps:
                self.counters["sessions.unmatched_close"] += 1
                if user is None:
                    return
            else:
                user.apps[event.app_id].connections -= 1
                if user.apps[event.app_id].connections == 0:
                    del user.apps[event.app_id]
        user.last_seen = now
        if event.browser_name:
            user.browser = f"{event.browser_name} {event.browser_major}".strip()
        if event.os_name:
            user.os = f"{event.os_name} {event.os_version}".strip()

    def snapshot(
        self, at: int, host: str | None = None, user: str | None = None, app: str | None = None
    ) -> dict[str, Any]:
        self.expire(at)
        hosts: dict[str, list[dict[str, Any]]] = {}
        distinct = set()
        for (host_name, dir_key, id_key), record in self.users.items():
            if host is not None and host_name.casefold() != host.casefold():
                continue
            if user is not None and user.casefold() not in (id_key, f"{dir_key}\\{id_key}"):
                continue
            apps = [
                {
                    "appId": app_id or None,
                    "appName": a.name or None,
                    "connections": a.connections,
                    "since": iso_time(a.since),
                }
                for app_id, a in sorted(record.apps.items())
                if app is None or app.casefold() in (app_id.casefold(), a.name.casefold())
            ]
            if app is not None and not apps:
                continue
            distinct.add((dir_key, id_key))
            hosts.setdefault(host_name, []).append(
                {
                    "userDirectory": record.directory,
                    "userId": record.user_id,
                    "sessions": record.sessions,
                    "since": iso_time(record.since),
                    "lastSeen": iso_time(record.last_seen),
                    "browser": record.browser or None,
                    "os": record.os or None,
                    "apps": apps,
                }
            )
        shown = []
        for host_name in sorted(hosts, key=lambda h: (h.casefold(), h)):
            active = sorted(
                hosts[host_name],
                key=lambda u: (u["userDirectory"].casefold(), u["userId"].casefold()),
            )
            shown.append(
                {
                    "host": host_name,
                    "sessions": sum(u["sessions"] for u in active),
                    "users": len(active),
                    "connections": sum(a["connections"] for u in active for a in u["apps"]),
                    "active": active,
                }
            )
        return {
            "at": iso_time(at),
            "totals": {
                "sessions": sum(h["sessions"] for h in shown),
                "users": len(distinct),
                "connections": sum(h["connections"] for h in shown),
            },
            "hosts": shown,
        }


def _user_order(user: dict[str, Any]) -> tuple[str, str]:
    return user["userDirectory"].casefold(), user["userId"].casefold()
