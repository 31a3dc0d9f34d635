"""What the supervisor runs beside its children: `/metrics` + `/healthz`, InfluxDB stats."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from senseflow.httpserver import HttpLimits
    from senseflow.metrics import MetricsServer, Observed
    from senseflow.sessions import LiveSessionsReader
    from shared.config import Config, Pipeline

log = logging.getLogger("senseflow.supervisor")


class Observer(Protocol):
    def stop(self) -> None: ...


class Observers:
    """Started before the children (so that /healthz answers during boot), stopped last."""

    def __init__(self) -> None:
        self.running: list[Observer] = []

    def stop(self) -> None:
        for observer in reversed(self.running):
            observer.stop()
        self.running.clear()


def start_observers(supervisor: Observed) -> Observers | None:
    """None when the metrics port cannot be bound (reported, the service does not start)."""
    from senseflow.influxstats import InfluxStats
    from senseflow.livepage import serve_live_page
    from senseflow.metrics import MetricsServer
    from senseflow.sessions import LiveSessionsReader

    observers = Observers()
    pipe = supervisor.config.pipeline
    reader = LiveSessionsReader.of(supervisor.config) if pipe.sessions.enable else None
    port = pipe.http_port or pipe.metrics_port
    if port > 0:
        try:
            host = pipe.http.host or pipe.metrics_host
            server = MetricsServer(supervisor, host, port, http_limits(pipe))
        except (OSError, OverflowError) as exc:
            log.error("cannot serve metrics on %s:%d: %s", pipe.metrics_host, port, exc)
            return None
        if reader is not None:
            serve_sessions(server, reader, pipe.sessions.app_metrics_limit)
            observers.running.append(serve_live_page(server.http, reader))
        server.start()
        observers.running.append(server)
    stats = InfluxStats(supervisor)
    if stats.enabled:
        stats.start()
        observers.running.append(stats)
    if reader is not None:
        observers.running.extend(session_exports(supervisor.config, reader))
    return observers


def serve_sessions(server: MetricsServer, reader: LiveSessionsReader, app_limit: int) -> None:
    """`/api/sessions` (merged with the peers' views) and the session gauges, from what the
    writer publishes."""
    from senseflow.livepage import conditional_sessions
    from senseflow.peers import merged_handler
    from senseflow.sessions import SessionCollector, sessions_handler

    pipe = server.supervisor.config.pipeline
    local = sessions_handler(reader)
    handler = merged_handler(
        local,
        pipe.peers,
        pipe.peer_token,
        pipe.peer_timeout,
        local_view=conditional_sessions(reader, local),
    )
    server.http.route("/api/sessions", handler)
    server.registry.register(SessionCollector(reader, app_limit))


def session_exports(config: Config, reader: LiveSessionsReader) -> list[Observer]:
    """InfluxDB snapshots and MQTT summaries of the live sessions, started."""
    from senseflow import sessionsinflux, sessionsmqtt

    exports: list[sessionsinflux.SessionSnapshots | sessionsmqtt.SessionSummaries] = []
    if sessionsinflux.enabled(config):
        exports.append(sessionsinflux.SessionSnapshots(config, reader))
    if sessionsmqtt.enabled(config):
        exports.append(sessionsmqtt.SessionSummaries(config, reader))
    for export in exports:
        export.start()
    return list(exports)


def http_limits(pipe: Pipeline) -> HttpLimits:
    from senseflow.httpserver import HttpLimits

    http = pipe.http
    return HttpLimits(
        http.max_connections, http.request_timeout, http.token, http.username, http.password
    )
