"""The live page (`GET /`): who is on Qlik Sense now, served from the package's assets.

The page is static (senseflow/web/: HTML, one script, one style sheet, no CDN); it polls
`/api/sessions` every second with `If-None-Match`, so an unchanged state costs a 304 and
no JSON encoding. Encoded documents are shared between viewers until the writer publishes
again. `/api/sessions/history` is a ring of per-minute peaks since start (the chart).

Auth: the data routes follow the HTTP server's token / basic auth. The page itself holds
no data: with a user/password it is protected too (the browser asks once and sends the
credentials with the page's requests); with a bearer token only, the page is public and
takes the token from `?token=` (kept in sessionStorage, sent as `Authorization`).
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from senseflow.httpserver import Handler, HttpServer, Request, Response
from senseflow.sessions import LiveSessionsReader
from shared.sessions import EXPIRED
from shared.sessionview import iso_time

HISTORY_MINUTES = 60
SAMPLE_SECONDS = 10.0
"""How often the chart's per-minute peaks are sampled: each sample may decode the writer's
latest state, so not more often than the chart needs."""
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/live/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/live/style.css": ("style.css", "text/css; charset=utf-8"),
}
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def asset_handler(name: str, content_type: str) -> Handler:
    body = resources.files("senseflow.web").joinpath(name).read_bytes()

    def answer(request: Request) -> Response:
        return Response(200, content_type, body, dict(PAGE_HEADERS))

    return answer


def conditional_sessions(
    reader: LiveSessionsReader,
    handler: Callable[[Request], Response],
    clock: Callable[[], float] = time.time,
) -> Callable[[Request], Response]:
    """`handler` behind an ETag: the published state's time and the idle sweeps so far.
    A matching `If-None-Match` is a 304. An encoded answer is reused for the same query
    within the same second (its `at`, which the page takes for the server's clock, is at
    most a second old)."""
    cache: dict[tuple[str, str, int], Response] = {}

    def answer(request: Request) -> Response:
        with reader.state() as state:
            tag = f'"{reader.published_ns:x}-{state.counters.get(EXPIRED, 0):x}"'
        headers = {"ETag": tag, "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == tag:
            return Response(304, "application/json", b"", headers)
        key = (tag, request.query, int(clock()))
        cached = cache.get(key)
        if cached is None:
            fresh = handler(request)
            cached = Response(fresh.status, fresh.content_type, fresh.body, headers)
            if len(cache) >= 16 or any(old[0] != key[0] or old[2] != key[2] for old in cache):
                cache.clear()
            cache[key] = cached
        return cached

    return answer


@dataclass
class Minute:
    minute: int
    sessions: int
    users: int
    connections: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": iso_time(self.minute * 60 * 10**9),
            "sessions": self.sessions,
            "users": self.users,
            "connections": self.connections,
        }


class SessionHistory:
    """Per-minute peaks of the totals, sampled every `every` seconds on a thread; the last
    `HISTORY_MINUTES` minutes since start."""

    def __init__(self, reader: LiveSessionsReader, every: float = SAMPLE_SECONDS) -> None:
        self.reader = reader
        self.every = every
        self.minutes: collections.deque[Minute] = collections.deque(maxlen=HISTORY_MINUTES)
        self.lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="session-history", daemon=True)

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stopped.wait(self.every):
            self.sample()

    def sample(self, now_ns: int | None = None) -> None:
        now = time.time_ns() if now_ns is None else now_ns
        with self.reader.state(now, buffered=False) as state:
            sessions, users, connections = state.totals()
        minute = now // (60 * 10**9)
        with self.lock:
            last = self.minutes[-1] if self.minutes else None
            if last is not None and last.minute == minute:
                last.sessions = max(last.sessions, sessions)
                last.users = max(last.users, users)
                last.connections = max(last.connections, connections)
            else:
                self.minutes.append(Minute(minute, sessions, users, connections))

    def document(self) -> dict[str, list[dict[str, Any]]]:
        with self.lock:
            minutes = [m.as_dict() for m in self.minutes]
        return {"minutes": minutes}

    def answer(self, request: Request) -> Response:
        body = json.dumps(self.document()).encode()
        return Response(200, "application/json", body, {"Cache-Control": "no-store"})


def serve_live_page(http: HttpServer, reader: LiveSessionsReader) -> SessionHistory:
    """`/`, its assets and `/api/sessions/history` on `http` (`/api/sessions` and its ETags:
    `senseflow.observers.serve_sessions`); the history's sampler, started."""
    page_public = not http.limits.username
    for path, (name, content_type) in ASSETS.items():
        http.route(path, asset_handler(name, content_type), public=page_public)
    history = SessionHistory(reader)
    http.route("/api/sessions/history", history.answer)
    history.start()
    return history
