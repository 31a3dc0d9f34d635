"""MQTT destination: a deep in-flight window over one aiomqtt connection.

aiomqtt (on paho) owns the connection, TLS, authentication and the socket; we hand paho
pre-encoded payloads directly and track acknowledgements in bulk instead of awaiting one
publish at a time, which is what caps naive publishers near 2,000 messages/s.

- At most `window` messages are with paho at once (paho's message ids are 16 bits, and
  a bounded window keeps its own queues empty); the rest wait in our ordered backlog.
- Every message is kept until the broker acknowledges it. After a reconnect, whatever
  was in flight is published again, in order (QoS 1 is at-least-once: such duplicates
  are counted as `mqtt.republished`).
- An event counts as written once every message of its batch is acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

from shared.backoff import Backoff
from shared.config import Config
from shared.counters import Counters
from shared.events import ACTIONS, EncodedBatch
from workers.sinks.base import DestinationUnreachable

log = logging.getLogger("senseflow.mqtt")

NAME = "mqtt"
CONNECT_TIMEOUT = 10.0


@dataclass(slots=True)
class Message:
    batch: int
    topic: str
    payload: bytes


@dataclass(slots=True)
class BatchState:
    remaining: int
    events: int
    received_ns: list[int]


def action_topics(config: Config) -> tuple[str | None, list[str | None]]:
    """The everything topic and the topic per action index (None where disabled)."""
    post_to = config.butler.user_events.send_to_mqtt.post_to
    everything = post_to.everything_topic.topic if post_to.everything_topic.enable else None
    per_action = [
        post_to.session_start_topic,
        post_to.session_stop_topic,
        post_to.connection_open_topic,
        post_to.connection_close_topic,
    ]
    assert len(per_action) == len(ACTIONS)
    return everything, [t.topic if t.enable and t.topic else None for t in per_action]


class MqttSink:
    name = NAME

    def __init__(
        self,
        config: Config,
        counters: Counters,
        on_delivered: Callable[[str, list[int]], None] | None = None,
    ) -> None:
        self.config = config
        self.options = config.pipeline.mqtt
        self.counters = counters
        self.on_delivered = on_delivered
        self.everything, self.per_action = action_topics(config)
        self.window = self.options.max_inflight
        self.max_pending = max(self.options.max_pending, self.window)
        self.backlog: deque[Message] = deque()
        self.inflight: dict[int, Message] = {}
        self.batches: dict[int, BatchState] = {}
        self.next_batch = 0
        self.outstanding = 0
        self.client: aiomqtt.Client | None = None
        self.paho: Any = None
        self.connected = False
        self.refill_scheduled = False
        self.room = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.backoff = Backoff(base=0.2, cap=10.0)
        self.supervisor: asyncio.Task[None] | None = None

    # -- connection -------------------------------------------------------------------------

    def make_client(self) -> aiomqtt.Client:
        broker = self.config.butler.mqtt_config
        opts = self.options
        return aiomqtt.Client(
            hostname=broker.broker_host,
            port=broker.broker_port,
            username=opts.username or None,
            password=opts.password or None,
            identifier=opts.client_id or None,
            tls_context=self.tls_context(),
            max_inflight_messages=self.window,
            timeout=CONNECT_TIMEOUT,
            keepalive=30,
        )

    def tls_context(self) -> ssl.SSLContext | None:
        tls = self.options.tls
        if not tls.enable:
            return None
        context = ssl.create_default_context(cafile=tls.ca_file or None)
        if tls.cert_file:
            context.load_cert_chain(tls.cert_file, tls.key_file or None)
        if tls.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    async def connect(self) -> None:
        client = self.make_client()
        try:
            await asyncio.wait_for(client.__aenter__(), CONNECT_TIMEOUT)
        except (aiomqtt.MqttError, TimeoutError, OSError) as exc:
            broker = self.config.butler.mqtt_config
            raise DestinationUnreachable(
                f"MQTT broker {broker.broker_host}:{broker.broker_port}: {exc or 'timed out'}"
            ) from exc
        self.client = client
        self.paho = client._client  # noqa: SLF001 - paho underneath aiomqtt, for bulk publishing
        self.paho.on_publish = self._on_publish
        self.connected = True
        self.backoff.reset()

    async def start(self) -> None:
        await self.connect()
        self.supervisor = asyncio.create_task(self._supervise(), name="writer.mqtt.connection")

    async def _supervise(self) -> None:
        """Wait for the connection to drop, then reconnect with backoff and resend."""
        while True:
            assert self.client is not None
            disconnected = self.client._disconnected  # noqa: SLF001 - aiomqtt has no public hook
            try:
                await asyncio.shield(disconnected)
            except Exception as exc:  # whatever paho reported as the cause
                log.warning("MQTT connection lost: %s", exc)
            else:
                log.warning("MQTT connection closed")
            self.connected = False
            await self._release_client()
            await self._reconnect()

    async def _reconnect(self) -> None:
        while True:
            delay = self.backoff.next_delay()
            await asyncio.sleep(delay)
            try:
                await self.connect()
            except DestinationUnreachable as exc:
                log.warning("MQTT reconnect failed (%s); retrying", exc)
                continue
            resend = [self.inflight[mid] for mid in sorted(self.inflight, key=self._order)]
            self.inflight.clear()
            self.backlog.extendleft(reversed(resend))
            self.counters.add("mqtt.republished", len(resend))
            log.info("MQTT reconnected; publishing %d unacknowledged message(s) again", len(resend))
            self._refill()
            return

    def _order(self, mid: int) -> int:
        return self.inflight[mid].batch

    async def _release_client(self) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        try:
            await asyncio.wait_for(client.__aexit__(None, None, None), 2.0)
        except (aiomqtt.MqttError, TimeoutError, OSError):
            pass

    # -- publishing -------------------------------------------------------------------------

    async def write_batch(self, batch: EncodedBatch) -> None:
        messages = self._messages(batch)
        if not messages:
            return
        while self.outstanding >= self.max_pending:
            self.room.clear()
            await self.room.wait()
        self.batches[self.next_batch] = BatchState(len(messages), len(batch.mqtt_payloads), batch.received_ns)
        self.next_batch += 1
        self.outstanding += len(messages)
        self.idle.clear()
        self.backlog.extend(messages)
        self._refill()

    def _messages(self, batch: EncodedBatch) -> list[Message]:
        seq = self.next_batch
        everything, per_action = self.everything, self.per_action
        messages = []
        for payload, action in zip(batch.mqtt_payloads, batch.actions, strict=True):
            if everything is not None:
                messages.append(Message(seq, everything, payload))
            topic = per_action[action]
            if topic is not None:
                messages.append(Message(seq, topic, payload))
        return messages

    def _refill(self) -> None:
        """Move messages from the backlog to paho while the window has room."""
        self.refill_scheduled = False
        qos = self.options.qos
        while self.connected and self.backlog and len(self.inflight) < self.window:
            message = self.backlog.popleft()
            info = self.paho.publish(message.topic, message.payload, qos)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                self.backlog.appendleft(message)
                return
            if qos == 0 or info.is_published():
                self._acknowledged(message)
            else:
                self.inflight[info.mid] = message

    def _on_publish(self, client: Any, userdata: Any, mid: int, *args: Any) -> None:
        message = self.inflight.pop(mid, None)
        if message is None:
            return
        self._acknowledged(message)
        if self.backlog and not self.refill_scheduled:
            self.refill_scheduled = True
            asyncio.get_running_loop().call_soon(self._refill)

    def _acknowledged(self, message: Message) -> None:
        state = self.batches[message.batch]
        state.remaining -= 1
        self.outstanding -= 1
        if state.remaining == 0:
            del self.batches[message.batch]
            self.counters.add("written.mqtt", state.events)
            if self.on_delivered is not None:
                self.on_delivered(NAME, state.received_ns)
        self.counters.add("mqtt.messages", 1)
        self.room.set()
        if not self.outstanding:
            self.idle.set()

    async def flush(self) -> None:
        await self.idle.wait()

    async def close(self) -> None:
        await self.flush()
        if self.supervisor is not None:
            self.supervisor.cancel()
            await asyncio.gather(self.supervisor, return_exceptions=True)
        await self._release_client()
