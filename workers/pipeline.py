"""Parse + enrich + encode: the CPU work of a worker, for one datagram or a whole batch."""

from __future__ import annotations

from collections.abc import Mapping

from shared.config import Config
from shared.events import ACTIONS, EncodedBatch, RawBatch, UserEvent
from workers.encode import EventEncoder
from workers.enrich import Enricher
from workers.parse import parse_datagram

_ACTION_INDEX = {action: index for index, action in enumerate(ACTIONS)}


class EventPipeline:
    """Built once per worker process; `process_batch` is the hot path."""

    def __init__(self, config: Config, app_names: Mapping[str, str] | None = None) -> None:
        butler = config.butler
        self.enricher = Enricher(config, app_names)
        self.encoder = EventEncoder(config)
        self.to_influx = butler.influxdb_config.enable and butler.user_events.send_to_influxdb.enable
        self.to_mqtt = butler.mqtt_config.enable and butler.user_events.send_to_mqtt.enable
        self.to_newrelic = butler.new_relic.enable and butler.user_events.send_to_new_relic.enable

    def set_app_names(self, app_names: Mapping[str, str]) -> None:
        self.enricher.app_names = app_names

    def event_or_reason(self, data: bytes, received_ns: int) -> UserEvent | str:
        """The enriched event, 'excluded', or the reason it is invalid."""
        event = parse_datagram(data, received_ns)
        if isinstance(event, str):
            return event
        if self.enricher.is_excluded(event):
            return "excluded"
        self.enricher.enrich(event)
        return event

    def process_batch(self, raw: RawBatch) -> EncodedBatch:
        lines: list[str] = []
        payloads: list[bytes] = []
        actions = bytearray()
        newrelic: list[bytes] = []
        received: list[int] = []
        counters: dict[str, int] = {}
        encoder = self.encoder
        for data, received_ns in zip(raw.datagrams, raw.received_ns, strict=True):
            event = self.event_or_reason(data, received_ns)
            if isinstance(event, str):
                key = "excluded" if event == "excluded" else f"invalid.{event}"
                counters[key] = counters.get(key, 0) + 1
                continue
            received.append(received_ns)
            if self.to_influx:
                lines.append(encoder.line(event))
            if self.to_mqtt:
                payloads.append(encoder.mqtt(event))
                actions.append(_ACTION_INDEX[event.command])
            if self.to_newrelic:
                newrelic.append(encoder.newrelic(event))
        counters["events"] = len(received)
        return EncodedBatch(
            lines="".join(lines).encode(),
            mqtt_payloads=payloads,
            actions=bytes(actions),
            newrelic=newrelic,
            received_ns=received,
            counters=counters,
        )
