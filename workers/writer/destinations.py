"""Every destination, declared once: the registry the whole service reads.

A record says what the rest of the code needs to know about a destination:

- `name`: its counter suffix (`written.<name>`, ...), metric label (`destination="<name>"`),
  spool cursor and task names;
- `enabled(config)`: whether this configuration sends to it (the worker encodes for it
  and the writer feeds it exactly when this says so);
- `encoder`: the `workers.encode.EventEncoder` method that encodes one event for it (its
  output travels in the `EncodedBatch` field of the same purpose);
- `sink()`: its sink class (imported only when called: only the writer and `check-config`
  load sink code), built as `sink(config, counters, on_ack)`;
- `identity(config)`: what it writes to (server, database, topics, accounts), recorded in
  every spool segment so that a backlog is never replayed into another target;
- `probe` and `describe(config)`: how `check-config` tries it. "sink" starts its sink and
  closes it again, then prints `describe(config)`; "influx-write" pings and writes an
  empty body with the control plane's InfluxDB client (never creating the database, which
  the sink's start would), and says itself what it found.

Adding a destination: its encoder method, its sink module, its record here, and its
`EncodedBatch` field (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from shared.config import Config
from shared.counters import Counting
from shared.tls import scheme

if TYPE_CHECKING:
    from workers.writer.sinks.base import Acknowledge, Sink


class SinkFactory(Protocol):
    def __call__(
        self, config: Config, counters: Counting, on_ack: Acknowledge | None = None
    ) -> Sink: ...


@dataclass(frozen=True)
class Destination:
    name: str
    enabled: Callable[[Config], bool]
    encoder: Literal["line", "mqtt", "newrelic"]
    sink: Callable[[], SinkFactory]
    identity: Callable[[Config], str]
    probe: Literal["sink", "influx-write"] = "sink"
    describe: Callable[[Config], str] | None = None


def _influx_sink() -> SinkFactory:
    from workers.writer.sinks.influx import InfluxSink

    return InfluxSink


def _mqtt_sink() -> SinkFactory:
    from workers.writer.sinks.mqtt import MqttSink

    return MqttSink


def _newrelic_sink() -> SinkFactory:
    from workers.writer.sinks.newrelic import NewRelicSink

    return NewRelicSink


def _nats_sink() -> SinkFactory:
    from workers.writer.sinks.nats import NatsSink

    return NatsSink


def _describe_nats(config: Config) -> str:
    nats = config.pipeline.nats
    return (
        f"NATS {', '.join(nats.servers)} accepted us; JetStream stream {nats.stream} "
        f"takes {nats.subject_prefix}.>"
    )


def _nats_identity(config: Config) -> str:
    nats = config.pipeline.nats
    return f"nats stream={nats.stream} subjects={nats.subject_prefix}.>"


def _describe_mqtt(config: Config) -> str:
    broker = config.butler.mqtt_config
    return f"MQTT broker {broker.broker_host}:{broker.broker_port} accepted our CONNECT"


def _describe_newrelic(config: Config) -> str:
    butler = config.butler
    accounts = butler.user_events.send_to_new_relic.destination_account or []
    return (
        f"New Relic API at {butler.new_relic.event.url} answers; accounts "
        f"{json.dumps(accounts)} (API keys are verified by the first write)"
    )


def _influx_identity(config: Config) -> str:
    influx = config.butler.influxdb_config
    server = f"{scheme(config.pipeline.influx_tls)}://{influx.host}:{influx.port}"
    target = {
        1: f"v1 db={influx.v1_config.db_name} rp={influx.v1_config.retention_policy.name}",
        2: f"v2 org={influx.v2_config.org} bucket={influx.v2_config.bucket}",
        3: f"v3 database={influx.v3_config.database}",
    }[influx.version]
    return f"{server} {target}"


def _mqtt_identity(config: Config) -> str:
    post_to = config.butler.user_events.send_to_mqtt.post_to
    topics = sorted(
        topic.topic
        for name in post_to.__struct_fields__
        if (topic := getattr(post_to, name)).enable
    )
    broker = config.butler.mqtt_config
    return f"mqtt://{broker.broker_host}:{broker.broker_port} topics={','.join(topics)}"


def _newrelic_identity(config: Config) -> str:
    butler = config.butler
    accounts = {
        a.account_name: a.account_id for a in butler.third_party_tools_credentials.new_relic or []
    }
    wanted = butler.user_events.send_to_new_relic.destination_account or []
    ids = ",".join(sorted(accounts.get(name, name) for name in wanted))
    return f"{butler.new_relic.event.url} accounts={ids}"


INFLUXDB = Destination(
    name="influxdb",
    enabled=lambda c: (
        c.butler.influxdb_config.enable and c.butler.user_events.send_to_influxdb.enable
    ),
    encoder="line",
    sink=_influx_sink,
    identity=_influx_identity,
    probe="influx-write",
)
MQTT = Destination(
    name="mqtt",
    enabled=lambda c: c.butler.mqtt_config.enable and c.butler.user_events.send_to_mqtt.enable,
    encoder="mqtt",
    sink=_mqtt_sink,
    identity=_mqtt_identity,
    describe=_describe_mqtt,
)
NEWRELIC = Destination(
    name="newrelic",
    enabled=lambda c: c.butler.new_relic.enable and c.butler.user_events.send_to_new_relic.enable,
    encoder="newrelic",
    sink=_newrelic_sink,
    identity=_newrelic_identity,
    describe=_describe_newrelic,
)

NATS = Destination(
    name="nats",
    enabled=lambda c: c.pipeline.nats.enable,
    encoder="mqtt",  # the same JSON: one encoding per event serves both
    sink=_nats_sink,
    identity=_nats_identity,
    describe=_describe_nats,
)

DESTINATIONS: tuple[Destination, ...] = (INFLUXDB, MQTT, NEWRELIC, NATS)
"""Every destination, in the order the writer starts them and the logs list them."""


def enabled_destinations(config: Config) -> list[Destination]:
    return [destination for destination in DESTINATIONS if destination.enabled(config)]


def destination_names(config: Config) -> list[str]:
    """The names of the destinations this configuration sends to."""
    return [destination.name for destination in enabled_destinations(config)]


def make_sink(
    destination: Destination,
    config: Config,
    counters: Counting,
    on_ack: Acknowledge | None = None,
) -> Sink:
    """Its sink; `on_ack` receives its acknowledgements (None: count them right away)."""
    return destination.sink()(config, counters, on_ack)
