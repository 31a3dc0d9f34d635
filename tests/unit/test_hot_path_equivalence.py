"""The optimized hot path against a plain reference written from SPEC 1 and 3.

`workers/parse.py`, `enrich.py`, `encode.py` and `pipeline.py` are tuned for speed (byte-level
checks, caches of escaped groups, prebuilt JSON prefixes, an inlined batch loop). This file
keeps a straightforward implementation of the same rules, with no caches and no shortcuts,
and checks that both give byte-identical batches, events and encodings: on the realistic
corpus and on generated near-valid datagrams full of control characters, line breaks,
characters that need escaping and broken UTF-8. A future optimization must keep it green.

Rules beyond the SPEC text that the reference follows (set by earlier issues and tests):
line breaks are kept in the message and removed from every other field; format B also
accepts `Open connection` / `Close connection`; the user of format B is the first quoted
`'DIR\\user'`; line protocol drops line breaks, trailing backslashes and backslashes before
a space from tags, and line breaks from string fields; `appId_field` is the GUID as it is.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
import ua_parser
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from senseflow.commands.corpus import USER_AGENTS, make_corpus
from senseflow.commands.corpus import app_names as corpus_app_names
from shared.config import Config, config_from_document
from shared.events import ACTIONS, EncodedBatch, RawBatch, UserEvent
from workers.eventcount import UNKNOWN_KEY
from workers.pipeline import EventPipeline

# -- the reference: parse ---------------------------------------------------------------------

CONTROL = [chr(c) for c in [*range(0x20), 0x7F] if chr(c) not in "\n\r"]
BUTLER_SOURCES = ("qseow-proxy-session", "qseow-proxy-connection")
SHORT_SOURCE = "proxy-user-event"
SHORT_PREFIXES = [
    ("Start session", "Start session"),
    ("Stop session", "Stop session"),
    ("Opening connection", "Open connection"),
    ("Closing connection", "Close connection"),
    ("Open connection", "Open connection"),
    ("Close connection", "Close connection"),
]
SHORT_USER = re.compile(r"'([^'\\]*)\\([^']*)'")
GUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")


def remove(text: str, characters: list[str] | str) -> str:
    for character in characters:
        text = text.replace(character, "")
    return text


def reference_parse(data: bytes, received_ns: int) -> UserEvent | str:
    text = remove(data.decode("utf-8", "replace"), CONTROL)
    source = text.split(";")[0].strip().strip("/").lower()
    if source in BUTLER_SOURCES:
        fields = text.split(";", 7)
        if len(fields) < 8:
            return "too_few_fields"
        host, command, directory, user_id, origin, context = (
            remove(f, "\n\r") for f in fields[1:7]
        )
        message = fields[7]
        command = command[:100]
        if command not in ACTIONS:
            return "unknown_action" if command.strip() else "missing_action"
    elif source == SHORT_SOURCE:
        fields = text.split(";", 4)
        if len(fields) < 5:
            return "too_few_fields"
        host, origin, context = (remove(f, "\n\r") for f in fields[1:4])
        message = fields[4]
        flat = remove(message, "\n\r")
        actions = [a for prefix, a in SHORT_PREFIXES if flat.lstrip().startswith(prefix)]
        if not actions:
            return "unknown_action"
        command = actions[0]
        user = SHORT_USER.search(flat)
        directory, user_id = user.groups() if user else ("", "")
    else:
        return "unknown_source"
    host, directory, user_id = host[:100], directory[:100], user_id[:100]
    for value, reason in (
        (host, "missing_host"),
        (directory, "missing_user_directory"),
        (user_id, "missing_user_id"),
    ):
        if not value.strip():
            return reason
    return UserEvent(
        message_type=source,
        host=host,
        command=command,
        user_directory=directory,
        user_id=user_id,
        origin=origin[:200],
        context=context[:500],
        message=message[:1000],
        received_ns=received_ns,
    )


# -- the reference: enrich --------------------------------------------------------------------


@functools.cache
def reference_agent(agent: str) -> tuple[str, str, str, str]:
    """ua-parser's own default parser (not the project's wiring); 'Other' means unknown."""
    browser, os_ = ua_parser.parse_user_agent(agent), ua_parser.parse_os(agent)
    name = major = os_name = os_version = ""
    if browser is not None and browser.family != "Other":
        name, major = browser.family, browser.major or ""
    if os_ is not None and os_.family != "Other":
        os_name = os_.family
        os_version = ".".join(p for p in (os_.major, os_.minor, os_.patch) if p)
    return name, major, os_name, os_version


def reference_enrich(event: UserEvent, app_names: dict[str, str]) -> None:
    if event.context.startswith("/app/"):
        segment = re.split(r"[?/]", event.context[len("/app/") :], maxsplit=1)[0]
        if GUID.fullmatch(segment):
            event.app_id = segment
            event.app_name = app_names.get(segment.lower(), "")
    if "UserAgent:" in event.message:
        agent = event.message.split("UserAgent:", 1)[1].strip().replace("'", "").strip()
        if agent:
            (
                event.ua_browser_name,
                event.ua_browser_major,
                event.ua_os_name,
                event.ua_os_version,
            ) = reference_agent(agent)


# -- the reference: encode --------------------------------------------------------------------


def reference_tag(value: str) -> str:
    value = remove(value, "\n\r").rstrip("\\")
    value = re.sub(r"\\+ ", " ", value)
    return value.replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def reference_field(value: str) -> str:
    return remove(value, "\n\r").replace("\\", "\\\\").replace('"', '\\"')


def user_full(event: UserEvent) -> str:
    return event.user_directory + "\\" + event.user_id


def reference_line(event: UserEvent, tags: list[tuple[str, str]]) -> str:
    own = [
        ("host", event.host),
        ("event_action", event.command),
        ("userFull", user_full(event)),
        ("userDirectory", event.user_directory),
        ("userId", event.user_id),
        ("origin", event.origin),
    ]
    if event.app_id:
        own += [("appId", event.app_id), ("appName", event.app_name)]
    if event.ua_browser_name or event.ua_os_name:
        own += [
            ("qs_uaBrowserName", event.ua_browser_name),
            ("qs_uaBrowserMajorVersion", event.ua_browser_major),
            ("qs_uaOsName", event.ua_os_name),
            ("qs_uaOsVersion", event.ua_os_version),
        ]
    pairs = [(k, reference_tag(v)) for k, v in own]
    pairs += [(reference_tag(k), reference_tag(v)) for k, v in tags]
    tag_text = "".join(f",{k}={v}" for k, v in pairs if k and v)
    fields = [
        f'userFull_field="{reference_field(user_full(event))}"',
        f'userId_field="{reference_field(event.user_id)}"',
    ]
    if event.app_id:
        fields.append(f'appId_field="{event.app_id}"')
        if event.app_name:
            fields.append(f'appName_field="{reference_field(event.app_name)}"')
    return f"user_events{tag_text} {','.join(fields)} {event.received_ns}\n"


def reference_iso(ns: int) -> str:
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1000)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def optional_attributes(event: UserEvent, names: tuple[str, ...]) -> dict[str, str]:
    values = (
        event.app_id,
        event.app_name,
        event.ua_browser_name,
        event.ua_browser_major,
        event.ua_os_name,
        event.ua_os_version,
    )
    return {name: value for name, value in zip(names, values, strict=True) if value}


def reference_mqtt(event: UserEvent, tags: list[tuple[str, str]]) -> bytes:
    payload: dict[str, Any] = {
        "messageType": event.message_type,
        "host": event.host,
        "command": event.command,
        "userDir": event.user_directory,
        "userId": event.user_id,
        "origin": event.origin,
        "context": event.context,
        "message": event.message,
        "tags": dict(tags),
    }
    names = ("appId", "appName", "uaBrowserName", "uaBrowserMajorVersion", "uaOsName")
    payload.update(optional_attributes(event, (*names, "uaOsVersion")))
    payload["timestamp"] = reference_iso(event.received_ns)
    return msgspec.json.encode(payload)


def reference_scramble(value: str) -> str:
    return hashlib.shake_256(value.encode()).hexdigest(8)


def reference_newrelic(
    event: UserEvent, tags: list[tuple[str, str]], static: list[tuple[str, str]], scramble: bool
) -> bytes:
    users = [user_full(event), event.user_directory, event.user_id]
    if scramble:
        users = [reference_scramble(u) for u in users]
    attributes: dict[str, Any] = {}  # a later value replaces an earlier one in its place
    attributes.update(static)
    attributes.update(tags)
    attributes.update(
        eventType="qs_userEvent",
        qs_host=event.host,
        qs_event_action=event.command,
        qs_userFull=users[0],
        qs_userDirectory=users[1],
        qs_userId=users[2],
        qs_origin=event.origin,
        timestamp=event.received_ns // 1_000_000,
    )
    names = ("qs_appId", "qs_appName", "qs_uaBrowserName", "qs_uaBrowserMajorVersion")
    attributes.update(optional_attributes(event, (*names, "qs_uaOsName", "qs_uaOsVersion")))
    return msgspec.json.encode(attributes)


# -- the reference: a whole batch -------------------------------------------------------------


def reference_session(event: UserEvent) -> list[Any]:
    return [
        event.received_ns,
        ACTIONS.index(event.command),
        event.host,
        event.user_directory,
        event.user_id,
        event.app_id,
        event.app_name,
        event.ua_browser_name,
        event.ua_browser_major,
        event.ua_os_name,
        event.ua_os_version,
    ]


class Reference:
    """The reference pipeline for one configuration document."""

    def __init__(self, document: dict[str, Any], app_names: dict[str, str]) -> None:
        butler = document["Butler-SOS"]
        user_events = butler["userEvents"]
        self.tags = [(t["name"], t["value"]) for t in user_events.get("tags", [])]
        attributes = butler.get("newRelic", {}).get("event", {}).get("attribute", {})
        self.static = [(a["name"], a["value"]) for a in attributes.get("static", [])]
        self.scramble = user_events["sendToNewRelic"]["scramble"]
        excluded = user_events.get("excludeUser", [])
        self.excluded = {(u["directory"].casefold(), u["userId"].casefold()) for u in excluded}
        self.app_names = app_names
        self.counts_events = "qlikSenseEvents" in butler

    def event(self, data: bytes, received_ns: int) -> UserEvent | str:
        event = reference_parse(data, received_ns)
        if isinstance(event, str):
            return event
        if (event.user_directory.casefold(), event.user_id.casefold()) in self.excluded:
            return "excluded"
        reference_enrich(event, self.app_names)
        return event

    def batch(self, raw: RawBatch) -> EncodedBatch:
        out = EncodedBatch(b"", [], b"", [], [], {})
        lines = []
        sessions = []  # SPEC 3a: what the writer's session state needs, per event
        for data, received_ns in zip(raw.datagrams, raw.received_ns, strict=True):
            event = self.event(data, received_ns)
            if isinstance(event, str):
                key = event if event == "excluded" else f"invalid.{event}"
                out.counters[key] = out.counters.get(key, 0) + 1
                continue
            out.received_ns.append(received_ns)
            lines.append(reference_line(event, self.tags))
            out.mqtt_payloads.append(reference_mqtt(event, self.tags))
            out.actions += bytes([ACTIONS.index(event.command)])
            out.newrelic.append(reference_newrelic(event, self.tags, self.static, self.scramble))
            sessions.append(reference_session(event))
        out.counters["events"] = len(out.received_ns)
        out.lines = "".join(lines).encode()
        out.sessions = msgspec.msgpack.encode(sessions) if sessions else b""
        return out

    def event_counts(self, raw: RawBatch) -> dict[tuple[str, str, str], int]:
        """Butler SOS's per (source, host, subsystem) counts, all datagrams, before exclusion."""
        counts: dict[tuple[str, str, str], int] = {}
        for data in raw.datagrams:
            event = reference_parse(data, 1)
            key = UNKNOWN_KEY
            if isinstance(event, UserEvent):
                key = (event.message_type, event.host, event.origin)
            counts[key] = counts.get(key, 0) + 1
        return counts


# -- configurations ---------------------------------------------------------------------------

APP_ID = "3fa85f64-5717-4562-b3fc-2c963f66afa6"
OTHER_APP_ID = "0B1C2D3E-4F50-6172-8394-A5B6C7D8E9F0"
APP_NAMES = {
    **corpus_app_names(),
    APP_ID: 'Sales, "Q1" = best\\',
    OTHER_APP_ID.lower(): "Ops \\ overview\\ \\\n\r",  # line breaks: only a mapping has them
}


def document(
    tags: list[dict[str, str]],
    scramble: bool,
    static: list[dict[str, str]] | None = None,
    exclude: list[dict[str, str]] | None = None,
    counts: bool = False,
    ua_cache_size: int = 4096,
) -> dict[str, Any]:
    """Every destination on, as in the micro-benchmark, plus the given options."""
    user_events: dict[str, Any] = {
        "enable": True,
        "tags": tags,
        "sendToMQTT": {"enable": True},
        "sendToInfluxdb": {"enable": True},
        "sendToNewRelic": {"enable": True, "destinationAccount": ["A"], "scramble": scramble},
    }
    if exclude is not None:
        user_events["excludeUser"] = exclude
    butler: dict[str, Any] = {
        "userEvents": user_events,
        "influxdbConfig": {"enable": True, "version": 2},
        "mqttConfig": {"enable": True},
        "newRelic": {"enable": True, "event": {"attribute": {"static": static or []}}},
        "thirdPartyToolsCredentials": {
            "newRelic": [{"accountName": "A", "insertApiKey": "k", "accountId": "1"}]
        },
    }
    if counts:
        butler["qlikSenseEvents"] = {"influxdb": {"enable": True}, "eventCount": {"enable": True}}
    return {"Butler-SOS": butler, "senseflow": {"uaCacheSize": ua_cache_size}}


DOCUMENTS = {
    # The micro-benchmark's configuration.
    "benchmark": document(
        [{"name": "env", "value": "PROD"}, {"name": "site", "value": "eu west"}], True
    ),
    # No tags; static New Relic attributes; exclusion; event counts; a one-entry UA cache.
    "excluding": document(
        [],
        False,
        static=[{"name": "team", "value": 'B"I'}, {"name": "region", "value": "eu\\"}],
        exclude=[
            {"directory": "lab", "userId": "SA_REPOSITORY"},  # in the corpus
            {"directory": "lab", "userId": "TESTUSER1"},
            {"directory": "ÅÄÖ", "userId": "x"},
        ],
        counts=True,
        ua_cache_size=1,
    ),
    # Tags that need escaping or are dropped; names shared by tags, static attributes and
    # the event's own New Relic attributes (a later value wins, in the place of the first).
    "colliding": document(
        [
            {"name": "env", "value": "a b=c,d\\"},
            {"name": "qs_host", "value": "from-tags"},
            {"name": "empty", "value": ""},
            {"name": "timestamp", "value": "t"},
        ],
        True,
        static=[{"name": "env", "value": "static"}, {"name": "qs_appId", "value": "static-app"}],
    ),
}


@functools.cache
def optimized(name: str) -> EventPipeline:
    """One per configuration for the whole module, so that its caches are warm and shared."""
    config: Config = config_from_document(DOCUMENTS[name], {})
    return EventPipeline(config, APP_NAMES)


@functools.cache
def reference(name: str) -> Reference:
    return Reference(DOCUMENTS[name], APP_NAMES)


def check_batch(name: str, raw: RawBatch) -> None:
    flow, expected = optimized(name), reference(name)
    got = flow.process_batch(raw)
    want = expected.batch(raw)
    assert got.lines.decode().splitlines() == want.lines.decode().splitlines()
    assert got.mqtt_payloads == want.mqtt_payloads
    assert got.newrelic == want.newrelic
    assert msgspec.msgpack.encode(got) == msgspec.msgpack.encode(want)  # counter order too
    if expected.counts_events:
        assert flow.event_counts is not None
        assert flow.event_counts.batch == expected.event_counts(raw)


def check_each(name: str, raw: RawBatch) -> None:
    """`event_or_reason` and each encoder on its own, datagram by datagram."""
    flow, expected = optimized(name), reference(name)
    for data, received_ns in zip(raw.datagrams, raw.received_ns, strict=True):
        got = flow.event_or_reason(data, received_ns)
        want = expected.event(data, received_ns)
        assert got == want, data
        if isinstance(got, UserEvent):
            assert flow.encoder.line(got) == reference_line(got, expected.tags)
            assert flow.encoder.mqtt(got) == reference_mqtt(got, expected.tags)
            nr = reference_newrelic(got, expected.tags, expected.static, expected.scramble)
            assert flow.encoder.newrelic(got) == nr


def batches_of(datagrams: list[bytes], start_ns: int, steps: list[int]) -> Iterator[RawBatch]:
    stamps, ns = [], start_ns
    for i in range(len(datagrams)):
        ns += steps[i % len(steps)]
        stamps.append(ns)
    for i in range(0, len(datagrams), 500):
        yield RawBatch(datagrams[i : i + 500], stamps[i : i + 500])


# -- the corpus -------------------------------------------------------------------------------


@functools.cache
def corpus_batches() -> list[RawBatch]:
    # Steps of 20 µs to 1.7 ms: several events share a millisecond, then one crosses a second.
    datagrams = make_corpus(5000, invalid_share=0.1)
    return list(batches_of(datagrams, 1_700_000_000_999_000_000, [20_000, 700_000, 1_700_000]))


@pytest.mark.parametrize("name", DOCUMENTS)
def test_corpus_batches_match_reference(name: str) -> None:
    for raw in corpus_batches():
        check_batch(name, raw)
    counters = reference(name).batch(corpus_batches()[0]).counters
    assert any(key.startswith("invalid.") for key in counters)  # the corpus has invalid ones


@pytest.mark.parametrize("name", DOCUMENTS)
def test_corpus_events_match_reference(name: str) -> None:
    for raw in corpus_batches()[:2]:
        check_each(name, raw)


def test_app_names_swapped_at_run_time() -> None:
    """Enrichment caches must not keep an app name the mapping no longer has."""
    flow = EventPipeline(Config(), {APP_ID: "Old name"})
    data = f"/qseow-proxy-session/;h;Start session;D;u;o;/app/{APP_ID};m".encode()
    first = flow.event_or_reason(data, 1)
    flow.set_app_names({APP_ID: "New name"})
    second = flow.event_or_reason(data, 2)
    assert isinstance(first, UserEvent) and isinstance(second, UserEvent)
    assert (first.app_name, second.app_name) == ("Old name", "New name")


# -- generated near-valid datagrams -----------------------------------------------------------

TRICKY = [
    ",", "=", " ", '"', "\\", "'", "\\ ", " \\", "\\\\", ";", "/", "?", "é", "ÅÄÖ", "\u0085",
    "\u00a0", "\u2028", "✓", "😀", "\ufffd", "\ud800", "\n", "\r", "\r\n", "\t", "\x00",
    "\x1b", "\x1f", "\x7f", "UserAgent:", "Start session", "'LAB\\u'",
]  # fmt: skip
BAD_UTF8 = [b"\xff", b"\x80", b"\xc3", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf0\x9f\x98"]

piece = st.one_of(
    st.sampled_from(TRICKY),
    st.text(max_size=6),
    st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=6),
)
noise = st.lists(
    st.one_of(
        piece.map(lambda text: text.encode("utf-8", "surrogatepass")), st.sampled_from(BAD_UTF8)
    ),
    max_size=4,
).map(b"".join)


def around(values: list[str]) -> st.SearchStrategy[bytes]:
    """One of `values`, often as it is, else with noise before, inside or after it."""
    value = st.sampled_from(values).map(lambda text: text.encode("utf-8", "surrogatepass"))
    return st.one_of(
        value,
        value,
        st.tuples(noise, value, noise).map(b"".join),
        st.tuples(value, st.integers(0, 40), noise).map(
            lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
        ),
        noise,
    )


SOURCES = around(
    [
        "/qseow-proxy-session/",
        "/qseow-proxy-connection/",
        "/QSEOW-Proxy-Session",
        " qseow-proxy-connection/ ",
    ]
)
SHORT_SOURCES = around(["/proxy-user-event/", "/PROXY-USER-EVENT/", "proxy-user-event "])
HOSTS = around(["sense1", "sense1.lab.example.com", "a,b=c d", "h\\", " ", ""])
COMMANDS = around([*ACTIONS, " Start session", "start session", "Start session ", "", "Bogus"])
USERS = around(["LAB", "testuser1", "TestUser1", "ÅÄÖ", "x", "a b\\", "\\ u", 'q"t', "", " "])
ORIGINS = around(["AppAccess", "Qlik.Sense.Proxy.User", "o,r=i g", ""])
CONTEXTS = around(
    [
        f"/app/{APP_ID}",
        f"/app/{APP_ID.upper()}",
        f"/app/{OTHER_APP_ID}?reloadUri=https://x/sense/app/{APP_ID}",
        f"/app/{APP_ID}/sheet/abc",
        f"/app/{APP_ID}x",
        f"/app/{APP_ID[:-1]}",
        f"/app/{APP_ID[:-1]}?",
        f" /app/{APP_ID}",
        "/app/",
        "/app/not-a-guid?x=1",
        "/hub/",
        "",
    ]
)
AGENTS = [
    *USER_AGENTS[:6],
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64)",  # an OS, no browser
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7)",
    "Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0",  # an OS without a version
    "curl/8.0 (Windows NT 6.1)",
    "",
    "''",
    "garbage",
    "'Mozilla/5.0 (A)'",
    "x' 'y",
    "Chrome/1\n",
]
VERBS = [prefix for prefix, _ in SHORT_PREFIXES] + ["  Opening connection", "Started", ""]


@st.composite
def messages(draw: st.DrawFn, short: bool) -> bytes:
    head = draw(around(VERBS)) + b" for user " if short else draw(around(["Start session", ""]))
    if short or draw(st.booleans()):
        directory, user_id = draw(USERS), draw(USERS)
        head += b"'" + directory + b"\\" + user_id + b"'"
    if draw(st.booleans()):
        head += b" UserAgent: " + draw(around(AGENTS))
    return head + draw(noise)


@st.composite
def datagrams(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        fields = [draw(SOURCES), draw(HOSTS), draw(COMMANDS), draw(USERS), draw(USERS)]
        fields += [draw(ORIGINS), draw(CONTEXTS), draw(messages(short=False))]
    else:
        fields = [draw(SHORT_SOURCES), draw(HOSTS), draw(ORIGINS), draw(CONTEXTS)]
        fields.append(draw(messages(short=True)))
    keep = draw(st.one_of(st.just(len(fields)), st.integers(1, len(fields))))
    return b";".join(fields[:keep])


STEPS = st.lists(st.integers(1, 3_000_000), min_size=1, max_size=5)
START_NS = st.integers(0, 4_102_444_800 * 10**9)  # up to the year 2100


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(datagrams(), min_size=1, max_size=12), START_NS, STEPS)
@example(
    [
        b"/qseow-proxy-session/;se\r\nn\x00se1;Start\x01 session;L\nAB;test\x7fuser1;"
        b"App\rAccess;/app/" + APP_ID.encode() + b"\n?x;hello\r\n\x1f world UserAgent: 'x'",
        b"/proxy-user-event/;h\xff;s\xc3\x28;c;\r\nOpening\x00 connection for user 'L\\\\u\n1'",
        b"/qseow-proxy-connection/;h;Close connection;D\\;u\\ ;o;c\xe2\x82;m\xed\xa0\x80",
    ],
    1_700_000_000_999_999_999,
    [1],
)
def test_generated_batches_match_reference(
    datagrams: list[bytes], start_ns: int, steps: list[int]
) -> None:
    for name in DOCUMENTS:
        for raw in batches_of(datagrams, start_ns, steps):
            check_batch(name, raw)
            check_each(name, raw)
