"""workers/writer/sinks/mqtt_protocol.py: MQTT 3.1.1 packets byte for byte.

The standard is OASIS MQTT 3.1.1, chapters 2-3.

Expected bytes are written out from the standard, not computed with the module's helpers.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.writer.sinks import mqtt_protocol as proto


def decode_remaining_length(data: bytes) -> tuple[int, int]:
    """The standard's decoding algorithm (2.2.3): (value, bytes used)."""
    value, multiplier = 0, 1
    for used, byte in enumerate(data, start=1):
        value += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            return value, used
        multiplier *= 128
    raise AssertionError(f"unterminated remaining length {data!r}")


def puback(packet_id: int) -> bytes:
    return bytes((0x40, 2)) + packet_id.to_bytes(2, "big")


def scan_all(buffer: bytearray) -> list[tuple[int, int]]:
    """Scan `buffer` and drop what was consumed, as the sink's read loop does."""
    found, used = proto.scan_packets(buffer)
    del buffer[:used]
    return found


# -- remaining length ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16383, b"\xff\x7f"),
        (16384, b"\x80\x80\x01"),
        (2097151, b"\xff\xff\x7f"),
        (2097152, b"\x80\x80\x80\x01"),
        (268435455, b"\xff\xff\xff\x7f"),
    ],
)
def test_remaining_length_matches_the_table_of_the_standard(value: int, encoded: bytes) -> None:
    assert proto.remaining_length(value) == encoded


@given(st.integers(min_value=0, max_value=268_435_455))
def test_remaining_length_decodes_back_with_the_standard_algorithm(value: int) -> None:
    encoded = proto.remaining_length(value)
    assert decode_remaining_length(encoded) == (value, len(encoded))
    assert len(encoded) == 1 + (value > 127) + (value > 16383) + (value > 2097151)


# -- CONNECT / CONNACK -----------------------------------------------------------------------

VARIABLE_HEADER = b"\x00\x04MQTT\x04"  # protocol name, level 4 (3.1.1); flags and keepalive follow


def test_connect_packet_without_credentials() -> None:
    packet = proto.connect_packet("cid", 30)
    body = VARIABLE_HEADER + b"\x02\x00\x1e" + b"\x00\x03cid"
    assert packet == b"\x10" + bytes((len(body),)) + body
    assert packet == b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x1e\x00\x03cid"


def test_connect_packet_with_username_and_password() -> None:
    packet = proto.connect_packet("cid", 60, "user", "pässword")
    payload = b"\x00\x03cid" + b"\x00\x04user" + b"\x00\x09p\xc3\xa4ssword"
    body = VARIABLE_HEADER + b"\xc2\x00\x3c" + payload
    assert packet == b"\x10" + bytes((len(body),)) + body


def test_connect_packet_with_username_only() -> None:
    body = VARIABLE_HEADER + b"\x82\x00\x1e" + b"\x00\x03cid" + b"\x00\x01u"
    assert proto.connect_packet("cid", 30, "u") == b"\x10" + bytes((len(body),)) + body


def test_connect_packet_never_sends_a_password_without_a_username() -> None:
    # 3.1.2.9: the password flag must be 0 when the user name flag is 0.
    assert proto.connect_packet("cid", 30, None, "secret") == proto.connect_packet("cid", 30)


def test_connect_packet_with_a_long_client_id_uses_a_two_byte_length() -> None:
    client_id = "c" * 200
    packet = proto.connect_packet(client_id, 30)
    assert packet[:3] == b"\x10\xd4\x01"  # 10 + 2 + 200 = 212 = 0xd4 0x01
    assert packet.endswith(b"\x00\xc8" + client_id.encode())


def test_utf8_field_refuses_more_than_65535_bytes() -> None:
    assert proto.utf8_field("x" * 0xFFFF)[:2] == b"\xff\xff"
    with pytest.raises(ValueError, match="65535"):
        proto.utf8_field("x" * 0x10000)


def test_connect_packet_without_clean_session_clears_the_flag() -> None:
    body = VARIABLE_HEADER + b"\x00\x00\x1e" + b"\x00\x03cid"
    assert proto.connect_packet("cid", 30, clean_session=False) == b"\x10\x0f" + body
    body = VARIABLE_HEADER + b"\xc0\x00\x1e" + b"\x00\x03cid\x00\x01u\x00\x01p"
    packet = proto.connect_packet("cid", 30, "u", "p", clean_session=False)
    assert packet == b"\x10" + bytes((len(body),)) + body


def test_check_connack_accepts_an_accepted_connection() -> None:
    assert proto.check_connack(b"\x20\x02\x00\x00") is False
    assert proto.check_connack(b"\x20\x02\x00\x00", clean_session=False) is False


def test_check_connack_reads_the_session_present_flag() -> None:
    assert proto.check_connack(b"\x20\x02\x01\x00", clean_session=False) is True


def test_check_connack_rejects_a_session_after_a_clean_session_connect() -> None:
    # 3.2.2.2: with CleanSession 1 the server must set session present to 0
    with pytest.raises(proto.ProtocolError, match="session present after a clean-session"):
        proto.check_connack(b"\x20\x02\x01\x00")


@pytest.mark.parametrize("flags", [0x02, 0x80, 0xFF])
def test_check_connack_rejects_reserved_flag_bits(flags: int) -> None:
    with pytest.raises(proto.ProtocolError, match="reserved flag bits"):
        proto.check_connack(bytes((0x20, 2, flags, 0)), clean_session=False)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (1, "unacceptable protocol version"),
        (2, "client identifier rejected"),
        (3, "server unavailable"),
        (4, "bad user name or password"),
        (5, "not authorized"),
        (99, "99"),
    ],
)
def test_check_connack_names_the_refusal(code: int, reason: str) -> None:
    with pytest.raises(proto.ProtocolError, match=f"broker refused the connection: {reason}$"):
        proto.check_connack(bytes((0x20, 2, 0, code)))


@pytest.mark.parametrize("packet", [b"\x30\x02\x00\x00", b"\x20\x03\x00\x00", b"\x20\x02\x00", b""])
def test_check_connack_rejects_anything_else(packet: bytes) -> None:
    with pytest.raises(proto.ProtocolError, match="expected CONNACK"):
        proto.check_connack(packet)


# -- PUBLISH ---------------------------------------------------------------------------------


def test_publish_qos0_has_no_packet_id() -> None:
    header = proto.TopicHeader("a/b", 0)
    assert header.packet(7, b"xy") == b"\x30\x07\x00\x03a/bxy"
    assert header.packet(7, b"xy", dup=True) == b"\x38\x07\x00\x03a/bxy"


@pytest.mark.parametrize(("qos", "first"), [(1, 0x32), (2, 0x34)])
def test_publish_qos1_and_qos2_carry_the_packet_id(qos: int, first: int) -> None:
    header = proto.TopicHeader("a/b", qos)
    rest = b"\x00\x03a/b\x12\x34xy"  # topic, packet id, payload
    assert header.packet(0x1234, b"xy") == bytes((first, 9)) + rest
    assert header.packet(0x1234, b"xy", dup=True) == bytes((first | 0x08, 9)) + rest


def test_publish_with_a_large_payload_uses_a_multi_byte_length() -> None:
    payload = bytes(range(256)) * 80  # 20480 bytes
    packet = proto.TopicHeader("t/ü", 1).packet(65535, payload)
    topic = b"\x00\x04t/\xc3\xbc"
    length = len(topic) + 2 + len(payload)
    assert packet == b"\x32" + b"\x88\xa0\x01" + topic + b"\xff\xff" + payload
    assert decode_remaining_length(packet[1:]) == (length, 3)


def test_pubrel_carries_the_fixed_flags() -> None:
    assert proto.pubrel_packet(0xABCD) == b"\x62\x02\xab\xcd"


# -- scanning what the broker sends ----------------------------------------------------------

ACKS = (
    b"\x40\x02\x00\x01"  # PUBACK 1
    b"\x50\x02\x01\x02"  # PUBREC 258
    b"\x70\x02\xff\xff"  # PUBCOMP 65535
    b"\xd0\x00"  # PINGRESP
    b"\x40\x02\x00\x05"  # PUBACK 5
)
ACKS_FOUND = [(0x40, 1), (0x50, 258), (0x70, 65535), (0xD0, 0), (0x40, 5)]


def test_scan_packets_splits_concatenated_acknowledgements() -> None:
    buffer = bytearray(ACKS)
    assert proto.scan_packets(buffer) == (ACKS_FOUND, len(ACKS))


@pytest.mark.parametrize("cut", range(len(ACKS) + 1))
def test_scan_packets_keeps_a_partial_packet_for_the_next_read(cut: int) -> None:
    buffer = bytearray(ACKS[:cut])
    first = scan_all(buffer)
    assert ACKS_FOUND[: len(first)] == first
    assert ACKS.startswith(bytes(buffer), cut - len(buffer))  # only the unfinished tail is kept
    buffer += ACKS[cut:]
    assert first + scan_all(buffer) == ACKS_FOUND
    assert buffer == b""


@pytest.mark.parametrize(
    "packet",
    [
        b"\x30\xb1\x02\x00\x03a/b",  # PUBLISH (we subscribe to nothing), 305 bytes announced
        b"\x20\x02\x00\x00",  # a second CONNACK
        b"\x90\x03\x00\x01\x00",  # SUBACK
        b"\x62\x02\x00\x01",  # PUBREL: we never receive QoS 2 messages
        b"\x42\x02\x00\x01",  # PUBACK with reserved flag bits set
        b"\x00\x00",  # reserved packet type 0
        b"\xf0\x00",  # reserved packet type 15
    ],
)
def test_scan_packets_rejects_anything_a_publisher_never_receives(packet: bytes) -> None:
    for data in (packet, b"\x40\x02\x00\x09" + packet):
        with pytest.raises(proto.ProtocolError, match="unexpected packet"):
            proto.scan_packets(bytearray(data))


@pytest.mark.parametrize(
    "packet",
    [
        b"\x40\x03\x00\x01\x00",  # PUBACK one byte too long (an MQTT 5 reason code)
        b"\x50\x01\x00",  # PUBREC one byte short
        b"\x70\x00",  # PUBCOMP without a packet id
        b"\xd0\x02\x00\x00",  # PINGRESP with a body
        b"\x40\x82\x00\x00\x01",  # PUBACK with a two-byte remaining length
    ],
)
def test_scan_packets_rejects_acknowledgements_of_the_wrong_length(packet: bytes) -> None:
    with pytest.raises(proto.ProtocolError, match="malformed packet"):
        proto.scan_packets(bytearray(packet))


def test_scan_packets_rejects_a_huge_packet_from_its_header_alone() -> None:
    """A broker announcing 256 MB is refused at once, not buffered until it arrives."""
    header = b"\x40" + proto.remaining_length(268_435_455)
    with pytest.raises(proto.ProtocolError, match="malformed packet"):
        proto.scan_packets(bytearray(header))
    with pytest.raises(proto.ProtocolError):
        proto.scan_packets(bytearray(b"\x30\xff"))  # after two bytes, whatever follows


def test_scan_packets_on_an_empty_or_one_byte_buffer() -> None:
    assert proto.scan_packets(bytearray()) == ([], 0)
    assert proto.scan_packets(bytearray(b"\x40")) == ([], 0)


def test_scan_packets_rejects_a_remaining_length_of_more_than_four_bytes() -> None:
    with pytest.raises(proto.ProtocolError, match="malformed packet"):
        proto.scan_packets(bytearray(b"\x40\xff\xff\xff\xff\x01"))


@given(
    st.lists(st.integers(min_value=1, max_value=0xFFFF), max_size=60),
    st.lists(st.integers(min_value=0, max_value=240), max_size=20),
)
def test_pubacks_chopped_anywhere_are_recovered_exactly(ids: list[int], cuts: list[int]) -> None:
    data = b"".join(puback(i) for i in ids)
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    buffer = bytearray()
    found = []
    for start, end in itertools.pairwise(points):
        buffer += data[start:end]
        found += scan_all(buffer)
        assert len(buffer) < 4
    assert found == [(0x40, i) for i in ids]
    assert buffer == b""


@pytest.mark.parametrize("size", [0, 1, 120, 121, 122, 16375, 16376, 16377, 20000, 2_097_200])
def test_packets_built_into_one_buffer_carry_exact_lengths(size: int) -> None:
    """`append_packet` writes the remaining length inline for 1 and 2 bytes (the common
    sizes) and through `remaining_length` beyond; every boundary decodes back exactly."""
    header = proto.TopicHeader("a/b", 1)  # topic field 5 bytes + packet id 2
    payload = b"p" * size
    out = bytearray(b"before")
    header.append_packet(out, 0x0102, payload)
    header.append_packet(out, 0x0304, b"q", dup=True)
    packet = bytes(out[len(b"before") :])
    length, used = decode_remaining_length(packet[1:])
    assert packet[0] == 0x32 and length == 7 + size
    end = 1 + used + length
    assert packet[1 + used : end] == b"\x00\x03a/b\x01\x02" + payload
    assert packet[end:] == b"\x3a\x08\x00\x03a/b\x03\x04q"
