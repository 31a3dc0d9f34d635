"""The live page's server side (senseflow/livepage.py): assets from the package, auth of
the page, ETags on /api/sessions, the per-minute history; and whole large answers."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from senseflow.httpserver import HttpLimits, HttpServer, Request, Response
from senseflow.livepage import (
    HISTORY_MINUTES,
    SessionHistory,
    conditional_sessions,
    serve_live_page,
)
from senseflow.sessions import LiveSessionsReader, sessions_handler
from shared.events import ACTIONS
from shared.sessionlive import encode_live, write_atomically
from shared.sessions import SessionEvent, SessionState

MINUTE_NS = 60 * 10**9


def publish(path: Path, users: int, now_ns: int | None = None) -> None:
    """What the writer publishes: `users` users with a session on SENSE1."""
    now = time.time_ns() if now_ns is None else now_ns
    state = SessionState(86_400 * 10**9)
    for index in range(users):
        state.apply(SessionEvent(now, ACTIONS.index("Start session"), "SENSE1", "LAB", f"u{index}"))
    write_atomically(path, encode_live(state, [], now))


@contextmanager
def live_server(tmp_path: Path, limits: HttpLimits | None = None) -> Iterator[HttpServer]:
    reader = LiveSessionsReader(tmp_path / "sessions.live", 86_400 * 10**9)
    server = HttpServer("127.0.0.1", 0, limits)
    server.route("/api/sessions", conditional_sessions(reader, sessions_handler(reader)))
    history = serve_live_page(server, reader)
    server.start()
    try:
        yield server
    finally:
        history.stop()
        server.stop()


def fetch(
    port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_the_page_and_its_assets_come_from_the_package(tmp_path: Path) -> None:
    with live_server(tmp_path) as server:
        status, headers, page = fetch(server.port, "/")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert b'<script src="live/app.js"' in page and b"<table" not in page
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert headers["Referrer-Policy"] == "no-referrer"  # ?token= must not leak
        for path, kind in (("/live/app.js", "text/javascript"), ("/live/style.css", "text/css")):
            status, headers, body = fetch(server.port, path)
            assert status == 200 and headers["Content-Type"].startswith(kind) and body
        assert b"http://" not in page  # nothing from the internet (no CDN)


def test_with_a_token_the_page_is_public_and_the_data_is_not(tmp_path: Path) -> None:
    with live_server(tmp_path, HttpLimits(token="t0k")) as server:
        assert fetch(server.port, "/")[0] == 200
        assert fetch(server.port, "/live/app.js")[0] == 200
        status, headers, _ = fetch(server.port, "/api/sessions")
        assert status == 401  # and no Basic challenge: a browser would prompt for a password
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert fetch(server.port, "/api/sessions/history")[0] == 401
        assert fetch(server.port, "/api/sessions", {"Authorization": "Bearer t0k"})[0] == 200


def test_with_basic_auth_the_page_asks_for_credentials_too(tmp_path: Path) -> None:
    with live_server(tmp_path, HttpLimits(username="ops", password="pw")) as server:
        status, headers, _ = fetch(server.port, "/")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        assert fetch(server.port, "/live/app.js")[0] == 401


def test_unchanged_sessions_answer_304_and_a_new_publish_a_new_etag(tmp_path: Path) -> None:
    live = tmp_path / "sessions.live"
    publish(live, 2)
    with live_server(tmp_path) as server:
        status, headers, body = fetch(server.port, "/api/sessions")
        assert status == 200 and json.loads(body)["totals"]["users"] == 2
        tag = headers["ETag"]
        status, headers, body = fetch(server.port, "/api/sessions", {"If-None-Match": tag})
        assert (status, body, headers["ETag"]) == (304, b"", tag)
        assert fetch(server.port, "/api/sessions?user=u1", {"If-None-Match": "x"})[0] == 200
        publish(live, 3, time.time_ns() + 1)
        status, headers, body = fetch(server.port, "/api/sessions", {"If-None-Match": tag})
        assert status == 200 and json.loads(body)["totals"]["users"] == 3
        assert headers["ETag"] != tag


def test_an_unchanged_answer_is_encoded_once_a_second_at_most(tmp_path: Path) -> None:
    live = tmp_path / "sessions.live"
    publish(live, 2)
    reader = LiveSessionsReader(live, 86_400 * 10**9)
    encoded: list[str] = []

    def handler(request: Request) -> Response:
        encoded.append(request.query)
        return Response(200, "application/json", f"{len(encoded)}".encode())

    now = [1000.2]
    answer = conditional_sessions(reader, handler, clock=lambda: now[0])

    def ask(query: str = "") -> Response:
        return answer(Request("GET", "/api/sessions", query, {}))

    assert [ask().body, ask().body, ask("user=u1").body] == [b"1", b"1", b"2"]
    now[0] = 1000.9
    assert ask().body == b"1"  # the same second: shared by every viewer
    now[0] = 1001.0
    assert ask().body == b"3"  # a new second: `at` stays at most a second old
    publish(live, 3, time.time_ns() + 1)
    assert ask().body == b"4"  # a new state
    assert encoded == ["", "user=u1", "", ""]


def test_large_answers_arrive_whole_at_a_slow_reader(tmp_path: Path) -> None:
    """A body far past the transport's high-water mark (10,000 users' JSON is megabytes),
    read in small pieces through a small receive buffer (as a browser parsing it)."""
    big = b"x" * (8 << 20)
    server = HttpServer("127.0.0.1", 0)
    server.route("/big", lambda request: Response(200, "text/plain", big))
    for listening in server._server.sockets:  # inherited by the accepted sockets (Linux)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    server.start()
    try:
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.settimeout(10)
            client.connect(("127.0.0.1", server.port))
            client.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            received = bytearray()
            while chunk := client.recv(1024):
                received += chunk
    finally:
        server.stop()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and len(body) == len(big)


def test_history_keeps_per_minute_peaks_of_the_last_hour(tmp_path: Path) -> None:
    live = tmp_path / "sessions.live"
    reader = LiveSessionsReader(live, 86_400 * 10**9)
    history = SessionHistory(reader)
    start = (time.time_ns() // MINUTE_NS) * MINUTE_NS
    for minute, users in enumerate((1, 4, 2, 0)):
        publish(live, users, start + minute * MINUTE_NS)
        history.sample(start + minute * MINUTE_NS + 1)
    publish(live, 1, start + 3 * MINUTE_NS + 5)
    history.sample(start + 3 * MINUTE_NS + 10)  # same minute: the peak stays
    publish(live, 0, start + 3 * MINUTE_NS + 20)
    history.sample(start + 3 * MINUTE_NS + 30)
    minutes = history.document()["minutes"]
    assert [m["users"] for m in minutes] == [1, 4, 2, 1]
    assert minutes[0]["at"].endswith(":00.000Z")
    for minute in range(4, HISTORY_MINUTES + 10):
        history.sample(start + minute * MINUTE_NS)
    assert len(history.document()["minutes"]) == HISTORY_MINUTES


def test_the_history_is_served_as_json(tmp_path: Path) -> None:
    publish(tmp_path / "sessions.live", 2)
    with live_server(tmp_path) as server:
        status, _, body = fetch(server.port, "/api/sessions/history")
    assert status == 200
    assert json.loads(body)["minutes"][-1]["users"] == 2  # sampled at start
