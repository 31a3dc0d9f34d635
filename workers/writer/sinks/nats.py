"""NATS JetStream destination: the MQTT payloads, one subject per action, acked in bulk.

Each event becomes one message on `<subjectPrefix>.<action>` (`ACTION_SUBJECTS`) carrying
the MQTT JSON payload the workers already encoded, and a `Nats-Msg-Id` header
`<msgIdPrefix>-<receive time ns>`: a receive time is unique per instance (strictly
increasing per reader, readers kept apart by their stride, receiver/endpoint.py) and
`msgIdPrefix` (default `senseflow.instance`, else the host name) tells instances apart, so
the id is unique per event and the same every time the spool replays it; JetStream stores
a publish whose id it saw within the stream's duplicate window only once.

Publishing bypasses nats-py's per-message `publish()`: each message is one pre-built HPUB
frame (subject, a reply subject `<inbox>.<token>`, the header, the payload), a batch is
handed to the connection as one buffer, and acknowledgements arrive on one subscription to
`<inbox>.*` and are matched by token (a dict lookup). A frame is kept until JetStream acks
it, so a resend is the same bytes.

- At most `maxPending` messages (or `pendingEvents`, if smaller) await acknowledgement;
  `write_batch` waits past that, and the rest waits in the spool.
- A batch is acknowledged to the spool when all its messages are acked (stored, or a
  duplicate of a stored one: counted `nats.duplicates`).
- nats-py reconnects (every server of the pool, the cluster's too, forever); after a
  reconnect everything unacknowledged is published again, in order. An error answer
  (no stream leader during a fail-over, a 503 "no responders") or `ackTimeout` seconds
  without any ack resend them after a capped exponential backoff with jitter
  (`retries.nats`, `nats.republished`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from dataclasses import dataclass

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from shared import counternames as names
from shared.backoff import Backoff
from shared.config import Config, NatsOptions, instance_name
from shared.counters import Counting
from shared.events import EncodedBatch
from shared.tasks import cancel_all, spawn
from workers.writer.sinks.base import Ack, Acknowledge, DestinationUnreachable, counting_acks

log = logging.getLogger("senseflow.nats")

NAME = "nats"
ACTION_SUBJECTS = ("session_start", "session_stop", "connection_open", "connection_close")
"""The subject below `subjectPrefix` per action index (shared.events.ACTIONS)."""
CONNECT_TIMEOUT = 10
RECONNECT_WAIT = 1
START_ATTEMPTS = 1
"""At start, each server is tried this many times again before start() gives up, with
the last error as the reason (once connected, reconnecting never gives up)."""
"""Seconds nats-py waits before trying a server again that it tried recently."""
_STORED = b'{"stream"'
"""How a PubAck starts; an error answer starts `{"error"`, a 503 has no body."""
_DUPLICATE = b'"duplicate":'  # nats-server writes `"duplicate": true`, only when true


@dataclass(slots=True)
class BatchState:
    remaining: int
    events: int
    received_ns: list[int]
    seq: int


def subjects(options: NatsOptions) -> list[bytes]:
    return [f"{options.subject_prefix}.{action}".encode() for action in ACTION_SUBJECTS]


def msg_id_prefix(config: Config) -> str:
    """`nats.msgIdPrefix`, else this instance's name (`senseflow.instance`, else the host
    name): instances that publish to one stream must differ in it."""
    return config.pipeline.nats.msg_id_prefix or instance_name(config.pipeline)


def tls_context(options: NatsOptions) -> ssl.SSLContext | None:
    tls = options.tls
    uses_tls = any(url.startswith("tls://") for url in options.servers)
    if not (uses_tls or tls.ca_file or tls.cert_file):
        return None
    context = ssl.create_default_context(cafile=tls.ca_file or None)
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file or None)
    return context


class NatsSink:
    name = NAME

    def __init__(
        self, config: Config, counters: Counting, on_ack: Acknowledge | None = None
    ) -> None:
        self.options = config.pipeline.nats
        # In memory at most: this many awaiting acks (the spool keeps the rest).
        self.max_pending = min(self.options.max_pending, config.pipeline.pending_events)
        self.counters = counters
        self.on_ack: Acknowledge = on_ack or counting_acks(counters, NAME)
        self.subjects = subjects(self.options)
        self.id_prefix = msg_id_prefix(config).encode()
        self.nc = Client()
        self.reply_prefix = b""
        self.unacked: dict[int, tuple[int, bytes]] = {}
        """token -> (batch number, frame), in publish order."""
        self.batches: dict[int, BatchState] = {}
        self.next_batch = 0
        self.next_token = 0
        self.room = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.resend = asyncio.Event()
        self.backoff = Backoff(base=0.2, cap=10.0)
        self.last_progress = time.monotonic()
        self.tasks: list[asyncio.Task[None]] = []
        self.closing = False
        self.last_error: Exception | None = None

    @property
    def address(self) -> str:
        return ", ".join(self.options.servers)

    # -- connection -------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await asyncio.wait_for(self._connect(), CONNECT_TIMEOUT)
            await self._ensure_stream()
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            await self._close_connection()
            cause = self.last_error if isinstance(exc, nats.errors.NoServersError) else exc
            reason = str(cause or exc) or type(exc).__name__
            raise DestinationUnreachable(f"NATS {self.address}: {reason}") from exc
        except BaseException:
            await self._close_connection()
            raise
        self.tasks = [
            spawn(self._resend_loop(), name="writer.nats.resend"),
            spawn(self._watchdog_loop(), name="writer.nats.watchdog"),
        ]

    async def _connect(self) -> None:
        options = self.options
        if options.password and not tls_context(options):
            log.warning("NATS password for %s is sent without TLS", self.address)
        await self.nc.connect(
            servers=list(options.servers),
            name="senseflow",
            user=options.user or None,
            password=options.password or None,
            token=options.token or None,
            user_credentials=options.creds_file or None,
            tls=tls_context(options),
            allow_reconnect=True,
            max_reconnect_attempts=START_ATTEMPTS,
            reconnect_time_wait=RECONNECT_WAIT,
            connect_timeout=CONNECT_TIMEOUT // 2,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )
        # Connected: from now on nats-py tries every server again and again, forever.
        self.nc.options["max_reconnect_attempts"] = -1
        inbox = self.nc.new_inbox()
        self.reply_prefix = f"{inbox}.".encode()
        await self.nc.subscribe(f"{inbox}.*", cb=self._on_ack, pending_msgs_limit=-1)
        await self.nc.flush()  # SUB is on the wire before any frame we write ourselves

    async def _ensure_stream(self) -> None:
        """The stream, created with our subjects when missing; an existing one is kept."""
        options = self.options
        js = self.nc.jetstream(timeout=CONNECT_TIMEOUT)  # slow while a cluster elects
        wanted = f"{options.subject_prefix}.>"
        try:
            info = await js.stream_info(options.stream)
        except nats.js.errors.NotFoundError:
            await js.add_stream(
                name=options.stream,
                subjects=[wanted],
                num_replicas=options.replicas,
                duplicate_window=options.duplicate_window,
            )
            log.info("NATS stream %s created (subjects %s)", options.stream, wanted)
            return
        if wanted not in (info.config.subjects or []):
            log.warning(
                "NATS stream %s exists with subjects %s, not %s: publishes outside them "
                "are refused",
                options.stream,
                info.config.subjects,
                wanted,
            )

    async def _on_error(self, exc: Exception) -> None:
        # The server's own refusal ("Authorization Violation") says why; the connection
        # reset that often follows it says nothing more, so it does not replace it.
        if not (isinstance(exc, OSError) and isinstance(self.last_error, nats.errors.Error)):
            self.last_error = exc
        log.warning("NATS %s: %s", self.address, str(exc) or type(exc).__name__)

    async def _on_disconnected(self) -> None:
        if not self.closing:
            log.warning("NATS connection to %s lost; reconnecting", self.address)

    async def _on_reconnected(self) -> None:
        log.info("NATS reconnected to %s", self.nc.connected_url)
        self.backoff.reset()
        self._send(list(self.unacked.values()), resent=True)

    async def _close_connection(self) -> None:
        self.closing = True
        with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
            await asyncio.wait_for(self.nc.close(), CONNECT_TIMEOUT / 2)

    # -- acknowledgements -------------------------------------------------------------------

    async def _on_ack(self, msg: Msg) -> None:
        data = msg.data
        if not data.startswith(_STORED):  # an API error, or a 503 (no stream leader now)
            self._failed(data or f"status {msg.header}".encode())
            return
        token = int(msg.subject[len(self.reply_prefix) :])
        entry = self.unacked.pop(token, None)
        if entry is None:
            return  # the ack of a resend we had an ack for already
        if _DUPLICATE in data:
            self.counters.add(names.NATS_DUPLICATES)
        self.last_progress = time.monotonic()
        self._acknowledged(entry[0])

    def _failed(self, answer: bytes) -> None:
        if not self.resend.is_set():
            log.warning("NATS JetStream refused a publish (%s); retrying", answer[:200].decode())
            self.resend.set()

    def _acknowledged(self, batch: int) -> None:
        state = self.batches[batch]
        state.remaining -= 1
        if state.remaining == 0:
            del self.batches[batch]
            self.on_ack([Ack(state.seq, state.events, 0, state.received_ns)])
        self.room.set()
        if not self.unacked:
            self.idle.set()
            self.backoff.reset()

    async def _resend_loop(self) -> None:
        while True:
            await self.resend.wait()
            await asyncio.sleep(self.backoff.next_delay())
            self.resend.clear()
            self.counters.add(names.retries(NAME))
            self._send(list(self.unacked.values()), resent=True)

    async def _watchdog_loop(self) -> None:
        timeout = self.options.ack_timeout
        while True:
            await asyncio.sleep(timeout / 2)
            if not self.unacked or not self.nc.is_connected:
                continue
            if time.monotonic() - self.last_progress > timeout:
                log.warning("NATS: no acknowledgement for %gs; publishing again", timeout)
                self.last_progress = time.monotonic()
                self.resend.set()

    # -- publishing -------------------------------------------------------------------------

    async def write_batch(self, batch: EncodedBatch, seq: int = -1) -> None:
        events = len(batch.mqtt_payloads)
        if not events:
            self.on_ack([Ack(seq, 0, 0, batch.received_ns)])
            return
        while len(self.unacked) >= self.max_pending:
            self.room.clear()
            await self.room.wait()
        number = self.next_batch
        self.next_batch += 1
        self.batches[number] = BatchState(events, events, batch.received_ns, seq)
        if not self.unacked:
            self.last_progress = time.monotonic()
        self.idle.clear()
        self._send(self._frames(batch, number))
        transport = self.nc._transport
        if transport is not None and self.nc.is_connected:
            # Waits only past the socket's high-water mark. A failure: nats-py notices and
            # reconnects, and we resend.
            with contextlib.suppress(OSError):
                await transport.drain()  # type: ignore[no-untyped-call]

    def _frames(self, batch: EncodedBatch, number: int) -> list[tuple[int, bytes]]:
        """One HPUB frame per event, registered as unacknowledged under a new token."""
        subjects, reply, id_prefix = self.subjects, self.reply_prefix, self.id_prefix
        unacked = self.unacked
        token = self.next_token
        frames = []
        for payload, action, received_ns in zip(
            batch.mqtt_payloads, batch.actions, batch.received_ns, strict=True
        ):
            header = b"NATS/1.0\r\nNats-Msg-Id: %s-%d\r\n\r\n" % (id_prefix, received_ns)
            size = len(header)
            frame = b"HPUB %s %s%d %d %d\r\n%s%s\r\n" % (
                subjects[action],
                reply,
                token,
                size,
                size + len(payload),
                header,
                payload,
            )
            entry = (number, frame)
            unacked[token] = entry
            frames.append(entry)
            token += 1
        self.next_token = token
        return frames

    def _send(self, entries: list[tuple[int, bytes]], resent: bool = False) -> None:
        """Hand frames to the connection; while it is down they wait for the reconnect."""
        if not entries or not self.nc.is_connected or self.nc._transport is None:
            return
        if resent:
            self.counters.add(names.NATS_REPUBLISHED, len(entries))
        self.nc._transport.writelines([frame for _, frame in entries])
        self.nc.stats["out_msgs"] += len(entries)

    async def flush(self) -> None:
        await self.idle.wait()

    async def close(self) -> None:
        if self.tasks:
            await self.flush()
        await cancel_all(self.tasks)
        await self._close_connection()
