"""Parse + enrich + encode: the CPU work of a worker, for one datagram or a whole batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import msgspec

from shared.config import Config
from shared.counternames import EVENTS, EXCLUDED, INVALID_PREFIX
from shared.events import ACTIONS, EncodedBatch, RawBatch, UserEvent
from workers.encode import EventEncoder
from workers.enrich import Enricher
from workers.eventcount import EventCounts, event_counts_enabled
from workers.parse import parse_datagram
from workers.writer.destinations import enabled_destinations

_ACTION_INDEX = {action: index for index, action in enumerate(ACTIONS)}
_Encoders = tuple[
    Callable[[UserEvent], str] | None,
    Callable[[UserEvent], bytes] | None,
    Callable[[UserEvent], bytes] | None,
]


class EventPipeline:
    """Built once per worker process; `process_batch` is the hot path."""

    def __init__(self, config: Config, app_names: Mapping[str, str] | None = None) -> None:
        self.enricher = Enricher(config, app_names)
        self.encoder = EventEncoder(config)
        # Which encodings to make: those the enabled records name (the writer feeds exactly
        # those destinations); one encoding serves every destination that names it (NATS
        # publishes the MQTT payloads).
        needed = {destination.encoder for destination in enabled_destinations(config)}
        self.to_influx = "line" in needed
        self.to_mqtt = "mqtt" in needed
        self.to_newrelic = "newrelic" in needed
        self.encoders = self._encoders()
        self.event_counts = EventCounts() if event_counts_enabled(config) else None
        self.to_sessions = config.pipeline.sessions.enable
        self._msgpack = msgspec.msgpack.Encoder()

    def set_app_names(self, app_names: Mapping[str, str]) -> None:
        self.enricher.app_names = app_names

    def event_or_reason(self, data: bytes, received_ns: int) -> UserEvent | str:
        """The enriched event, 'excluded', or the reason it is invalid."""
        event = parse_datagram(data, received_ns)
        counts = self.event_counts
        if isinstance(event, str):
            if counts is not None:
                counts.add_unknown()
            return event
        if counts is not None:  # Butler SOS counts before it excludes users
            counts.add(event.message_type, event.host, event.origin)
        if self.enricher.is_excluded(event):
            return EXCLUDED
        self.enricher.enrich(event)
        return event

    def process_batch(self, raw: RawBatch) -> EncodedBatch:
        # The hot path: `event_or_reason` inlined, methods and flags looked up once a batch.
        lines: list[str] = []
        payloads: list[bytes] = []
        actions = bytearray()
        newrelic: list[bytes] = []
        received: list[int] = []
        counters: dict[str, int] = {}
        parse, enrich = parse_datagram, self.enricher.enrich
        is_excluded = self.enricher.is_excluded if self.enricher.excluded else None
        to_line, to_mqtt, to_newrelic = self.encoders
        counts = self.event_counts
        sessions: list[tuple[object, ...]] | None = [] if self.to_sessions else None
        if counts is not None:
            counts.begin()
        for data, received_ns in zip(raw.datagrams, raw.received_ns, strict=True):
            event = parse(data, received_ns)
            if isinstance(event, str):
                _count(counters, INVALID_PREFIX + event)
                if counts is not None:
                    counts.add_unknown()
                continue
            if counts is not None:  # Butler SOS counts before it excludes users
                counts.add(event.message_type, event.host, event.origin)
            if is_excluded is not None and is_excluded(event):
                _count(counters, EXCLUDED)
                continue
            enrich(event)
            received.append(received_ns)
            if to_line is not None:
                lines.append(to_line(event))
            if to_mqtt is not None:
                payloads.append(to_mqtt(event))
                actions.append(_ACTION_INDEX[event.command])
            if to_newrelic is not None:
                newrelic.append(to_newrelic(event))
            if sessions is not None:  # as shared.sessions.SessionEvent, without building one
                sessions.append(
                    (
                        received_ns,
                        _ACTION_INDEX[event.command],
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
                )
        counters[EVENTS] = len(received)
        return EncodedBatch(
            lines="".join(lines).encode(),
            mqtt_payloads=payloads,
            actions=bytes(actions),
            newrelic=newrelic,
            received_ns=received,
            counters=counters,
            sessions=self._msgpack.encode(sessions) if sessions else b"",
        )

    def _encoders(self) -> _Encoders:
        """The encoders the records name (line, MQTT, New Relic), None where not needed."""
        encoder = self.encoder
        return (
            encoder.line if self.to_influx else None,
            encoder.mqtt if self.to_mqtt else None,
            encoder.newrelic if self.to_newrelic else None,
        )


def _count(counters: dict[str, int], key: str) -> None:
    counters[key] = counters.get(key, 0) + 1
