"""The `/api/sessions` document (SPEC 3a) of a session state: filters, order, counts."""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.sessions import AppEntry, UserEntry


def sessions_document(
    hosts: dict[str, dict[str, UserEntry]],
    at_ns: int,
    host: str | None = None,
    user: str | None = None,
    app: str | None = None,
) -> dict[str, Any]:
    """Hosts sorted by name, users by directory and id, apps by id; with a user or app
    filter only hosts with a match; every count is of what is shown."""
    view = _Filter(host, user, app)
    shown_hosts = [
        shown
        for name in sorted(hosts, key=lambda h: (h.casefold(), h))
        if view.host_matches(name) and (shown := _host_view(name, hosts[name], view)) is not None
    ]
    users = {key for h in shown_hosts for key in h.pop("_keys")}
    totals = {
        "sessions": sum(h["sessions"] for h in shown_hosts),
        "users": len(users),
        "connections": sum(h["connections"] for h in shown_hosts),
    }
    return {"at": iso_time(at_ns), "totals": totals, "hosts": shown_hosts}


class _Filter:
    """`?host=`, `?user=` (DIR\\id or id) and `?app=` (id or name), case-insensitive."""

    def __init__(self, host: str | None, user: str | None, app: str | None) -> None:
        self.host = host.casefold() if host else None
        self.user = user.casefold() if user else None
        self.app = app.casefold() if app else None

    def host_matches(self, host: str) -> bool:
        return self.host is None or host.casefold() == self.host

    def user_matches(self, entry: UserEntry) -> bool:
        if self.user is None:
            return True
        user_id = entry.user_id.casefold()
        return self.user in (user_id, f"{entry.directory.casefold()}\\{user_id}")

    def app_matches(self, app_id: str, app: AppEntry) -> bool:
        return self.app is None or self.app in (app_id.casefold(), app.app_name.casefold())


def _host_view(host: str, users: dict[str, UserEntry], view: _Filter) -> dict[str, Any] | None:
    active = []
    keys = []
    for key, entry in users.items():
        if not view.user_matches(entry):
            continue
        shown = _user_view(entry, view)
        if shown is not None:
            active.append(shown)
            keys.append(key)
    if not active and (view.user or view.app):
        return None
    active.sort(key=lambda u: (u["userDirectory"].casefold(), u["userId"].casefold()))
    return {
        "host": host,
        "sessions": sum(u["sessions"] for u in active),
        "users": len(active),
        "connections": sum(a["connections"] for u in active for a in u["apps"]),
        "active": active,
        "_keys": keys,
    }


def _user_view(entry: UserEntry, view: _Filter) -> dict[str, Any] | None:
    apps = [
        {
            "appId": app_id or None,
            "appName": app.app_name or None,
            "connections": app.connections,
            "since": iso_time(app.since_ns),
        }
        for app_id, app in sorted((entry.apps or {}).items())
        if view.app_matches(app_id, app)
    ]
    if view.app and not apps:
        return None
    return {
        "userDirectory": entry.directory,
        "userId": entry.user_id,
        "sessions": entry.sessions,
        "since": iso_time(entry.since_ns),
        "lastSeen": iso_time(entry.last_seen_ns),
        "browser": entry.browser or None,
        "os": entry.os or None,
        "apps": apps,
    }


def iso_time(ns: int) -> str:
    """ISO 8601, UTC, milliseconds (as the MQTT payload's `timestamp`)."""
    seconds, rest = divmod(ns, 1_000_000_000)
    return f"{_iso_second(seconds)}.{rest // 1_000_000:03d}Z"


@functools.lru_cache(maxsize=65536)
def _iso_second(seconds: int) -> str:
    """A document's times cluster in a few seconds: format each second once."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
