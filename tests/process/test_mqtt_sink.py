"""workers/writer/sinks/mqtt.py against a real mosquitto 2.0, checked by an independent subscriber.

The subscriber is an aiomqtt client on a thread and event loop of its own: it keeps
receiving while the sink's loop is deliberately held (a broker restart is made
deterministic by holding the sink until the subscriber is subscribed again). A broker
that must acknowledge nothing is frozen with SIGSTOP; TLS brokers use certificates made
by tests/process/tls.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from shared.backoff import Backoff
from shared.config import Config, config_from_document
from shared.counters import Counters
from shared.events import EncodedBatch
from tests.localservers import LOOPBACK, MosquittoServer, NatsServer, free_ports
from tests.process import tls
from workers.writer.sinks.base import DestinationUnreachable
from workers.writer.sinks.mqtt import MqttSink

WAIT = 10.0  # upper bound for anything awaited; tests finish far sooner
TOPICS = {
    "everythingTopic": "all",
    "sessionStartTopic": "session/start",
    "sessionStopTopic": "session/stop",
    "connectionOpenTopic": "connection/open",
    "connectionCloseTopic": "connection/close",
}
ACTION_TOPICS = list(TOPICS)[1:]  # in the order of the action index

Event = tuple[int, bytes]  # (action index, payload)


# -- events and expectations -----------------------------------------------------------------


def make_events(start: int, count: int, actions: list[int] | None = None) -> list[Event]:
    pattern = actions or [0, 2, 2, 3, 1, 2, 0]
    return [
        (pattern[i % len(pattern)], b'{"n":%d,"msg":"caf\xc3\xa9 \\"q\\""}' % i)
        for i in range(start, start + count)
    ]


def make_batch(events: list[Event]) -> EncodedBatch:
    return EncodedBatch(
        lines=b"",
        mqtt_payloads=[payload for _, payload in events],
        actions=bytes(action for action, _ in events),
        newrelic=[],
        received_ns=[1_700_000_000_000_000_000 + i for i in range(len(events))],
        counters={},
    )


def expected_messages(
    prefix: str, events: list[Event], disabled: tuple[str, ...] = ()
) -> dict[str, list[bytes]]:
    expected: dict[str, list[bytes]] = defaultdict(list)
    for action, payload in events:
        for key in ("everythingTopic", ACTION_TOPICS[action]):
            if key not in disabled:
                expected[f"{prefix}/{TOPICS[key]}"].append(payload)
    return dict(expected)


def by_topic(messages: list[tuple[str, bytes]]) -> dict[str, list[bytes]]:
    grouped: dict[str, list[bytes]] = defaultdict(list)
    for topic, payload in messages:
        grouped[topic].append(payload)
    return dict(grouped)


def mqtt_config(
    broker: MosquittoServer | NatsServer,
    prefix: str,
    qos: int = 1,
    *,
    disabled: tuple[str, ...] = (),
    port: int | None = None,
    **options: Any,
) -> Config:
    post_to = {
        key: {"enable": key not in disabled, "topic": f"{prefix}/{sub}"}
        for key, sub in TOPICS.items()
    }
    document = {
        "Butler-SOS": {
            "mqttConfig": {
                "enable": True,
                "brokerHost": broker.host,
                "brokerPort": port or broker.port,
            },
            "userEvents": {"sendToMQTT": {"enable": True, "postTo": post_to}},
        },
        "senseflow": {"mqtt": {"qos": qos, **options}},
    }
    return config_from_document(document, {})


def fast_backoff(sink: MqttSink) -> MqttSink:
    sink.backoff = Backoff(base=0.01, cap=0.05)
    return sink


# -- an independent subscriber ---------------------------------------------------------------


class Subscriber:
    """aiomqtt on its own thread and loop; resubscribes after the broker comes back."""

    def __init__(
        self, broker: MosquittoServer | NatsServer, topic_filter: str, qos: int = 2, **auth: str
    ) -> None:
        self.broker, self.topic_filter, self.auth = broker, topic_filter, auth
        self.qos = qos
        self.messages: list[tuple[str, bytes]] = []
        self.subscriptions = 0  # SUBACKs received so far, over all connections
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="mqtt-test-subscriber")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[None] | None = None

    def __enter__(self) -> Subscriber:
        self.thread.start()
        try:
            self.wait_subscribed(0)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self.changed:
            loop, task = self.loop, self.task
        if loop is not None and task is not None:
            loop.call_soon_threadsafe(task.cancel)
        self.thread.join()

    def wait_subscribed(self, after: int) -> None:
        """Block until more than `after` subscriptions were acknowledged."""
        with self.changed:
            assert self.changed.wait_for(lambda: self.subscriptions > after, WAIT), "no SUBACK"

    def wait_messages(self, count: int) -> list[tuple[str, bytes]]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.messages) >= count, WAIT)
            return list(self.messages)

    async def received(self, count: int) -> list[tuple[str, bytes]]:
        return await asyncio.to_thread(self.wait_messages, count)

    def _run(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # cancelled by __exit__
            asyncio.run(self._serve())

    async def _serve(self) -> None:
        with self.changed:
            self.loop, self.task = asyncio.get_running_loop(), asyncio.current_task()
        while True:
            try:
                await self._receive()
            except aiomqtt.MqttError:
                await asyncio.sleep(0.02)  # the broker is restarting: try again

    async def _receive(self) -> None:
        broker = self.broker
        client = aiomqtt.Client(
            broker.host,
            broker.port,
            username=self.auth.get("username"),
            password=self.auth.get("password"),
        )
        async with client:
            await client.subscribe(self.topic_filter, qos=self.qos)
            with self.changed:
                self.subscriptions += 1
                self.changed.notify_all()
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                with self.changed:
                    self.messages.append((message.topic.value, message.payload))
                    self.changed.notify_all()


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def subscriber(mosquitto_server: MosquittoServer, prefix: str) -> Iterator[Subscriber]:
    with Subscriber(mosquitto_server, f"{prefix}/#") as client:
        yield client


@pytest.fixture
def own_broker() -> Iterator[MosquittoServer]:
    """A broker of this test's own, which it may freeze, kill and restart."""
    with MosquittoServer() as broker:
        try:
            yield broker
        finally:
            if broker.pid is not None:
                os.kill(broker.pid, signal.SIGCONT)  # a frozen broker would ignore SIGTERM


async def publish(sink: MqttSink, batches: list[list[Event]]) -> None:
    for events in batches:
        await sink.write_batch(make_batch(events))


def chunks(events: list[Event], size: int) -> list[list[Event]]:
    return [events[i : i + size] for i in range(0, len(events), size)]


# -- delivery --------------------------------------------------------------------------------


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_every_event_reaches_its_topics_at_every_qos(
    mosquitto_server: MosquittoServer, subscriber: Subscriber, prefix: str, qos: int
) -> None:
    events = make_events(0, 60)
    expected = expected_messages(prefix, events)
    counters = Counters()

    async def scenario() -> list[tuple[str, bytes]]:
        sink = MqttSink(mqtt_config(mosquitto_server, prefix, qos), counters)
        await sink.start()
        try:
            await publish(sink, chunks(events, 7))
            await asyncio.wait_for(sink.flush(), WAIT)
            assert (sink.inflight, len(sink.backlog), sink.outstanding) == ({}, 0, 0)
            assert counters.snapshot() == {"written.mqtt": 60}
        finally:
            await asyncio.wait_for(sink.close(), WAIT)
        return await subscriber.received(120)

    received = asyncio.run(scenario())
    assert len(received) == 120
    assert by_topic(received) == expected
    assert sum(map(len, expected.values())) == 120
    assert counters.snapshot() == {"written.mqtt": 60}


def test_disabled_topics_get_nothing_and_their_events_still_count(
    mosquitto_server: MosquittoServer, subscriber: Subscriber, prefix: str
) -> None:
    disabled = ("everythingTopic", "connectionOpenTopic")
    only_open = make_events(0, 5, actions=[2])  # a whole batch with nothing to publish
    mixed = make_events(5, 20)
    marker = make_events(25, 1, actions=[0])  # sent last: once it arrives, all did
    events = only_open + mixed + marker
    expected = expected_messages(prefix, events, disabled)
    total = sum(map(len, expected.values()))
    counters = Counters()

    async def scenario() -> list[tuple[str, bytes]]:
        config = mqtt_config(mosquitto_server, prefix, disabled=disabled)
        sink = MqttSink(config, counters)
        await sink.start()
        try:
            await publish(sink, [only_open, mixed, marker])
            await asyncio.wait_for(sink.flush(), WAIT)
        finally:
            await sink.close()
        return await subscriber.received(total)

    received = asyncio.run(scenario())
    assert received[-1] == (f"{prefix}/session/start", marker[0][1])
    assert by_topic(received) == expected
    assert counters.snapshot() == {"written.mqtt": len(events)}


def test_a_small_window_keeps_order_and_bounds_what_is_in_flight(
    mosquitto_server: MosquittoServer, subscriber: Subscriber, prefix: str
) -> None:
    events = make_events(0, 200)
    counters = Counters()
    most_in_flight = 0

    async def scenario() -> list[tuple[str, bytes]]:
        nonlocal most_in_flight
        sink = MqttSink(mqtt_config(mosquitto_server, prefix, 1, maxInflight=3), counters)
        await sink.start()
        try:
            for events_chunk in chunks(events, 25):
                await sink.write_batch(make_batch(events_chunk))
                most_in_flight = max(most_in_flight, len(sink.inflight))
            await asyncio.wait_for(sink.flush(), WAIT)
        finally:
            await sink.close()
        return await subscriber.received(400)

    received = asyncio.run(scenario())
    assert most_in_flight == 3
    assert by_topic(received) == expected_messages(prefix, events)
    assert counters.snapshot() == {"written.mqtt": 200}


def test_offer_publishes_at_once_and_declines_only_without_room(
    mosquitto_server: MosquittoServer, subscriber: Subscriber, prefix: str
) -> None:
    """The writer's hand-over (issue 15): `offer` puts a batch's PUBLISH packets on the
    connection without any wait; with `maxPending` messages outstanding it declines, and
    the batch goes through `write_batch` once acknowledgements make room, in order."""
    first, second = make_events(0, 5), make_events(5, 5)  # 10 messages each
    counters = Counters()

    async def scenario() -> list[tuple[str, bytes]]:
        config = mqtt_config(mosquitto_server, prefix, 1, maxInflight=10, maxPending=10)
        sink = MqttSink(config, counters)
        await sink.start()
        try:
            assert sink.offer(make_batch(first))
            assert len(sink.inflight) == 10  # written before any await
            assert not sink.offer(make_batch(second))  # no room: nothing of it taken
            assert sink.outstanding == 10
            await asyncio.wait_for(sink.write_batch(make_batch(second)), WAIT)
            await asyncio.wait_for(sink.flush(), WAIT)
        finally:
            await sink.close()
        return await subscriber.received(20)

    received = asyncio.run(scenario())
    assert by_topic(received) == expected_messages(prefix, first + second)
    assert counters.snapshot() == {"written.mqtt": 10}


# -- connecting ------------------------------------------------------------------------------


def test_username_and_password_are_sent_and_checked(prefix: str) -> None:
    events = make_events(0, 10)
    counters = Counters()
    with (
        MosquittoServer(username="sense", password="s3cret wörd") as broker,
        Subscriber(broker, f"{prefix}/#", username="sense", password="s3cret wörd") as subscriber,
    ):

        async def scenario() -> None:
            for username, password in [("sense", "wrong"), ("", ""), ("nobody", "s3cret wörd")]:
                config = mqtt_config(broker, prefix, username=username, password=password)
                with pytest.raises(DestinationUnreachable) as refused:
                    await MqttSink(config, Counters()).start()
                assert str(refused.value) == (
                    f"MQTT broker {LOOPBACK}:{broker.port}: "
                    "broker refused the connection: not authorized"
                )
            config = mqtt_config(broker, prefix, username="sense", password="s3cret wörd")
            sink = MqttSink(config, counters)
            await sink.start()
            await publish(sink, [events])
            await sink.close()

        asyncio.run(scenario())
        received = subscriber.wait_messages(20)
    assert by_topic(received) == expected_messages(prefix, events)
    assert counters.snapshot() == {"written.mqtt": 10}


def test_start_fails_clearly_when_nothing_listens(
    mosquitto_server: MosquittoServer, prefix: str
) -> None:
    (port,) = free_ports(1)
    config = mqtt_config(mosquitto_server, prefix, port=port)

    async def scenario() -> None:
        with pytest.raises(DestinationUnreachable, match=f"^MQTT broker {LOOPBACK}:{port}: "):
            await MqttSink(config, Counters()).start()

    asyncio.run(scenario())


def test_a_broker_that_accepts_then_drops_us_is_retried_with_growing_backoff(
    mosquitto_server: MosquittoServer, prefix: str
) -> None:
    """CONNACK, then the connection closes at once: each reconnect waits longer (the backoff
    restarts only after a connection that lasted), instead of hammering the broker."""
    accepted: list[float] = []

    async def flaky(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(time.monotonic())
        await reader.read(1024)  # CONNECT
        writer.write(b"\x20\x02\x00\x00")  # CONNACK, accepted
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(flaky, LOOPBACK, 0)
        port = server.sockets[0].getsockname()[1]
        sink = MqttSink(mqtt_config(mosquitto_server, prefix, port=port), Counters())
        await sink.start()
        await asyncio.sleep(4.0)
        await sink.close()
        server.close()

    asyncio.run(scenario())
    # A reset on every CONNACK would reconnect every 0-0.2 s: about 40 times in 4 s.
    assert 2 <= len(accepted) <= 12, len(accepted)


# -- acknowledgements, flush, restarts -------------------------------------------------------


@pytest.mark.parametrize("qos", [1, 2])
def test_flush_returns_only_once_the_broker_acknowledged_everything(
    own_broker: MosquittoServer, prefix: str, qos: int
) -> None:
    first, second = make_events(0, 10), make_events(10, 15)
    counters = Counters()
    pid = own_broker.pid
    assert pid is not None

    async def scenario() -> None:
        sink = MqttSink(mqtt_config(own_broker, prefix, qos), counters)
        await sink.start()
        await publish(sink, [first])
        await asyncio.wait_for(sink.flush(), WAIT)
        assert counters.snapshot() == {"written.mqtt": 10}
        freeze(pid)  # the broker can acknowledge nothing more
        try:
            await publish(sink, [second])
            assert sink.outstanding == 30  # in flight, or waiting for room in the window
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(sink.flush(), 0.3)
            assert counters.snapshot() == {"written.mqtt": 10}
        finally:
            os.kill(pid, signal.SIGCONT)
        await asyncio.wait_for(sink.flush(), WAIT)
        assert counters.snapshot() == {"written.mqtt": 25}
        assert (sink.inflight, sink.outstanding) == ({}, 0)
        await sink.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("how", ["killed with messages in flight", "stopped, then written to"])
def test_a_broker_restart_loses_nothing(own_broker: MosquittoServer, prefix: str, how: str) -> None:
    """The sink reconnects to the broker restarted on the same port and sends again what
    was not acknowledged (with DUP) or not yet sent; the subscriber gets every message."""
    first, second = make_events(0, 20), make_events(20, 30)
    counters = Counters()
    broker = own_broker

    async def scenario(subscriber: Subscriber) -> list[tuple[str, bytes]]:
        sink = fast_backoff(MqttSink(mqtt_config(broker, prefix, 1), counters))
        await sink.start()
        await publish(sink, chunks(first, 5))
        await asyncio.wait_for(sink.flush(), WAIT)
        await subscriber.received(40)  # delivered onwards before the broker goes
        subscribed = subscriber.subscriptions
        if how.startswith("killed"):
            assert broker.pid is not None
            freeze(broker.pid)  # reads nothing more, acknowledges nothing
            await publish(sink, chunks(second, 5))
            assert len(sink.inflight) == 60
            os.kill(broker.pid, signal.SIGKILL)
            broker.stop()  # reaps it
        else:
            broker.stop()
            await wait_until(lambda: not sink.connected)
            await publish(sink, chunks(second, 5))
            assert (len(sink.inflight), len(sink.backlog)) == (0, 60)
        # Held here (the loop does not run): the sink cannot reconnect before the
        # subscriber is back, so what it sends again has someone to go to.
        broker.start()
        subscriber.wait_subscribed(subscribed)
        await asyncio.wait_for(sink.flush(), WAIT)
        await sink.close()
        return await subscriber.received(100)

    with Subscriber(broker, f"{prefix}/#") as subscriber:
        received = asyncio.run(scenario(subscriber))
    assert by_topic(received) == expected_messages(prefix, first + second)
    republished = 60 if how.startswith("killed") else 0
    assert counters.get("written.mqtt") == 50
    assert counters.get("mqtt.republished") == republished


def freeze(pid: int) -> None:
    """SIGSTOP a process and return once it is stopped (state T in /proc)."""
    os.kill(pid, signal.SIGSTOP)
    stat = Path(f"/proc/{pid}/stat")
    for _ in range(1000):
        if stat.read_text().rpartition(")")[2].split()[0] in ("T", "t"):
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop")


async def wait_until(condition: Any) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.005)


# -- TLS -------------------------------------------------------------------------------------


class TlsMosquittoServer(MosquittoServer):
    """Mosquitto whose listener speaks TLS only; optionally requires a client certificate."""

    def __init__(self, certs: Certificates, *, require_certificate: bool = False) -> None:
        super().__init__()
        self.certs, self.require_certificate = certs, require_certificate

    def _config_text(self) -> str:
        listener = f"listener {self.port} {self.host}\n"
        text = super()._config_text()
        assert listener in text
        tls = [
            f"cafile {self.certs.ca.cert}",
            f"certfile {self.certs.server.cert}",
            f"keyfile {self.certs.server.key}",
            f"require_certificate {str(self.require_certificate).lower()}",
        ]
        return text.replace(listener, listener + "\n".join(tls) + "\n")


@dataclass(frozen=True)
class Certificates:
    ca: tls.Identity
    server: tls.Identity
    client: tls.Identity


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("mqtt-tls")
    ca = tls.make_ca(directory, "test-ca")
    return Certificates(
        ca,
        tls.make_leaf(directory, "broker", ca, server_ip=LOOPBACK),
        tls.make_leaf(directory, "senseflow", ca),
    )


def publish_over_tls(broker: MosquittoServer, prefix: str, **tls_options: Any) -> Counters:
    counters = Counters()
    config = mqtt_config(broker, prefix, tls={"enable": True, **tls_options})

    async def scenario() -> None:
        sink = MqttSink(config, counters)
        await sink.start()
        await publish(sink, [make_events(0, 10)])
        await asyncio.wait_for(sink.close(), WAIT)  # close() flushes: every PUBACK came

    asyncio.run(scenario())
    return counters


def refused_over_tls(broker: MosquittoServer, prefix: str, **tls_options: Any) -> str:
    config = mqtt_config(broker, prefix, tls={"enable": True, **tls_options})

    async def scenario() -> str:
        with pytest.raises(DestinationUnreachable) as refusal:
            await MqttSink(config, Counters()).start()
        return str(refusal.value)

    return asyncio.run(scenario())


def test_tls_verifies_the_broker(certificates: Certificates, prefix: str) -> None:
    with TlsMosquittoServer(certificates) as broker:
        counters = publish_over_tls(broker, prefix, caFile=certificates.ca.cert)
        assert counters.snapshot() == {"written.mqtt": 10}
        # the test CA is not in the system's trust store
        assert "certificate verify failed" in refused_over_tls(broker, prefix)
        counters = publish_over_tls(broker, prefix, insecure=True)
        assert counters.snapshot() == {"written.mqtt": 10}
        # plain MQTT to a TLS listener gets no CONNACK
        with pytest.raises(DestinationUnreachable):
            asyncio.run(MqttSink(mqtt_config(broker, prefix), Counters()).start())


def test_tls_with_a_client_certificate(certificates: Certificates, prefix: str) -> None:
    with TlsMosquittoServer(certificates, require_certificate=True) as broker:
        ca = certificates.ca.cert
        client = certificates.client
        counters = publish_over_tls(
            broker, prefix, caFile=ca, certFile=client.cert, keyFile=client.key
        )
        assert counters.snapshot() == {"written.mqtt": 10}
        # without one the broker ends the TLS session (seen as a reset or a TLS alert)
        refusal = refused_over_tls(broker, prefix, caFile=ca)
        assert refusal.startswith(f"MQTT broker {LOOPBACK}:{broker.port}: ")
