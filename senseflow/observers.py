"""What the supervisor runs beside its children: `/metrics` + `/healthz`, InfluxDB stats."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from senseflow.httpserver import HttpLimits
    from senseflow.metrics import MetricsServer, Observed
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
    from senseflow.metrics import MetricsServer

    observers = Observers()
    pipe = supervisor.config.pipeline
    port = pipe.http_port or pipe.metrics_port
    if port > 0:
        try:
            host = pipe.http.host or pipe.metrics_host
            server = MetricsServer(supervisor, host, port, http_limits(pipe))
        except (OSError, OverflowError) as exc:
            log.error("cannot serve metrics on %s:%d: %s", pipe.metrics_host, port, exc)
            return None
        if pipe.sessions.enable:
            serve_sessions(server, supervisor.config)
        server.start()
        observers.running.append(server)
    stats = InfluxStats(supervisor)
    if stats.enabled:
        stats.start()
        observers.running.append(stats)
    return observers


def serve_sessions(server: MetricsServer, config: Config) -> None:
    """`/api/sessions` and the session gauges, from what the writer publishes."""
    from senseflow.sessions import LiveSessionsReader, SessionCollector, sessions_handler

    reader = LiveSessionsReader.of(config)
    server.http.route("/api/sessions", sessions_handler(reader))
    server.registry.register(SessionCollector(reader, config.pipeline.sessions.app_metrics_limit))


def http_limits(pipe: Pipeline) -> HttpLimits:
    from senseflow.httpserver import HttpLimits

    http = pipe.http
    return HttpLimits(
        http.max_connections, http.request_timeout, http.token, http.username, http.password
    )
