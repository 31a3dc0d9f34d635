"""MQTT destination: a deep in-flight window with acknowledgements tracked in bulk.

Each batch from the workers becomes, per connection write, one buffer of PUBLISH packets
(payloads were pre-encoded by the workers); acknowledgements are scanned out of whole
reads (see mqtt_protocol for why this does not go through paho).

- At most `maxInflight` messages await acknowledgement; the rest wait, in order, in our
  backlog, bounded by `maxPending` (the writer waits when it is reached).
- Every message is kept until the broker acknowledges it. After a reconnect, whatever
  was in flight is published again first, in order, with the DUP flag (QoS 1 is
  at-least-once; such duplicates are counted as `mqtt.republished`).
- An event counts as written once every message of its batch is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections import deque
from dataclasses import dataclass

from shared import counternames as names
from shared.backoff import Backoff
from shared.config import Config
from shared.counters import Counting
from shared.events import ACTIONS, EncodedBatch
from shared.tasks import cancel_all, spawn
from workers.writer.sinks import mqtt_protocol as proto
from workers.writer.sinks.base import Ack, Acknowledge, DestinationUnreachable, counting_acks

log = logging.getLogger("senseflow.mqtt")

NAME = "mqtt"
CONNECT_TIMEOUT = 10.0
KEEPALIVE = 30
STABLE_CONNECTION = 10.0
"""Seconds a connection must last before a drop starts the reconnect backoff afresh."""
WRITE_BUFFER_LIMIT = 4 * 1024 * 1024
MAX_PACKET_ID = 0xFFFF
QOS2_WINDOW = 20
"""In-flight cap at QoS 2. MQTT 3.1.1 cannot negotiate a receive maximum, and brokers bound
the QoS 2 messages awaiting PUBREL per client (mosquitto: `max_inflight_messages`, 20 by
default). Past it mosquitto answers PUBREC 0x97 (quota exceeded) and drops the connection;
everything is resent and dropped again, forever."""


@dataclass(slots=True)
class Message:
    batch: int
    header: proto.TopicHeader
    payload: bytes


@dataclass(slots=True)
class BatchState:
    remaining: int
    events: int
    received_ns: list[int]
    seq: int = -1


def topic_headers(
    config: Config,
) -> tuple[proto.TopicHeader | None, list[proto.TopicHeader | None]]:
    """The everything topic and the topic per action index (None where disabled)."""
    post_to = config.butler.user_events.send_to_mqtt.post_to
    qos = config.pipeline.mqtt.qos

    def header(enabled: bool, topic: str) -> proto.TopicHeader | None:
        return proto.TopicHeader(topic, qos) if enabled and topic else None

    per_action = [
        post_to.session_start_topic,
        post_to.session_stop_topic,
        post_to.connection_open_topic,
        post_to.connection_close_topic,
    ]
    assert len(per_action) == len(ACTIONS)
    everything = header(post_to.everything_topic.enable, post_to.everything_topic.topic)
    return everything, [header(t.enable, t.topic) for t in per_action]


class MqttSink:
    name = NAME

    def __init__(
        self,
        config: Config,
        counters: Counting,
        on_ack: Acknowledge | None = None,
    ) -> None:
        self.broker = config.butler.mqtt_config
        self.options = config.pipeline.mqtt
        self.counters = counters
        self.on_ack: Acknowledge = on_ack or counting_acks(counters, NAME)
        self.everything, self.per_action = topic_headers(config)
        self.qos = self.options.qos
        self.window = min(self.options.max_inflight, MAX_PACKET_ID - 1)
        if self.qos == 2:
            self.window = min(self.window, QOS2_WINDOW)
        self.max_pending = max(self.options.max_pending, self.window)
        self.client_id = self.options.client_id or f"senseflow-{os.getpid()}"
        self.backlog: deque[Message] = deque()
        self.inflight: dict[int, Message] = {}
        self.batches: dict[int, BatchState] = {}
        self.next_batch = 0
        self.next_id = 1
        self.outstanding = 0
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.connected = False
        self.last_heard = 0.0
        self.room = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.backoff = Backoff(base=0.2, cap=10.0)
        self.connected_at = 0.0
        self.tasks: list[asyncio.Task[None]] = []

    @property
    def address(self) -> str:
        return f"{self.broker.broker_host}:{self.broker.broker_port}"

    # -- connection -------------------------------------------------------------------------

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
        try:
            await asyncio.wait_for(self._handshake(), CONNECT_TIMEOUT)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, proto.ProtocolError) as exc:
            await self._close_stream()
            reason = str(exc) or type(exc).__name__
            raise DestinationUnreachable(f"MQTT broker {self.address}: {reason}") from exc
        self.connected = True
        self.last_heard = self.connected_at = time.monotonic()

    async def _handshake(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            self.broker.broker_host, self.broker.broker_port, ssl=self.tls_context()
        )
        self.writer.write(
            proto.connect_packet(
                self.client_id,
                KEEPALIVE,
                self.options.username or None,
                self.options.password or None,
            )
        )
        proto.check_connack(await self.reader.readexactly(4))

    async def _close_stream(self) -> None:
        writer, self.writer, self.reader = self.writer, None, None
        self.connected = False
        if writer is None:
            return
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 2.0)

    async def start(self) -> None:
        await self.connect()
        self.tasks = [
            spawn(self._connection_loop(), name="writer.mqtt.connection"),
            spawn(self._keepalive_loop(), name="writer.mqtt.keepalive"),
        ]

    async def _connection_loop(self) -> None:
        """Read acknowledgements until the connection drops; then reconnect and resend."""
        while True:
            try:
                await self._read_loop()
            except (OSError, asyncio.IncompleteReadError, proto.ProtocolError) as exc:
                log.warning(
                    "MQTT connection to %s lost: %s", self.address, exc or type(exc).__name__
                )
            await self._close_stream()
            if time.monotonic() - self.connected_at >= STABLE_CONNECTION:
                self.backoff.reset()  # else a broker that takes us and drops us: back off
            await self._reconnect()

    async def _read_loop(self) -> None:
        assert self.reader is not None
        buffer = bytearray()
        while True:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("closed by the broker")
            self.last_heard = time.monotonic()
            buffer += data
            packets, used = proto.scan_packets(buffer)
            del buffer[:used]
            self._handle(packets)

    def _handle(self, packets: list[tuple[int, int]]) -> None:
        releases = []
        for kind, packet_id in packets:
            if kind == proto.PUBACK or kind == proto.PUBCOMP:
                message = self.inflight.pop(packet_id, None)
                if message is not None:
                    self._acknowledged(message)
            elif kind == proto.PUBREC:
                releases.append(proto.pubrel_packet(packet_id))
        if releases and self.writer is not None:
            self.writer.write(b"".join(releases))
        self._refill()

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE / 2)
            if not self.connected or self.writer is None:
                continue
            if time.monotonic() - self.last_heard > KEEPALIVE * 1.5:
                log.warning("MQTT broker %s silent for %ds; reconnecting", self.address, KEEPALIVE)
                self.writer.transport.abort()
                continue
            self.writer.write(proto.PINGREQ_PACKET)

    async def _reconnect(self) -> None:
        while True:
            await asyncio.sleep(self.backoff.next_delay())
            try:
                await self.connect()
            except DestinationUnreachable as exc:
                self.counters.add(names.retries(NAME))
                log.warning("MQTT reconnect failed (%s); retrying", exc)
                continue
            resend = list(self.inflight.values())
            self.inflight.clear()
            self.backlog.extendleft(reversed(resend))
            self.counters.add(names.MQTT_REPUBLISHED, len(resend))
            log.info(
                "MQTT reconnected to %s; resending %d unacknowledged message(s)",
                self.address,
                len(resend),
            )
            self._refill(dup=len(resend))
            return

    # -- publishing -------------------------------------------------------------------------

    async def write_batch(self, batch: EncodedBatch, seq: int = -1) -> None:
        messages = self._messages(batch)
        if not messages:
            # Every topic of these events is disabled: done, and counted as the events of a
            # batch with something to publish are (else written.mqtt depends on batching).
            self.on_ack([Ack(seq, len(batch.mqtt_payloads), 0, batch.received_ns)])
            return
        while self.outstanding >= self.max_pending:
            self.room.clear()
            await self.room.wait()
        self.batches[self.next_batch] = BatchState(
            len(messages), len(batch.mqtt_payloads), batch.received_ns, seq
        )
        self.next_batch += 1
        self.outstanding += len(messages)
        self.idle.clear()
        self.backlog.extend(messages)
        self._refill()
        writer = self.writer
        if writer is not None and writer.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            with contextlib.suppress(OSError):  # the connection loop notices and reconnects
                await writer.drain()

    def _messages(self, batch: EncodedBatch) -> list[Message]:
        seq = self.next_batch
        everything, per_action = self.everything, self.per_action
        messages = []
        for payload, action in zip(batch.mqtt_payloads, batch.actions, strict=True):
            if everything is not None:
                messages.append(Message(seq, everything, payload))
            header = per_action[action]
            if header is not None:
                messages.append(Message(seq, header, payload))
        return messages

    def _refill(self, dup: int = 0) -> None:
        """Move messages from the backlog onto the wire while the window has room.

        The first `dup` messages are resends after a reconnect and carry the DUP flag.
        """
        if not self.connected or self.writer is None or not self.backlog:
            return
        packets = []
        sent = []
        backlog, inflight = self.backlog, self.inflight
        while backlog and len(inflight) < self.window:
            message = backlog.popleft()
            if self.qos:
                packet_id = self._take_packet_id()
                inflight[packet_id] = message
                packets.append(message.header.packet(packet_id, message.payload, dup > 0))
                dup -= 1
            else:
                packets.append(message.header.packet(0, message.payload))
                sent.append(message)
        self.writer.write(b"".join(packets))
        for message in sent:  # QoS 0: handed to the connection is all there is
            self._acknowledged(message)

    def _take_packet_id(self) -> int:
        packet_id = self.next_id
        while packet_id in self.inflight:
            packet_id = packet_id % MAX_PACKET_ID + 1
        self.next_id = packet_id % MAX_PACKET_ID + 1
        return packet_id

    def _acknowledged(self, message: Message) -> None:
        state = self.batches[message.batch]
        state.remaining -= 1
        self.outstanding -= 1
        if state.remaining == 0:
            del self.batches[message.batch]
            self.on_ack([Ack(state.seq, state.events, 0, state.received_ns)])
        self.room.set()
        if not self.outstanding:
            self.idle.set()

    async def flush(self) -> None:
        await self.idle.wait()

    async def close(self) -> None:
        await self.flush()
        await cancel_all(self.tasks)
        if self.writer is not None and self.connected:
            self.writer.write(proto.DISCONNECT_PACKET)
        await self._close_stream()
