"""The few MQTT 3.1.1 packets a publisher needs, encoded and decoded in bulk.

Why not paho: measured on this machine (benchmarks/RESULTS.md), paho spends ~80 µs of
Python per QoS 1 message (packet objects, properties, a recv() per header byte), which
caps one process near 12,000 messages/s however deep the window. A publisher only needs
CONNECT, PUBLISH, PUBACK (QoS 1), PUBREC/PUBREL/PUBCOMP (QoS 2), PINGREQ and
DISCONNECT; encoding a whole batch into one buffer and scanning acknowledgements out of
one read is an order of magnitude cheaper.
"""

from __future__ import annotations

import struct

PROTOCOL_LEVEL_311 = 4

CONNECT = 0x10
CONNACK = 0x20
PUBLISH = 0x30
PUBACK = 0x40
PUBREC = 0x50
PUBREL = 0x62  # PUBREL carries the fixed flags 0b0010
PUBCOMP = 0x70
PINGREQ = 0xC0
PINGRESP = 0xD0
DISCONNECT = 0xE0

DUP_FLAG = 0x08

CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}

PINGREQ_PACKET = bytes((PINGREQ, 0))
DISCONNECT_PACKET = bytes((DISCONNECT, 0))


class ProtocolError(Exception):
    pass


def remaining_length(length: int) -> bytes:
    """MQTT's variable-length integer (1-4 bytes)."""
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | 0x80 if length else byte)
        if not length:
            return bytes(out)


def utf8_field(text: str | bytes) -> bytes:
    data = text.encode("utf-8") if isinstance(text, str) else text
    if len(data) > 0xFFFF:
        raise ValueError("an MQTT string holds at most 65535 bytes")
    return struct.pack("!H", len(data)) + data


def connect_packet(
    client_id: str,
    keepalive: int,
    username: str | None = None,
    password: str | None = None,
    *,
    clean_session: bool = True,
) -> bytes:
    flags = 0x02 if clean_session else 0x00
    payload = utf8_field(client_id)
    if username:
        flags |= 0x80
        payload += utf8_field(username)
        if password:
            flags |= 0x40
            payload += utf8_field(password)
    variable = (
        utf8_field("MQTT") + bytes((PROTOCOL_LEVEL_311, flags)) + struct.pack("!H", keepalive)
    )
    body = variable + payload
    return bytes((CONNECT,)) + remaining_length(len(body)) + body


def check_connack(packet: bytes, clean_session: bool = True) -> bool:
    """Raise unless `packet` is a CONNACK accepting the connection; return session-present."""
    if len(packet) != 4 or packet[0] != CONNACK or packet[1] != 2:
        raise ProtocolError(f"expected CONNACK, got {packet[:8]!r}")
    flags, code = packet[2], packet[3]
    if code:
        raise ProtocolError(f"broker refused the connection: {CONNACK_REASONS.get(code, code)}")
    if flags & 0xFE:
        raise ProtocolError(f"CONNACK with reserved flag bits set: 0x{flags:02x}")
    session_present = bool(flags)
    if session_present and clean_session:  # 3.2.2.2: must be 0 after a clean-session CONNECT
        raise ProtocolError("CONNACK claims a session present after a clean-session CONNECT")
    return session_present


class TopicHeader:
    """What precedes the payload of every PUBLISH to one topic, computed once."""

    def __init__(self, topic: str, qos: int) -> None:
        self.encoded_topic = utf8_field(topic)
        self.qos = qos
        self.first_byte = PUBLISH | (qos << 1)
        # topic + packet id (QoS > 0) precede the payload
        self.overhead = len(self.encoded_topic) + (2 if qos else 0)

    def packet(self, packet_id: int, payload: bytes, dup: bool = False) -> bytes:
        out = bytearray()
        self.append_packet(out, packet_id, payload, dup)
        return bytes(out)

    def append_packet(
        self, out: bytearray, packet_id: int, payload: bytes, dup: bool = False
    ) -> None:
        """PUBLISH `payload` with `packet_id` (ignored at QoS 0), added to `out`: a batch's
        packets are built in one buffer (no bytes object per packet, no join)."""
        out.append(self.first_byte | DUP_FLAG if dup else self.first_byte)
        length = self.overhead + len(payload)
        if length < 0x80:
            out.append(length)
        elif length < 0x4000:
            out.append(length & 0x7F | 0x80)
            out.append(length >> 7)
        else:
            out += remaining_length(length)
        out += self.encoded_topic
        if self.qos:
            out += packet_id.to_bytes(2, "big")
        out += payload


def pubrel_packet(packet_id: int) -> bytes:
    return bytes((PUBREL, 2)) + packet_id.to_bytes(2, "big")


ACK_LENGTHS = {PUBACK: 2, PUBREC: 2, PUBCOMP: 2, PINGRESP: 0}
"""Every packet a publisher may receive after CONNACK (first byte, flags included) and its
remaining length. A broker sends a publisher nothing else: no subscription, no PUBLISH."""


def scan_packets(buffer: bytearray) -> tuple[list[tuple[int, int]], int]:
    """Split complete packets off the front of `buffer`.

    Returns ([(packet type byte, packet id or 0)], bytes consumed). Anything but an
    acknowledgement or PINGRESP of exactly its length raises ProtocolError as soon as its
    fixed header is read, so an unfinished packet never holds more than a few bytes.
    """
    found: list[tuple[int, int]] = []
    position, end = 0, len(buffer)
    while position + 2 <= end:
        kind = buffer[position]
        length = buffer[position + 1]
        expected = ACK_LENGTHS.get(kind)
        if expected is None or length != expected:
            raise ProtocolError(_unexpected(kind, buffer[position + 1 : position + 5]))
        index = position + 2
        if index + length > end:
            break
        packet_id = (buffer[index] << 8 | buffer[index + 1]) if length else 0
        found.append((kind, packet_id))
        position = index + length
    return found, position


def _unexpected(kind: int, length_bytes: bytes | bytearray) -> str:
    expected = ACK_LENGTHS.get(kind)
    if expected is None:
        return f"unexpected packet from the broker: type byte 0x{kind:02x}"
    return (
        f"malformed packet from the broker: type byte 0x{kind:02x} with remaining length "
        f"byte(s) {bytes(length_bytes[:4]).hex()} (expected {expected})"
    )
