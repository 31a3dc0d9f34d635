"""Hostile input (SPEC 5, issue 5): parse + enrich + every encoder on anything at all.

Three kinds of input: arbitrary bytes; near-valid datagrams (both wire formats, every
field drawn from text rich in separators, escapes, line breaks, control characters and
invalid UTF-8); huge fields up to the largest UDP datagram. Whatever comes in, nothing
raises, every datagram is counted once (an event or an invalid reason), each event is
exactly one line of line protocol that InfluxDB's own tokenizer reads as one point, and
the MQTT and New Relic payloads are valid JSON objects.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shared.config import Config, config_from_document
from shared.events import RawBatch, UserEvent
from tests.unit.test_line_protocol import parse_line, scan_lines
from workers.parse import INVALID_REASONS, parse_datagram
from workers.pipeline import EventPipeline

MAX_UDP = 65_507
NS = 1_700_000_000_000_000_000
APP_ID = "3fa85f64-5717-4562-b3fc-2c963f66afa6"
AGENT = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/119.0.0.0 Safari/537.36"
SOURCES = ["/qseow-proxy-session/", "/qseow-proxy-connection/", "/proxy-user-event/"]
COMMANDS = ["Start session", "Stop session", "Open connection", "Close connection"]
SHORT_VERBS = [*COMMANDS, "Opening connection", "Closing connection"]


def all_destinations_config() -> Config:
    """InfluxDB, MQTT and New Relic on, tags and static attributes set, one user excluded."""
    document = {
        "Butler-SOS": {
            "userEvents": {
                "excludeUser": [{"directory": "LAB", "userId": "excluded"}],
                "tags": [{"name": "env", "value": 'fuzz, "x"=1'}],
                "sendToInfluxdb": {"enable": True},
                "sendToMQTT": {"enable": True},
                "sendToNewRelic": {"enable": True, "destinationAccount": ["a"]},
            },
            "influxdbConfig": {"enable": True},
            "mqttConfig": {"enable": True},
            "newRelic": {
                "enable": True,
                "event": {"attribute": {"static": [{"name": "service", "value": "sense"}]}},
            },
            "thirdPartyToolsCredentials": {
                "newRelic": [{"accountName": "a", "insertApiKey": "k" * 40, "accountId": "1"}]
            },
        }
    }
    return config_from_document(document, {})


@functools.cache
def full_pipeline() -> EventPipeline:
    """Built once: loading the user-agent rules takes a moment."""
    return EventPipeline(all_destinations_config(), {APP_ID: 'App; "name"\n'})


def check_batch(datagrams: list[bytes]) -> None:
    """The whole worker path on `datagrams`, and what must hold of its output."""
    raw = RawBatch(datagrams, list(range(NS, NS + len(datagrams))))
    batch = full_pipeline().process_batch(raw)
    counters = batch.counters
    invalid = sum(v for k, v in counters.items() if k.startswith("invalid."))
    assert counters["events"] + invalid + counters.get("excluded", 0) == len(datagrams)
    assert {k for k in counters if k.startswith("invalid.")} <= {
        f"invalid.{reason}" for reason in INVALID_REASONS
    }
    events = len(batch.received_ns)
    assert events == counters["events"]
    check_lines(batch.lines, batch.received_ns)
    assert len(batch.mqtt_payloads) == len(batch.actions) == len(batch.newrelic) == events
    assert all(action < len(COMMANDS) for action in batch.actions)
    for payload in batch.mqtt_payloads:
        assert isinstance(orjson.loads(payload), dict)
    for payload in batch.newrelic:
        assert isinstance(orjson.loads(payload), dict)


def check_lines(body: bytes, received_ns: list[int]) -> None:
    """One line per event, each one point of `user_events` with its own timestamp."""
    text = body.decode("utf-8")  # InfluxDB refuses a body that is not UTF-8
    assert text.count("\n") == len(received_ns)
    assert "\r" not in text
    lines = scan_lines(text)
    assert len(lines) == len(received_ns)
    for line, timestamp in zip(lines, received_ns, strict=True):
        point = parse_line(line)
        assert point.measurement == "user_events"
        assert point.timestamp == timestamp
        assert point.fields


def check_one(datagram: bytes) -> None:
    result = parse_datagram(datagram, NS)
    assert isinstance(result, UserEvent) or result in INVALID_REASONS
    check_batch([datagram])


# -- strategies ------------------------------------------------------------------------------

_SPECIALS = [
    ";",
    ",",
    "=",
    " ",
    '"',
    "'",
    "\\",
    "\\ ",
    "\\\\",
    "\n",
    "\r",
    "\r\n",
    "\t",
    "\x00",
    "\x7f",
    "\x1b",
    "\u2028",
    "\ufffd",
    "🚀",
    "用户",
    "UserAgent:",
    "/app/",
    APP_ID,
]
_INVALID_UTF8 = [b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"]


def field_text(max_chunks: int = 10) -> st.SearchStrategy[str]:
    chunks = st.one_of(st.sampled_from(_SPECIALS), st.text(max_size=6))
    return st.lists(chunks, max_size=max_chunks).map("".join)


def mostly(draw: st.DrawFn, usual: st.SearchStrategy[str], mangled: st.SearchStrategy[str]) -> str:
    """Nine times in ten the usual value, else a mangled one: most datagrams get far."""
    return draw(mangled if draw(st.integers(0, 9)) == 0 else usual)


@st.composite
def butler_datagram(draw: st.DrawFn) -> bytes:
    """Format A with a known or mangled source and command, any text in every field."""
    source = mostly(draw, st.sampled_from(SOURCES[:2]), field_text(3))
    command = mostly(draw, st.sampled_from(COMMANDS), field_text(3))
    fields = [source, draw(field_text()), command, *(draw(field_text()) for _ in range(5))]
    count = int(mostly(draw, st.just("8"), st.sampled_from("1234567")))
    return ";".join(fields[:count]).encode()


@st.composite
def short_datagram(draw: st.DrawFn) -> bytes:
    """Format B: the action opens the message, the user is quoted inside it."""
    verb = mostly(draw, st.sampled_from(SHORT_VERBS), field_text(2))
    user = f"'{draw(field_text(3))}\\{draw(field_text(3))}'"
    message = f"{verb} for user {user}{draw(field_text())}"
    fields = [SOURCES[2], draw(field_text()), draw(field_text()), draw(field_text()), message]
    count = int(mostly(draw, st.just("5"), st.sampled_from("1234")))
    return ";".join(fields[:count]).encode()


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """A datagram with bytes flipped, deleted or inserted (invalid UTF-8 included)."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 4))):
        position = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "delete", "insert"]))
        if kind == "flip" and position < len(data):
            data[position] ^= draw(st.integers(1, 255))
        elif kind == "delete":
            del data[position : position + draw(st.integers(1, 8))]
        else:
            data[position:position] = draw(st.sampled_from([*_INVALID_UTF8, b";", b"\n", b"\\"]))
    return bytes(data)


near_valid = st.one_of(
    butler_datagram(), short_datagram(), mutated(butler_datagram()), mutated(short_datagram())
)


@st.composite
def huge_datagram(draw: st.DrawFn) -> bytes:
    """A valid datagram with one field blown up, up to the largest UDP payload."""
    filler = draw(
        st.sampled_from(["x", ";", "\\", '"', " ", "\n", "é", "用", "\x00", "UserAgent:"])
    )
    user = "LAB\\someone"
    fields = [
        "/qseow-proxy-session/",
        "host",
        "Start session",
        "LAB",
        "someone",
        "AppAccess",
        f"/app/{APP_ID}",
        f"Start session for user '{user}' UserAgent: {AGENT}",
    ]
    index = draw(st.integers(1, len(fields) - 1))
    head = ";".join(fields).encode()
    room = MAX_UDP - len(head)
    size = draw(st.integers(room - 64, room)) // len(filler.encode())
    fields[index] = fields[index] + filler * size
    return ";".join(fields).encode()[:MAX_UDP]


# -- properties ------------------------------------------------------------------------------


@example(b"").via("an empty datagram")
@example(b";;;;;;;").via("only separators")
@example(b"/qseow-proxy-session/;\xff;Start session;\xc3;\xed\xa0\x80;;;").via("bad UTF-8")
@given(st.binary(max_size=2048))
@settings(max_examples=400, deadline=None)
def test_arbitrary_bytes(datagram: bytes) -> None:
    check_one(datagram)


@example(b"/qseow-proxy-session/;h;Start session;LAB;u\\;o;c;m").via("user ending in a backslash")
@example(b"/proxy-user-event/;h;s;c;Start session for user 'LAB\\ '").via("blank user id")
@given(near_valid)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_near_valid_datagrams(datagram: bytes) -> None:
    check_one(datagram)


@given(huge_datagram())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_huge_fields(datagram: bytes) -> None:
    assert len(datagram) <= MAX_UDP
    check_one(datagram)


@given(st.lists(st.one_of(st.binary(max_size=300), near_valid), min_size=1, max_size=40))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mixed_batches_count_every_datagram_once(datagrams: list[bytes]) -> None:
    check_batch(datagrams)


def test_atheris_coverage_guided_run() -> None:
    """A short coverage-guided run (libFuzzer via atheris) when atheris is installed:
    `python -m tests.unit.test_fuzz -runs=N` runs the same checks on what it generates."""
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris is not installed")
    result = subprocess.run(
        [sys.executable, "-m", "tests.unit.test_fuzz", "-runs=30000", "-max_len=4096", "-seed=1"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 30000 runs" in result.stderr, result.stderr[-3000:]


def fuzz_one_input(data: bytes) -> None:
    """atheris' entry: the input as one datagram, and split at NUL pairs as a batch."""
    check_one(data[:MAX_UDP])
    check_batch(data.split(b"\x00\x00"))


def instrument_our_code(atheris: Any) -> None:
    """Coverage for the parser, enrichment and encoders only (instrument_all takes ~50 s)."""
    import workers.encode
    import workers.enrich
    import workers.parse
    import workers.pipeline

    for module in (workers.parse, workers.enrich, workers.encode, workers.pipeline):
        for value in vars(module).values():
            members = vars(value).values() if inspect.isclass(value) else [value]
            for member in members:
                if inspect.isfunction(member) and member.__module__ == module.__name__:
                    atheris.instrument_func(member)


def run_atheris() -> None:
    import atheris  # type: ignore[import-untyped]

    full_pipeline()  # built before instrumenting: the user-agent rules are not ours to fuzz
    instrument_our_code(atheris)
    atheris.Setup(sys.argv, fuzz_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    run_atheris()
