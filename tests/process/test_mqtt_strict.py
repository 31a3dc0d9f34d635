"""The MQTT publisher refuses to misbehave (issue 12, section 3).

Real mosquitto for client ids, QoS 2 resumption (behind a proxy that loses one PUBCOMP),
TLS and ACLs; nats-server as a second real broker; a stand-in broker only where a broker
must misbehave on purpose.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from senseflow.commands.tools import check_destinations
from shared.config import redact
from shared.counters import Counters
from tests.localservers import LOOPBACK, MosquittoServer, NatsServer
from tests.process import tls
from tests.process.test_mqtt_sink import (
    WAIT,
    Certificates,
    Subscriber,
    TlsMosquittoServer,
    by_topic,
    expected_messages,
    fast_backoff,
    make_events,
    mqtt_config,
    publish,
    publish_over_tls,
    refused_over_tls,
    wait_until,
)
from workers.writer.sinks import mqtt_protocol as proto
from workers.writer.sinks.mqtt import MqttSink

KEY_PASSWORD = "kéy pass 42"


@pytest.fixture
def prefix() -> str:
    return f"strict-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def own_broker() -> Iterator[MosquittoServer]:
    with MosquittoServer() as broker:
        yield broker


# -- reading MQTT packets off a stream (for the stand-ins) -------------------------------------


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, await reader.readexactly(length)


def encode_packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + proto.remaining_length(len(body)) + body


# -- client ids --------------------------------------------------------------------------------


def test_default_client_ids_name_the_host_and_never_repeat(
    mosquitto_server: MosquittoServer, prefix: str
) -> None:
    """Replicas of one container share a pid; `senseflow-{pid}` kicked each other off."""
    config = mqtt_config(mosquitto_server, prefix)
    ids = {MqttSink(config, Counters()).client_id for _ in range(50)}
    assert len(ids) == 50
    host = socket.gethostname()
    assert all(i.startswith(f"senseflow-{host}-") for i in ids), ids


def test_check_config_never_takes_the_running_service_s_connection(
    mosquitto_server: MosquittoServer, prefix: str
) -> None:
    """A broker drops the older of two connections with one client id: that would be the
    service's own, every time an operator runs check-config."""
    config = mqtt_config(mosquitto_server, prefix, clientId="senseflow-prod")

    async def scenario() -> tuple[list[tuple[str, bool, str]], float, float]:
        sink = MqttSink(config, Counters())
        await sink.start()
        connected_at, heard = sink.connected_at, sink.last_heard
        results = await asyncio.to_thread(check_destinations, config, WAIT)
        # One round trip on the service's connection: PINGRESP if it is intact; if the
        # check took it over, the broker's close and then a reconnect.
        if sink.writer is not None:
            sink.writer.write(proto.PINGREQ_PACKET)
        await wait_until(lambda: sink.last_heard != heard)
        await asyncio.wait_for(sink.close(), WAIT)
        return results, connected_at, sink.connected_at

    results, before, after = asyncio.run(scenario())
    mqtt = dict((name, (ok, detail)) for name, ok, detail in results)["mqtt"]
    assert mqtt[0], mqtt
    assert "check client id senseflow-prod-check-" in mqtt[1]
    assert after == before  # the service's connection was never replaced


# -- validation at config load: tests/unit/test_mqtt_config.py ---------------------------------

# -- trust nothing from the broker ---------------------------------------------------------------

PUBLISH_256MB = b"\x30\xff\xff\xff\x7f"


@pytest.mark.parametrize(
    ("qos", "answer", "logged"),
    [
        (1, PUBLISH_256MB, "unexpected packet from the broker: type byte 0x30"),
        (1, b"\x40\x03\x00\x01\x00", "malformed packet from the broker: type byte 0x40"),
        (1, b"\x50\x02\x00\x01", "packet type 0x50 at QoS 1"),
        (2, b"\x40\x02\x00\x01", "packet type 0x40 at QoS 2"),
        (2, b"\x70\x02\x00\x01", "PUBCOMP 1 before its PUBREC"),
        (1, b"\x20\x02\x00\x00", "unexpected packet from the broker: type byte 0x20"),
    ],
    ids=[
        "huge-publish",
        "long-puback",
        "pubrec-at-qos1",
        "puback-at-qos2",
        "early-pubcomp",
        "connack",
    ],
)
def test_a_misbehaving_broker_is_a_logged_protocol_error_and_a_reconnect(
    mosquitto_server: MosquittoServer,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
    qos: int,
    answer: bytes,
    logged: str,
) -> None:
    """The stand-in answers the first PUBLISH wrongly, then behaves: the wrong answer
    counts nothing, the connection is made afresh, and the message is delivered once."""
    misbehaved = asyncio.Event()
    connects_after = 0

    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connects_after
        with_session = misbehaved.is_set()
        try:
            await read_packet(reader)  # CONNECT
            writer.write(b"\x20\x02\x00\x00")
            connects_after += with_session
            while True:
                first, body = await read_packet(reader)
                writer.write(answer_to(first, body))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def answer_to(first: int, body: bytes) -> bytes:
        kind = first & 0xF0
        if kind == proto.PUBLISH:
            if not misbehaved.is_set():
                misbehaved.set()
                return answer
            packet_id = body[2 + int.from_bytes(body[:2], "big") :][:2]
            return encode_packet(0x40 if qos == 1 else 0x50, packet_id)
        if kind == 0x60:  # PUBREL
            return encode_packet(proto.PUBCOMP, body[:2])
        return b"\xd0\x00" if kind == 0xC0 else b""

    counters = Counters()

    async def scenario() -> None:
        server = await asyncio.start_server(broker, LOOPBACK, 0)
        port = server.sockets[0].getsockname()[1]
        config = mqtt_config(mosquitto_server, prefix, qos, port=port)
        sink = fast_backoff(MqttSink(config, counters))
        await sink.start()
        await publish(sink, [make_events(0, 1, actions=[0])])  # two messages
        await asyncio.wait_for(misbehaved.wait(), WAIT)
        await asyncio.wait_for(sink.flush(), WAIT)
        await asyncio.wait_for(sink.close(), WAIT)
        server.close()
        await server.wait_closed()

    with caplog.at_level(logging.WARNING, logger="senseflow.mqtt"):
        asyncio.run(scenario())
    assert connects_after >= 1
    assert counters.get("written.mqtt") == 1
    assert any(logged in r.getMessage() for r in caplog.records), caplog.text


# -- QoS 2 exactly once across a reconnect ------------------------------------------------------


class PubcompThief:
    """A TCP proxy in front of a real broker that swallows the first PUBCOMP and cuts the
    connection there: the message was delivered (released), the publisher does not know."""

    def __init__(self, broker: MosquittoServer) -> None:
        self.broker = broker
        self.stolen = False
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, LOOPBACK, 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(self.broker.host, self.broker.port)
        upward = asyncio.create_task(self._pump(reader, up_writer))
        try:
            while True:
                first, body = await read_packet(up_reader)
                if first == proto.PUBCOMP and not self.stolen:
                    self.stolen = True
                    break
                writer.write(encode_packet(first, body))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            upward.cancel()
            writer.transport.abort()
            up_writer.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)


def test_qos2_after_a_reconnect_releases_instead_of_publishing_again(
    own_broker: MosquittoServer, prefix: str
) -> None:
    events = make_events(0, 10)
    marker = make_events(10, 1, actions=[0])
    counters = Counters()

    async def scenario(subscriber: Subscriber) -> list[tuple[str, bytes]]:
        thief = PubcompThief(own_broker)
        port = await thief.start()
        sink = fast_backoff(MqttSink(mqtt_config(own_broker, prefix, 2, port=port), counters))
        await sink.start()
        connections = thief.connections
        await publish(sink, [events])
        await asyncio.wait_for(sink.flush(), WAIT)
        assert thief.stolen and thief.connections > connections  # it did reconnect
        await publish(sink, [marker])  # after every duplicate there could be
        await asyncio.wait_for(sink.close(), WAIT)
        await thief.stop()
        return await subscriber.received(22)

    with Subscriber(own_broker, f"{prefix}/#") as subscriber:
        received = asyncio.run(scenario(subscriber))
    assert {payload for _, payload in received[-2:]} == {marker[0][1]}  # the marker came last
    assert by_topic(received) == expected_messages(prefix, events + marker)  # no duplicate
    assert counters.get("written.mqtt") == 11
    assert counters.get("mqtt.republished") == 0


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encrypted_key_certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("mqtt-tls-key")
    ca = tls.make_ca(directory, "test-ca")
    return Certificates(
        ca,
        tls.make_leaf(directory, "broker", ca, server_ip=LOOPBACK),
        tls.make_leaf(directory, "senseflow", ca, passphrase=KEY_PASSWORD),
    )


def test_tls_client_key_with_a_passphrase(
    encrypted_key_certificates: Certificates, prefix: str
) -> None:
    certs = encrypted_key_certificates
    assert "ENCRYPTED" in Path(certs.client.key).read_text()
    client = {"caFile": certs.ca.cert, "certFile": certs.client.cert, "keyFile": certs.client.key}
    with TlsMosquittoServer(certs, require_certificate=True) as broker:
        counters = publish_over_tls(broker, prefix, **client, keyPassword=KEY_PASSWORD)
        assert counters.snapshot() == {"written.mqtt": 10}
        # without it: a clear refusal (never a prompt on the terminal)
        refusal = refused_over_tls(broker, prefix, **client)
        assert refusal.startswith(f"MQTT broker {LOOPBACK}:{broker.port}: ")
        config = mqtt_config(broker, prefix, tls={**client, "keyPassword": KEY_PASSWORD})
        assert redact(f"key {KEY_PASSWORD}!", config) == "key ***!"


def test_a_password_without_tls_is_warned_about(
    mosquitto_server: MosquittoServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = mqtt_config(mosquitto_server, prefix, username="sense", password="s3cret")

    async def scenario() -> None:
        sink = MqttSink(config, Counters())
        await sink.start()
        await sink.close()

    with caplog.at_level(logging.WARNING, logger="senseflow.mqtt"):
        asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("password" in w and "without TLS" in w for w in warnings), warnings
    assert all("s3cret" not in w for w in warnings)
    (_, ok, detail), *_ = [r for r in check_destinations(config, WAIT) if r[0] == "mqtt"]
    assert ok and "WARNING: the password is sent without TLS" in detail


@pytest.mark.parametrize("use_tls", [False, True], ids=["waiting-for-connack", "mid-tls-handshake"])
def test_a_start_up_timeout_mid_handshake_leaves_no_socket_open(
    mosquitto_server: MosquittoServer, prefix: str, use_tls: bool
) -> None:
    """The writer gives each attempt `startupTimeout`; a cancelled attempt closes its socket
    (with onUnreachable: wait, one leaked socket per attempt otherwise)."""
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with_data = True
        while with_data:  # never answers; returns when the client closes
            with_data = bool(await reader.read(4096))
        closed.set()
        writer.close()

    async def scenario() -> MqttSink:
        server = await asyncio.start_server(silent, LOOPBACK, 0)
        port = server.sockets[0].getsockname()[1]
        options: dict[str, Any] = {"tls": {"enable": True, "insecure": True}} if use_tls else {}
        sink = MqttSink(mqtt_config(mosquitto_server, prefix, port=port, **options), Counters())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sink.start(), 0.3)
        await asyncio.wait_for(closed.wait(), WAIT)
        server.close()
        await server.wait_closed()
        return sink

    sink = asyncio.run(scenario())
    assert (sink.writer, sink.connected) == (None, False)


# -- check-config and ACLs ----------------------------------------------------------------------


class AclMosquittoServer(MosquittoServer):
    """Anonymous clients may read every topic given, and write all of them but `read_only`."""

    def __init__(self, topics: list[str], read_only: str) -> None:
        super().__init__()
        self.topics, self.read_only = topics, read_only

    def _config_text(self) -> str:
        acl = self.workdir / "acl"
        rules = [f"topic {'read' if t == self.read_only else 'readwrite'} {t}" for t in self.topics]
        acl.write_text("\n".join(rules) + "\n", encoding="utf-8")
        return super()._config_text() + f"acl_file {acl}\n"


def test_check_config_tells_when_the_broker_swallows_a_topic(prefix: str) -> None:
    config_topics = {f"{prefix}/{t}" for t in ("all", "session/start", "session/stop")}
    topics = sorted(config_topics | {f"{prefix}/connection/open", f"{prefix}/connection/close"})
    denied = f"{prefix}/session/stop"
    with AclMosquittoServer(topics, read_only=denied) as broker:
        results = {
            name: (ok, detail)
            for name, ok, detail in check_destinations(mqtt_config(broker, prefix), 2.0)
        }
        ok, detail = results["mqtt"]
        assert not ok, detail
        assert f"the broker SWALLOWED the probe published to {denied!r}" in detail
        assert "probe read back on 4 topic(s)" in detail
        # allowed everywhere: all well
        allowed = mqtt_config(broker, prefix, disabled=("sessionStopTopic",))
        results = {name: (ok, detail) for name, ok, detail in check_destinations(allowed, 2.0)}
        assert results["mqtt"][0], results["mqtt"]
        assert "probe read back on 4 topic(s)" in results["mqtt"][1]


# -- a second broker: nats-server's MQTT listener -----------------------------------------------


@pytest.mark.parametrize("qos", [0, 1])
def test_nats_server_gets_everything_across_a_restart(prefix: str, qos: int) -> None:
    """nats-server 2.9 speaks MQTT 3.1.1 QoS 0 and 1 (not 2) with JetStream on."""
    first, second = make_events(0, 20), make_events(20, 30)
    counters = Counters()

    async def scenario(broker: NatsServer, subscriber: Subscriber) -> list[tuple[str, bytes]]:
        sink = fast_backoff(MqttSink(mqtt_config(broker, prefix, qos), counters))
        await sink.start()
        await publish(sink, [first])
        await asyncio.wait_for(sink.flush(), WAIT)
        await subscriber.received(40)
        subscribed = subscriber.subscriptions
        broker.stop()
        await wait_until(lambda: not sink.connected)
        await publish(sink, [second])
        broker.start()  # the loop is held: the subscriber is back before the sink
        subscriber.wait_subscribed(subscribed)
        await asyncio.wait_for(sink.flush(), WAIT)
        await asyncio.wait_for(sink.close(), WAIT)
        return await subscriber.received(100)

    with NatsServer() as broker, Subscriber(broker, f"{prefix}/#", qos=1) as subscriber:
        received = asyncio.run(scenario(broker, subscriber))
    assert by_topic(received) == expected_messages(prefix, first + second)
    assert counters.get("written.mqtt") == 50


def test_check_config_against_nats_server(prefix: str) -> None:
    """QoS 1 probes come back; QoS 2 (unsupported by nats-server 2.9) is reported refused
    instead of passing a CONNECT-only check and looping at run time."""
    with NatsServer() as broker:
        [(ok, detail)] = [
            (ok, detail)
            for name, ok, detail in check_destinations(mqtt_config(broker, prefix, 1), WAIT)
            if name == "mqtt"
        ]
        assert ok and detail.endswith("probe read back on 5 topic(s)"), detail
        [(ok, detail)] = [
            (ok, detail)
            for name, ok, detail in check_destinations(mqtt_config(broker, prefix, 2), 2.0)
            if name == "mqtt"
        ]
        assert not ok
        assert f"the broker REFUSED the probe published to '{prefix}/all', " in detail
        assert "probe read back on 0 topic(s)" in detail
