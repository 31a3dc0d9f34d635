"""Structs that cross process boundaries, and the enriched event.

Everything that travels between processes is one msgpack-encoded struct per batch:
`array_like` keeps the encoding small, `gc=False` keeps the collector away from
the millions of short-lived instances on the hot path.
"""

from __future__ import annotations

import msgspec

ACTIONS: tuple[str, ...] = ("Start session", "Stop session", "Open connection", "Close connection")
"""The four user-event actions, in the order of their index in `EncodedBatch.actions`."""


class RawBatch(msgspec.Struct, array_like=True, gc=False):
    """Datagrams read by one receiver, each with its strictly increasing receive time (ns)."""

    datagrams: list[bytes]
    received_ns: list[int]


class UserEvent(msgspec.Struct, gc=False):
    """One parsed and enriched user event; empty strings mean 'not known'."""

    message_type: str
    host: str
    command: str
    user_directory: str
    user_id: str
    origin: str
    context: str
    message: str
    received_ns: int
    app_id: str = ""
    app_name: str = ""
    ua_browser_name: str = ""
    ua_browser_major: str = ""
    ua_os_name: str = ""
    ua_os_version: str = ""

    @property
    def user_full(self) -> str:
        return f"{self.user_directory}\\{self.user_id}"

    @property
    def action_index(self) -> int:
        return ACTIONS.index(self.command)


class EncodedBatch(msgspec.Struct, array_like=True, gc=False, tag=1):
    """A worker's output for one raw batch: bytes ready to send, and its counters.

    One field per destination, filled by the encoder its record in
    workers/writer/destinations.py names (a field each, not a dict: the hot path builds
    one of these per batch). `lines` is newline-terminated InfluxDB line protocol, one
    line per event. `mqtt_payloads[i]` belongs to the event whose action index is
    `actions[i]` (filled for MQTT and for NATS, which publishes the same JSON).
    `newrelic` holds one JSON object per event (empty when New Relic is off).
    `received_ns` is the receive time per event, for latency measurement.
    `worker` and `number` say which worker sent it and its place in that worker's sends
    (consecutive, carried on across restarts of the worker); `datagrams` is how many
    datagrams it accounts for (events + invalid + excluded).
    `sessions` is a msgpack array of `shared.sessions.SessionEvent` arrays, one per event
    (b"" when live sessions are off), for the writer's session state.
    """

    lines: bytes
    mqtt_payloads: list[bytes]
    actions: bytes
    newrelic: list[bytes]
    received_ns: list[int]
    counters: dict[str, int]
    worker: int = -1
    number: int = 0
    datagrams: int = 0
    sessions: bytes = b""


class Fence(msgspec.Struct, array_like=True, gc=False, tag=2):
    """Sent by the supervisor, never a worker: `worker` died holding `datagrams` datagrams
    from its send `number` on. Queued behind anything that worker sent, so the writer
    counts those it never got as lost (`dropped.worker_crash`)."""

    worker: int
    number: int
    datagrams: int


def decode_spooled(record: bytes) -> EncodedBatch:
    """A batch read back from the spool (raises msgspec.DecodeError when it is not one)."""
    return SPOOLED_DECODER.decode(record)


def raw_batch_size(message: bytes) -> int:
    """Datagrams in an encoded RawBatch, read from its msgpack header without decoding it."""
    tag = message[1] if len(message) > 1 else 0
    if tag & 0xF0 == 0x90:
        return tag & 0x0F
    if tag == 0xDC:
        return int.from_bytes(message[2:4], "big")
    if tag == 0xDD:
        return int.from_bytes(message[2:6], "big")
    return len(RAW_DECODER.decode(message).datagrams)


RAW_ENCODER = msgspec.msgpack.Encoder()
RAW_DECODER = msgspec.msgpack.Decoder(RawBatch)
ENCODED_DECODER = msgspec.msgpack.Decoder(EncodedBatch | Fence)
"""The workers -> writer channel: a batch, or the supervisor's fence."""
SPOOLED_DECODER = msgspec.msgpack.Decoder(EncodedBatch)
