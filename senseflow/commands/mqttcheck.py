"""`check-config` for MQTT: our own publisher's handshake, then a probe on every topic.

MQTT 3.1.1 has no reason codes: a broker whose ACL denies a topic acknowledges the
PUBLISH and drops the message, so senseflow would count as written what nobody gets. The
only way to tell is to publish a probe to each enabled topic and read it back on a
subscription, with the service's own credentials. Subscribers of those topics see one
probe message each (`messageType` `senseflow-probe`).

The check never uses the service's client id: a broker that sees one id twice drops the
older connection, which would be the running service's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import ssl
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import msgspec

from shared.config import Config, redact

PROBE_TYPE = "senseflow-probe"
SUBSCRIBE_FAILED = 0x80


def check_client_id(config: Config) -> str:
    """A client id of the check's own, recognisably derived from the service's."""
    from workers.writer.sinks.mqtt import default_client_id

    base = config.pipeline.mqtt.client_id or default_client_id().rpartition("-")[0]
    return f"{base}-check-{secrets.token_hex(4)}"


def with_client_id(config: Config, client_id: str) -> Config:
    pipe = config.pipeline
    mqtt = msgspec.structs.replace(pipe.mqtt, client_id=client_id)
    return msgspec.structs.replace(config, pipeline=msgspec.structs.replace(pipe, mqtt=mqtt))


def enabled_topics(config: Config) -> list[str]:
    post_to = config.butler.user_events.send_to_mqtt.post_to
    topics = (getattr(post_to, field) for field in post_to.__struct_fields__)
    return list(dict.fromkeys(t.topic for t in topics if t.enable and t.topic))


@dataclass
class Probes:
    """What became of the probe published to each enabled topic."""

    topics: list[str]
    swallowed: list[str] = field(default_factory=list)
    """Acknowledged by the broker, never delivered."""
    refused: list[str] = field(default_factory=list)
    """The broker closed the connection instead of acknowledging."""
    unverified: list[str] = field(default_factory=list)
    """The broker refused our subscription: we cannot tell."""

    @property
    def read_back(self) -> int:
        return len(self.topics) - len(self.swallowed + self.refused + self.unverified)


async def check_mqtt(config: Config, timeout: float) -> tuple[bool, str]:
    """(ok, one line): connect as the service does, then probe every enabled topic."""
    from shared.counters import Counters
    from workers.writer.sinks.base import DestinationUnreachable
    from workers.writer.sinks.mqtt import MqttSink

    asyncio.get_running_loop().set_exception_handler(_quiet_about_dropped_connections)
    client_id = check_client_id(config)
    sink = MqttSink(with_client_id(config, client_id), Counters())
    try:
        await asyncio.wait_for(sink.start(), timeout)
    except (DestinationUnreachable, TimeoutError) as exc:
        return False, redact(str(exc) or f"no answer within {timeout:g} s", config)
    await sink.close()
    probes = await probe_topics(config, f"{client_id}-probe", sink.tls_context(), timeout)
    ok = not (probes.swallowed or probes.refused)
    return ok, redact(describe(config, client_id, probes), config)


def _quiet_about_dropped_connections(
    loop: asyncio.AbstractEventLoop, context: dict[str, Any]
) -> None:
    """A broker closing a probe's connection leaves aiomqtt futures nobody awaits: that is
    the finding reported, not something to print a traceback for."""
    if not isinstance(context.get("exception"), aiomqtt.MqttError):
        loop.default_exception_handler(context)


async def probe_topics(
    config: Config, client_id: str, tls: ssl.SSLContext | None, timeout: float
) -> Probes:
    """Publish a probe to each topic and wait for it on a subscription.

    Each probe goes out on a connection of its own: mosquitto 2.0 acknowledges a PUBLISH
    its ACL denies and then closes the connection.
    """
    nonce = secrets.token_hex(8)
    probes = Probes(enabled_topics(config))
    qos = config.pipeline.mqtt.qos
    async with _client(config, f"{client_id}-sub", tls, timeout) as subscriber:
        for index, topic in enumerate(probes.topics):
            if not await _subscribed(subscriber, topic, qos):
                probes.unverified.append(topic)
                continue
            payload = json.dumps({"messageType": PROBE_TYPE, "topic": topic, "nonce": nonce})
            try:
                async with _client(config, f"{client_id}-{index}", tls, timeout) as publisher:
                    await publisher.publish(topic, payload, qos=qos)
            except aiomqtt.MqttError:
                probes.refused.append(topic)
        sent = set(probes.topics) - set(probes.unverified + probes.refused)
        missing = await _wait_for_probes(subscriber, sent, nonce.encode(), timeout)
    probes.swallowed = [t for t in probes.topics if t in missing]
    return probes


def _client(
    config: Config, client_id: str, tls: ssl.SSLContext | None, timeout: float
) -> aiomqtt.Client:
    broker, options = config.butler.mqtt_config, config.pipeline.mqtt
    return aiomqtt.Client(
        broker.broker_host,
        broker.broker_port,
        username=options.username or None,
        password=options.password or None,
        identifier=client_id,
        tls_context=tls,
        timeout=timeout,
    )


async def _wait_for_probes(
    client: aiomqtt.Client, waiting: set[str], nonce: bytes, timeout: float
) -> set[str]:
    """The topics of `waiting` whose probe did not arrive within `timeout`."""
    if not waiting:
        return waiting
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            async for message in client.messages:
                if isinstance(message.payload, bytes) and nonce in message.payload:
                    waiting.discard(message.topic.value)
                if not waiting:
                    break
    return waiting


async def _subscribed(client: aiomqtt.Client, topic: str, qos: int) -> bool:
    granted = await client.subscribe(topic, qos)
    return all(getattr(code, "value", code) != SUBSCRIBE_FAILED for code in granted)


def describe(config: Config, client_id: str, probes: Probes) -> str:
    broker, options = config.butler.mqtt_config, config.pipeline.mqtt
    parts = [
        f"MQTT broker {broker.broker_host}:{broker.broker_port} accepted our CONNECT "
        f"(check client id {client_id})"
    ]
    if probes.swallowed:
        parts.append(
            f"the broker SWALLOWED the probe published to {_names(probes.swallowed)}: "
            "acknowledged but never delivered (an ACL denies publishing there for this "
            "user?); senseflow would count such events as written"
        )
    if probes.refused:
        parts.append(
            f"the broker REFUSED the probe published to {_names(probes.refused)}: it closed "
            f"the connection instead of acknowledging (an ACL, or QoS {options.qos} "
            "unsupported?)"
        )
    parts.append(f"probe read back on {probes.read_back} topic(s)")
    if probes.unverified:
        parts.append(
            f"not verified (the broker refused our subscription): {_names(probes.unverified)}"
        )
    if options.qos == 2:
        parts.append(
            "QoS 2 is exactly-once while the broker keeps our session; after a broker "
            "restart that lost it, at-least-once"
        )
    if options.password and not options.tls.enable:
        parts.append("WARNING: the password is sent without TLS")
    return "; ".join(parts)


def _names(topics: list[str]) -> str:
    return ", ".join(repr(t) for t in topics)
