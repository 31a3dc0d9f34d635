"""Issue 12 §4: the HTTP endpoint binds loopback, caps connections, times out half-finished
requests without a thread each, and asks for credentials everywhere but /healthz."""

from __future__ import annotations

import base64
import http.client
import socket
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from types import SimpleNamespace

from senseflow.httpserver import HttpLimits
from senseflow.metrics import MetricsServer
from senseflow.observers import http_limits
from senseflow.telemetry import Telemetry
from shared.config import Config, config_from_document, redact
from shared.ipc import Channels, MessageChannel


@contextmanager
def metrics_server(limits: HttpLimits | None = None) -> Iterator[MetricsServer]:
    raw, encoded = MessageChannel(1 << 16), MessageChannel(1 << 16)
    supervisor = SimpleNamespace(
        config=Config(),
        totals={"received": 1},
        signals=[],
        channels=Channels(raw, encoded, None, None),  # type: ignore[arg-type]
        telemetry=Telemetry(Config(), ["influxdb"]),
        destinations=lambda: ["influxdb"],
    )
    server = (
        MetricsServer(supervisor, "127.0.0.1", 0)
        if limits is None
        else MetricsServer(supervisor, "127.0.0.1", 0, limits)
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
        raw.close()
        encoded.close()


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def half_request(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # the blank line never comes
    return sock


def test_half_finished_requests_pin_no_thread_and_health_still_answers() -> None:
    with metrics_server() as server:
        before = threading.active_count()
        held = [half_request(server.port) for _ in range(50)]
        try:
            status, _ = get(server.port, "/healthz")
            status_metrics, body = get(server.port, "/metrics")
            threads = threading.active_count() - before
        finally:
            for sock in held:
                sock.close()
    assert status == 200
    assert status_metrics == 200 and b"senseflow_datagrams_received_total 1.0" in body
    assert threads <= 1


def test_connections_past_the_cap_are_closed_and_stalled_ones_time_out() -> None:
    limits = HttpLimits(max_connections=3, request_timeout=0.3)
    with metrics_server(limits) as server:
        held = [half_request(server.port) for _ in range(3)]
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        with closing(extra):
            extra.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            assert read_all(extra) == b""  # closed without an answer
        for sock in held:
            with closing(sock):
                assert read_all(sock) == b""  # the server gave up on the stalled head
        assert get(server.port, "/healthz")[0] == 200
        assert server.http.refused >= 1


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def test_token_or_basic_auth_guards_everything_but_health() -> None:
    limits = HttpLimits(token="s3cret-token", username="scraper", password="pw-123")
    basic = base64.b64encode(b"scraper:pw-123").decode()
    wrong = base64.b64encode(b"scraper:nope").decode()
    with metrics_server(limits) as server:
        assert get(server.port, "/metrics")[0] == 401
        assert get(server.port, "/metrics", {"Authorization": "Bearer wrong"})[0] == 401
        assert get(server.port, "/metrics", {"Authorization": f"Basic {wrong}"})[0] == 401
        assert get(server.port, "/metrics", {"Authorization": "Bearer s3cret-token"})[0] == 200
        assert get(server.port, "/metrics", {"Authorization": f"Basic {basic}"})[0] == 200
        assert get(server.port, "/healthz")[0] == 200
        assert get(server.port, "/nothing-here")[0] == 404


def test_default_bind_is_loopback_and_http_keys_are_read_and_redacted() -> None:
    assert Config().pipeline.metrics_host == "127.0.0.1"
    config = config_from_document(
        {"senseflow": {"http": {"host": "::1", "token": "${TOKEN}", "maxConnections": 5}}},
        {"TOKEN": "tok-abcdef"},
    )
    assert config.pipeline.http.host == "::1"
    limits = http_limits(config.pipeline)
    assert (limits.token, limits.max_connections) == ("tok-abcdef", 5)
    assert redact("Bearer tok-abcdef", config) == "Bearer ***"
