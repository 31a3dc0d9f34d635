"""A retained summary per host on MQTT, so a subscriber that comes late sees at once who
is on: `<sessions.mqttTopic or <everythingTopic>/sessions>/<host>`.

Published when a host's summary changed, QoS 1, retained; checked every `CHECK_SECONDS`
(so at most that often per host), and never sooner than 10x what the last check cost
(reading 100,000 users takes ~0.15 s of CPU). A host whose users all left gets a summary of
zeros (a retained message stays until replaced). A thread with its own event loop and one aiomqtt
connection, off the event path; while the broker is away it retries, and on reconnect it
publishes every host again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from typing import Any

import aiomqtt

from senseflow.sessions import LiveSessionsReader
from shared.backoff import Backoff
from shared.config import Config
from shared.counters import Counters
from shared.logs import RateLimitedLog
from shared.sessions import UserEntry, iso_time
from workers.writer.sinks.mqtt import MqttSink, default_client_id

log = logging.getLogger("senseflow.sessions")

CHECK_SECONDS = 5.0
"""Each check follows the writer's deltas and builds every host's summary (when it decoded
the whole state and re-applied the reorder buffer once a second, at 10,000 events/s, that
cost the supervisor ~10 µs per event, benchmarks.ab)."""
RECHECK_SECONDS = 60.0
COST_FACTOR = 10
"""The pause after a check is at least this many times what it cost (a tenth of a core)."""
TIMEOUT = 10.0


def enabled(config: Config) -> bool:
    butler = config.butler
    return (
        config.pipeline.sessions.enable
        and butler.mqtt_config.enable
        and butler.user_events.send_to_mqtt.enable
    )


def base_topic(config: Config) -> str:
    everything = config.butler.user_events.send_to_mqtt.post_to.everything_topic.topic
    return config.pipeline.sessions.mqtt_topic or f"{everything}/sessions"


_NOT_IN_A_TOPIC_LEVEL = str.maketrans({"/": "_", "+": "_", "#": "_"})


def host_topic(base: str, host: str) -> str:
    """`<base>/<host>`, the host as one topic level: `/` and the wildcards `+` and `#` (a
    PUBLISH topic may not hold them) become `_`; the payload names the host as it is."""
    return f"{base}/{host.translate(_NOT_IN_A_TOPIC_LEVEL) or '_'}"


def summary(host: str, users: dict[str, UserEntry]) -> dict[str, Any]:
    """The host's counts and users (`DIR\\userid`, as Butler SOS lists them)."""
    entries = sorted(users.values(), key=lambda e: (e.directory.casefold(), e.user_id))
    return {
        "host": host,
        "sessions": sum(e.sessions for e in entries),
        "users": len(entries),
        "connections": sum(e.connections() for e in entries),
        "userList": [f"{e.directory}\\{e.user_id}" for e in entries],
    }


class SessionSummaries:
    def __init__(self, config: Config, reader: LiveSessionsReader) -> None:
        self.config = config
        self.reader = reader
        self.base = base_topic(config)
        self.published: dict[str, dict[str, Any]] = {}
        self.seen_version: tuple[int, int, int] | None = None
        self.recheck_at = 0.0
        self.failures = RateLimitedLog(log, interval=60.0)
        self.loop = asyncio.new_event_loop()
        self.stopping = asyncio.Event()
        self.thread = threading.Thread(target=self.run, name="sessions-mqtt", daemon=True)

    def start(self) -> None:
        self.thread.start()
        log.info("session summaries to MQTT %s/<host> (retained)", self.base)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stopping.set)
            self.thread.join(TIMEOUT + 1)

    def run(self) -> None:
        self.loop.run_until_complete(self.serve())
        self.loop.close()

    def changed(self) -> dict[str, dict[str, Any]]:
        """Summaries that differ from those published; only looked at when a new state was
        published, or every `RECHECK_SECONDS` (expiry changes the state without one)."""
        version, now = self.reader.version(), time.monotonic()
        if version == self.seen_version and now < self.recheck_at:
            return {}
        self.seen_version, self.recheck_at = version, now + RECHECK_SECONDS
        with self.reader.state(buffered=False) as state:
            current = {host: summary(host, users) for host, users in state.hosts.items()}
        for host in self.published.keys() - current.keys():
            current[host] = summary(host, {})
        return {h: s for h, s in current.items() if self.published.get(h) != s}

    async def serve(self) -> None:
        backoff = Backoff(base=0.5, cap=30.0)
        while not self.stopping.is_set():
            try:
                async with self.client() as client:
                    backoff.reset()
                    self.published.clear()  # a new connection: publish every host again
                    self.recheck_at = 0.0
                    await self.publish_loop(client)
            except aiomqtt.MqttError as exc:
                self.failures.warning("session summaries: MQTT: %s", exc)
            await self.pause(backoff.next_delay())

    async def publish_loop(self, client: aiomqtt.Client) -> None:
        while not self.stopping.is_set():
            started = time.thread_time()
            changed = self.changed()  # summaries of every user: costly at 100,000 users
            spent = time.thread_time() - started
            for host, shown in sorted(changed.items()):
                payload = json.dumps({**shown, "at": iso_time(self.reader.published_ns)})
                await client.publish(host_topic(self.base, host), payload, qos=1, retain=True)
                self.published[host] = shown
            await self.pause(max(CHECK_SECONDS, COST_FACTOR * spent))

    async def pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    def client(self) -> aiomqtt.Client:
        broker, options = self.config.butler.mqtt_config, self.config.pipeline.mqtt
        return aiomqtt.Client(
            broker.broker_host,
            broker.broker_port,
            username=options.username or None,
            password=options.password or None,
            identifier=f"{options.client_id or default_client_id()}-sessions",
            tls_context=MqttSink(self.config, Counters()).tls_context(),
            timeout=TIMEOUT,
        )
