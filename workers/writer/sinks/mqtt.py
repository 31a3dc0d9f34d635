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
- QoS 2 is exactly-once while the broker keeps our session: each sink starts with a clean
  session, then keeps one (clean session 0); after a reconnect that finds the session, a
  message that got PUBREC gets only its PUBREL again and the others are resent with their
  own packet ids, which the broker recognises. When the session is gone (the broker
  restarted without persistence) everything unfinished is published again: at-least-once.
- Nothing from the broker is trusted: anything but a well-formed acknowledgement of the
  kind our QoS expects is a protocol error, logged, and the connection is made afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
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
DISCARD_TIMEOUT = 2.0
"""Seconds shutdown gives the connection that discards our QoS 2 session on the broker."""
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
        self.client_id = self.options.client_id or default_client_id()
        self.keeps_session = self.qos == 2
        self.released: set[int] = set()
        """QoS 2 packet ids that got PUBREC: they await PUBCOMP, never a new PUBLISH."""
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
            # Always a password callback: without one OpenSSL would prompt on the terminal.
            password = tls.key_password.encode("utf-8")
            context.load_cert_chain(tls.cert_file, tls.key_file or None, lambda: password)
        if tls.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    async def connect(self, clean_session: bool = True) -> bool:
        """Connect and handshake; return whether the broker kept our session."""
        try:
            session = await asyncio.wait_for(self._handshake(clean_session), CONNECT_TIMEOUT)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, proto.ProtocolError) as exc:
            await self._close_stream()
            reason = str(exc) or type(exc).__name__
            raise DestinationUnreachable(f"MQTT broker {self.address}: {reason}") from exc
        except BaseException:  # cancelled (a start-up timeout): leave no socket open
            self._abort_stream()
            raise
        self.last_heard = self.connected_at = time.monotonic()
        return session

    async def _handshake(self, clean_session: bool) -> bool:
        self.reader, self.writer = await asyncio.open_connection(
            self.broker.broker_host, self.broker.broker_port, ssl=self.tls_context()
        )
        self.writer.write(
            proto.connect_packet(
                self.client_id,
                KEEPALIVE,
                self.options.username or None,
                self.options.password or None,
                clean_session=clean_session,
            )
        )
        present = proto.check_connack(await self.reader.readexactly(4), clean_session)
        self.connected = True
        return present

    def _abort_stream(self) -> None:
        writer, self.writer, self.reader = self.writer, None, None
        self.connected = False
        if writer is not None:
            writer.transport.abort()

    async def _close_stream(self) -> None:
        writer, self.writer, self.reader = self.writer, None, None
        self.connected = False
        if writer is None:
            return
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 2.0)

    async def start(self) -> None:
        if self.options.password and not self.options.tls.enable:
            log.warning(
                "MQTT password for %s is sent without TLS (senseflow.mqtt.tls.enable is false)",
                self.address,
            )
        await self.connect()
        if self.keeps_session:  # the clean connect discarded any stale session: now keep one
            await self._disconnect()
            await self.connect(clean_session=False)
        self.tasks = [
            spawn(self._connection_loop(), name="writer.mqtt.connection"),
            spawn(self._keepalive_loop(), name="writer.mqtt.keepalive"),
        ]

    async def _disconnect(self) -> None:
        if self.writer is not None and self.connected:
            self.writer.write(proto.DISCONNECT_PACKET)
        await self._close_stream()

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
        finished: list[Ack] = []  # acknowledged to the feed at once: one count, one cursor move
        try:
            releases = self._scan_acks(packets, finished)
        finally:  # a protocol error after some acks: those are delivered all the same
            self._finish(finished)
        if releases and self.writer is not None:
            self.writer.write(b"".join(releases))
        self._refill()

    def _scan_acks(self, packets: list[tuple[int, int]], finished: list[Ack]) -> list[bytes]:
        """Settle the acknowledgements read; returns the PUBRELs to send (QoS 2)."""
        releases = []
        final = proto.PUBCOMP if self.qos == 2 else proto.PUBACK
        for kind, packet_id in packets:
            if kind == final:
                if self.qos == 2 and packet_id not in self.released and packet_id in self.inflight:
                    raise proto.ProtocolError(f"PUBCOMP {packet_id} before its PUBREC")
                self.released.discard(packet_id)
                message = self.inflight.pop(packet_id, None)
                if message is not None:
                    self._acknowledged(message, finished)
            elif kind == proto.PUBREC and self.qos == 2:
                if packet_id in self.inflight:
                    self.released.add(packet_id)
                releases.append(proto.pubrel_packet(packet_id))
            elif kind != proto.PINGRESP:
                raise proto.ProtocolError(f"packet type 0x{kind:02x} at QoS {self.qos}")
        return releases

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
                session = await self.connect(clean_session=not self.keeps_session)
            except DestinationUnreachable as exc:
                self.counters.add(names.retries(NAME))
                log.warning("MQTT reconnect failed (%s); retrying", exc)
                continue
            if session:
                self._resume_session()
            else:
                self._resend_all()
            return

    def _resume_session(self) -> None:
        """The broker kept our session: finish every exchange with its own packet id."""
        assert self.writer is not None
        packets = [
            proto.pubrel_packet(packet_id)
            if packet_id in self.released
            else message.header.packet(packet_id, message.payload, dup=True)
            for packet_id, message in self.inflight.items()
        ]
        self.writer.write(b"".join(packets))
        log.info(
            "MQTT reconnected to %s, session kept; %d release(s) and %d message(s) resent",
            self.address,
            len(self.released),
            len(self.inflight) - len(self.released),
        )
        self._refill()

    def _resend_all(self) -> None:
        """A new session: publish again whatever was not acknowledged, first, in order."""
        if self.released:
            log.warning(
                "MQTT broker %s lost our session: %d QoS 2 message(s) already received "
                "(PUBREC) are published again and may reach subscribers twice",
                self.address,
                len(self.released),
            )
            self.released.clear()
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

    # -- publishing -------------------------------------------------------------------------

    async def write_batch(self, batch: EncodedBatch, seq: int = -1) -> None:
        messages = self._messages(batch)
        if not messages:
            self._nothing_to_publish(batch, seq)
            return
        while self.outstanding >= self.max_pending:
            self.room.clear()
            await self.room.wait()
        self._publish(batch, seq, messages)
        if self._buffer_full():
            assert self.writer is not None
            with contextlib.suppress(OSError):  # the connection loop notices and reconnects
                await self.writer.drain()

    def offer(self, batch: EncodedBatch, seq: int = -1) -> bool:
        """`write_batch` if it would not wait (the writer's hand-over as it spools): the
        batch's PUBLISH packets are written to the connection at once."""
        if self.outstanding >= self.max_pending or self._buffer_full():
            return False
        messages = self._messages(batch)
        if messages:
            self._publish(batch, seq, messages)
        else:
            self._nothing_to_publish(batch, seq)
        return True

    def _nothing_to_publish(self, batch: EncodedBatch, seq: int) -> None:
        """Every topic of these events is disabled: done, and counted as the events of a
        batch with something to publish are (else written.mqtt depends on batching)."""
        self.on_ack([Ack(seq, len(batch.mqtt_payloads), 0, batch.received_ns)])

    def _publish(self, batch: EncodedBatch, seq: int, messages: list[Message]) -> None:
        self.batches[self.next_batch] = BatchState(
            len(messages), len(batch.mqtt_payloads), batch.received_ns, seq
        )
        self.next_batch += 1
        self.outstanding += len(messages)
        self.idle.clear()
        self.backlog.extend(messages)
        self._refill()

    def _buffer_full(self) -> bool:
        writer = self.writer
        return writer is not None and writer.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT

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
        packets = bytearray()  # one buffer for all: written once, never changed after
        sent = []
        backlog, inflight = self.backlog, self.inflight
        while backlog and len(inflight) < self.window:
            message = backlog.popleft()
            if self.qos:
                packet_id = self._take_packet_id()
                inflight[packet_id] = message
                message.header.append_packet(packets, packet_id, message.payload, dup > 0)
                dup -= 1
            else:
                message.header.append_packet(packets, 0, message.payload)
                sent.append(message)
        self.writer.write(packets)
        if sent:  # QoS 0: handed to the connection is all there is
            finished: list[Ack] = []
            for message in sent:
                self._acknowledged(message, finished)
            self._finish(finished)

    def _take_packet_id(self) -> int:
        packet_id = self.next_id
        while packet_id in self.inflight:
            packet_id = packet_id % MAX_PACKET_ID + 1
        self.next_id = packet_id % MAX_PACKET_ID + 1
        return packet_id

    def _acknowledged(self, message: Message, finished: list[Ack]) -> None:
        """One message acknowledged; its batch goes to `finished` once all of them are."""
        state = self.batches[message.batch]
        state.remaining -= 1
        self.outstanding -= 1
        if state.remaining == 0:
            del self.batches[message.batch]
            finished.append(Ack(state.seq, state.events, 0, state.received_ns))

    def _finish(self, finished: list[Ack]) -> None:
        """After messages were acknowledged: tell the feed which batches are done, and
        whoever waits for room or for everything to be acknowledged."""
        if finished:
            self.on_ack(finished)
        self.room.set()
        if not self.outstanding:
            self.idle.set()

    async def flush(self) -> None:
        await self.idle.wait()

    async def close(self) -> None:
        await self.flush()
        await cancel_all(self.tasks)
        await self._disconnect()
        if self.keeps_session and self.tasks:
            await self._discard_session()

    async def _discard_session(self) -> None:
        """Everything is acknowledged: leave no session of ours behind in the broker."""
        with contextlib.suppress(DestinationUnreachable, TimeoutError):
            await asyncio.wait_for(self.connect(), DISCARD_TIMEOUT)
            await self._disconnect()


def default_client_id() -> str:
    """Unique per sink: replicas of one container image share pid and often host name."""
    return f"senseflow-{socket.gethostname()}-{secrets.token_hex(4)}"
