"""SPEC 1: the two wire formats, cleaning, caps, app id, user agent, exclusion, tags."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.config import Config, config_from_document
from shared.events import ACTIONS, UserEvent
from workers.enrich import app_id_from_context, user_agent_from_message
from workers.parse import INVALID_REASONS, parse_datagram
from workers.pipeline import EventPipeline

CHROME_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/119.0.0.0 Safari/537.36"
)
SAFARI_MACOS = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.1 Safari/605.1.15"
)
APP_ID = "3fa85f64-5717-4562-b3fc-2c963f66afa6"
NS = 1_700_000_000_123_456_789


def butler(
    source: str = "/qseow-proxy-session/",
    host: str = "sense1.lab.example.com",
    command: str = "Start session",
    directory: str = "LAB",
    user_id: str = "testuser1",
    origin: str = "AppAccess",
    context: str = f"/app/{APP_ID}",
    message: str = f"Start session for user 'LAB\\testuser1' UserAgent: {CHROME_WINDOWS}",
) -> bytes:
    """A format A (Butler SOS appender) datagram."""
    fields = (source, host, command, directory, user_id, origin, context, message)
    return ";".join(fields).encode()


def short(
    host: str = "sense1.lab.example.com",
    subsystem: str = "Qlik.Sense.Proxy.User",
    context: str = f"/app/{APP_ID}",
    message: str = "Start session for user 'LAB\\testuser1'",
    source: str = "/proxy-user-event/",
) -> bytes:
    """A format B (user-events documentation appender) datagram."""
    return ";".join((source, host, subsystem, context, message)).encode()


MakeDatagram = Callable[..., bytes]


def parsed(data: bytes) -> UserEvent:
    event = parse_datagram(data, NS)
    assert isinstance(event, UserEvent), event
    return event


def pipeline(
    document: dict[str, Any] | None = None, app_names: dict[str, str] | None = None
) -> EventPipeline:
    config = config_from_document(document, {}) if document else Config()
    return EventPipeline(config, app_names)


@functools.cache
def default_pipeline() -> EventPipeline:
    """Built once: loading the user-agent rules takes a moment."""
    return pipeline()


def enriched(data: bytes) -> UserEvent:
    event = default_pipeline().event_or_reason(data, NS)
    assert isinstance(event, UserEvent), event
    return event


def ua_fields(event: UserEvent) -> tuple[str, str, str, str]:
    return (event.ua_browser_name, event.ua_browser_major, event.ua_os_name, event.ua_os_version)


# -- format A ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ACTIONS)
@pytest.mark.parametrize("source", ["/qseow-proxy-session/", "/qseow-proxy-connection/"])
def test_format_a_fields(source: str, command: str) -> None:
    event = parsed(butler(source=source, command=command))
    assert event.message_type == source.strip("/")
    assert event.host == "sense1.lab.example.com"
    assert event.command == command
    assert event.user_directory == "LAB"
    assert event.user_id == "testuser1"
    assert event.user_full == "LAB\\testuser1"
    assert event.origin == "AppAccess"
    assert event.context == f"/app/{APP_ID}"
    assert event.message.startswith("Start session for user")
    assert event.received_ns == NS


def test_format_a_message_keeps_semicolons_and_quotes() -> None:
    message = "Closing 'conn; id=7'; reason: \"timeout\"; UserAgent: 'x;y'"
    event = parsed(butler(message=message))
    assert event.message == message
    assert event.context == f"/app/{APP_ID}"


def test_format_a_too_few_fields() -> None:
    seven_fields = b"/qseow-proxy-session/;host;Start session;LAB;user;origin;context"
    assert parse_datagram(seven_fields, NS) == "too_few_fields"
    assert parse_datagram(b"/qseow-proxy-session/", NS) == "too_few_fields"
    assert parse_datagram(b"/qseow-proxy-connection/;host", NS) == "too_few_fields"


def test_format_a_empty_message_is_valid() -> None:
    event = parsed(butler(message=""))
    assert event.message == ""


@pytest.mark.parametrize(
    "source",
    [
        "/QSEOW-PROXY-SESSION/",
        "/Qseow-Proxy-Connection/",
        "qseow-proxy-session",
        "/qseow-proxy-session",
        "qseow-proxy-connection/",
    ],
)
def test_source_case_insensitive_and_slashes_stripped(source: str) -> None:
    event = parsed(butler(source=source))
    assert event.message_type == source.strip("/").lower()


@pytest.mark.parametrize(
    "source",
    ["/qseow-engine/", "/unknown-message-type/", "", "/qseow-proxy-sessions/", "proxy"],
)
def test_unknown_source(source: str) -> None:
    assert parse_datagram(butler(source=source), NS) == "unknown_source"


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        ("Restart session", "unknown_action"),
        ("start session", "unknown_action"),
        ("Opening connection", "unknown_action"),
        ("Delete app", "unknown_action"),
        ("", "missing_action"),
        ("   ", "missing_action"),
    ],
)
def test_format_a_unknown_action(command: str, reason: str) -> None:
    assert parse_datagram(butler(command=command), NS) == reason


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"host": ""}, "missing_host"),
        ({"host": "   "}, "missing_host"),
        ({"host": "\t\r\n"}, "missing_host"),
        ({"directory": ""}, "missing_user_directory"),
        ({"directory": "  "}, "missing_user_directory"),
        ({"user_id": ""}, "missing_user_id"),
        ({"user_id": " \x00 "}, "missing_user_id"),
    ],
)
def test_format_a_required_fields(fields: dict[str, str], reason: str) -> None:
    assert parse_datagram(butler(**fields), NS) == reason


# -- format B ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "command"),
    [
        ("Start session for user 'LAB\\testuser1'", "Start session"),
        ("Stop session for user 'LAB\\testuser1'", "Stop session"),
        ("Opening connection for user 'LAB\\testuser1'", "Open connection"),
        ("Closing connection for user 'LAB\\testuser1'", "Close connection"),
    ],
)
def test_format_b_actions(message: str, command: str) -> None:
    event = parsed(short(message=message))
    assert event.message_type == "proxy-user-event"
    assert event.command == command
    assert event.host == "sense1.lab.example.com"
    assert event.user_directory == "LAB"
    assert event.user_id == "testuser1"
    assert event.origin == "Qlik.Sense.Proxy.User"  # subsystem is stored as the origin
    assert event.context == f"/app/{APP_ID}"
    assert event.message == message


def test_format_b_message_keeps_semicolons() -> None:
    message = "Start session for user 'LAB\\testuser1'; id=1; note='a;b'"
    event = parsed(short(message=message))
    assert event.message == message
    assert (event.user_directory, event.user_id) == ("LAB", "testuser1")


@pytest.mark.parametrize("source", ["/PROXY-USER-EVENT/", "/Proxy-User-Event/", "proxy-user-event"])
def test_format_b_source_case_insensitive(source: str) -> None:
    assert parsed(short(source=source)).message_type == "proxy-user-event"


def test_format_b_too_few_fields() -> None:
    assert parse_datagram(b"/proxy-user-event/;host;subsystem;context", NS) == "too_few_fields"
    assert parse_datagram(b"/proxy-user-event/", NS) == "too_few_fields"


@pytest.mark.parametrize(
    "message",
    ["Reloading app 'Sales' for user 'LAB\\testuser1'", "", "session start for user 'LAB\\u'"],
)
def test_format_b_unknown_action(message: str) -> None:
    assert parse_datagram(short(message=message), NS) == "unknown_action"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"host": ""}, "missing_host"),
        ({"host": "  "}, "missing_host"),
        ({"message": "Start session for user"}, "missing_user_directory"),
        ({"message": "Start session for user 'testuser1'"}, "missing_user_directory"),
        ({"message": "Start session for user ' \\testuser1'"}, "missing_user_directory"),
        ({"message": "Start session for user 'LAB\\'"}, "missing_user_id"),
        ({"message": "Start session for user 'LAB\\   '"}, "missing_user_id"),
    ],
)
def test_format_b_required_fields(fields: dict[str, str], reason: str) -> None:
    assert parse_datagram(short(**fields), NS) == reason


# -- both formats: cleaning and caps -------------------------------------------------------


@pytest.mark.parametrize("make", [butler, short], ids=["format_a", "format_b"])
def test_control_characters_stripped_from_every_field(make: MakeDatagram) -> None:
    dirty = "".join(chr(c) for c in [*range(0x20), 0x7F])
    if make is butler:
        event = parsed(
            butler(
                host=f"sen{dirty}se1",
                command=f"Start{dirty} session",
                directory=f"L{dirty}AB",
                user_id=f"test{dirty}user1",
                origin=f"App{dirty}Access",
                context=f"/app/{dirty}{APP_ID}",
                message=f"hello{dirty} world",
            )
        )
        # Line breaks survive in the message alone (issue 3: "newlines in the message
        # arrive exactly as sent"); every other control character goes.
        assert event.message == "hello\n\r world"
        assert event.command == "Start session"
    else:
        event = parsed(
            short(
                host=f"sen{dirty}se1",
                subsystem=f"App{dirty}Access",
                context=f"/app/{dirty}{APP_ID}",
                message=f"Start{dirty} session for user 'L{dirty}AB\\test{dirty}user1'",
            )
        )
        assert event.message == "Start\n\r session for user 'L\n\rAB\\test\n\ruser1'"
        assert event.command == "Start session"
    assert event.host == "sense1"
    assert event.user_directory == "LAB"
    assert event.user_id == "testuser1"
    assert event.origin == "AppAccess"
    assert event.context == f"/app/{APP_ID}"
    for name, value in msgspec.structs.asdict(event).items():
        allowed = "\n\r" if name == "message" else ""
        if isinstance(value, str):
            assert not any(
                (ord(ch) < 0x20 or ord(ch) == 0x7F) and ch not in allowed for ch in value
            )


def test_c1_and_other_unicode_kept() -> None:
    event = parsed(butler(user_id="björn\u0085✓", directory="ÅÄÖ"))
    assert event.user_id == "björn\u0085✓"
    assert event.user_directory == "ÅÄÖ"


@pytest.mark.parametrize(
    ("data", "user_id"),
    [
        (b"/qseow-proxy-session/;sense\xff1;Start session;LAB;testuser1;o;c;m", "testuser1"),
        (
            b"/qseow-proxy-session/;sense\xff1;Start session;LAB;test\xc3\x28user;o;c;m",
            "test\ufffd(user",
        ),
        (
            b"/proxy-user-event/;sense\xff1;Proxy;ctx;Start session for user 'LAB\\test\xfe'",
            "test\ufffd",
        ),
    ],
)
def test_bad_utf8_becomes_replacement_character(data: bytes, user_id: str) -> None:
    event = parsed(data)
    assert event.host == "sense\ufffd1"
    assert event.user_id == user_id


def test_bad_utf8_never_raises() -> None:
    event = parsed(b"/qseow-proxy-session/;h\x80\x81;Start session;LAB;u\xed\xa0\x80;o;c;\xff")
    assert event.host.startswith("h\ufffd")
    assert event.message == "\ufffd"
    assert parse_datagram(b"\xff\xfe\xfd", NS) == "unknown_source"
    assert parse_datagram(b"/qseow\xff-proxy-session/;a;b;c;d;e;f;g", NS) == "unknown_source"


CAPS = [
    ("host", 100),
    ("directory", 100),
    ("user_id", 100),
    ("origin", 200),
    ("context", 500),
    ("message", 1000),
]


@pytest.mark.parametrize(("field", "cap"), CAPS)
def test_format_a_caps(field: str, cap: int) -> None:
    attribute = {"directory": "user_directory"}.get(field, field)
    at_cap = parsed(butler(**{field: "x" * cap}))
    assert getattr(at_cap, attribute) == "x" * cap
    over = parsed(butler(**{field: "é" * (cap + 1) + "TAIL" * 500}))
    assert getattr(over, attribute) == "é" * cap  # characters, not bytes


def test_format_a_command_cap() -> None:
    # A command is one of four short strings: anything longer than the cap cannot be one.
    assert parse_datagram(butler(command="Start session" + " " * 200), NS) == "unknown_action"
    assert parse_datagram(butler(command="x" * 101), NS) == "unknown_action"


def test_caps_apply_after_control_characters_are_stripped() -> None:
    event = parsed(butler(host="\x01" * 50 + "h" * 150))
    assert event.host == "h" * 100


def test_format_b_caps() -> None:
    event = parsed(
        short(
            host="h" * 150,
            subsystem="s" * 250,
            context="c" * 600,
            message=f"Start session for user '{'D' * 120}\\{'u' * 120}' " + "m" * 2000,
        )
    )
    assert event.host == "h" * 100
    assert event.origin == "s" * 200
    assert event.context == "c" * 500
    assert event.user_directory == "D" * 100
    assert event.user_id == "u" * 100
    assert len(event.message) == 1000


def test_receive_time_is_kept() -> None:
    assert parsed(butler()).received_ns == NS
    assert parsed(short()).received_ns == NS


# -- app id ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("context", "app_id"),
    [
        (f"/app/{APP_ID}", APP_ID),
        (f"/app/{APP_ID.upper()}", APP_ID.upper()),
        (f"/app/{APP_ID}?reloadUri=https://x/y", APP_ID),
        (f"/app/{APP_ID}/sheet/abc/state/analysis", APP_ID),
        (f"/app/{APP_ID}/", APP_ID),
        (f"/app/{APP_ID}?", APP_ID),
        ("/app/00000000-0000-0000-0000-000000000000", "00000000-0000-0000-0000-000000000000"),
        # invalid GUIDs
        ("/app/invalid-guid?param=value", ""),
        (f"/app/{APP_ID[:-1]}", ""),  # one digit short
        (f"/app/{APP_ID}0", ""),  # one digit too many
        ("/app/3fa85f64-5717-4562-b3fc-2c963f66afaz", ""),  # not hex
        ("/app/3fa85f6457174562b3fc2c963f66afa6", ""),  # no dashes
        ("/app/3fa85f64-57174562-b3fc-2c963f66afa6", ""),  # a dash missing
        ("/app/{3fa85f64-5717-4562-b3fc-2c963f66afa6}", ""),  # braces are not part of it
        (f"/app/ {APP_ID}", ""),
        ("/app/", ""),
        ("/app/?x=1", ""),
        # not an /app/ context
        ("/hub/", ""),
        ("/hub/my/work", ""),
        (f"/hub/stream/{APP_ID}", ""),
        (f"/sense/app/{APP_ID}", ""),
        (f"app/{APP_ID}", ""),
        (f"/APP/{APP_ID}", ""),
        (f"/qmc/apps/{APP_ID}", ""),
        ("", ""),
        ("Not available", ""),
    ],
)
def test_app_id(context: str, app_id: str) -> None:
    assert app_id_from_context(context) == app_id
    assert enriched(butler(context=context)).app_id == app_id
    assert enriched(short(context=context)).app_id == app_id


def test_app_name_from_lookup_and_omitted_when_unknown() -> None:
    names = {APP_ID: "Sales dashboard"}
    event = pipeline(app_names=names).event_or_reason(butler(), NS)
    assert isinstance(event, UserEvent)
    assert (event.app_id, event.app_name) == (APP_ID, "Sales dashboard")
    other = "11111111-2222-3333-4444-555555555555"
    event = pipeline(app_names=names).event_or_reason(butler(context=f"/app/{other}"), NS)
    assert isinstance(event, UserEvent)
    assert (event.app_id, event.app_name) == (other, "")
    event = pipeline(app_names=names).event_or_reason(butler(context="/hub/"), NS)
    assert isinstance(event, UserEvent)
    assert (event.app_id, event.app_name) == ("", "")


def test_app_name_lookup_is_case_insensitive_on_the_id() -> None:
    event = pipeline(app_names={APP_ID: "Sales"}).event_or_reason(
        butler(context=f"/app/{APP_ID.upper()}"), NS
    )
    assert isinstance(event, UserEvent)
    assert event.app_name == "Sales"


# -- user agent -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (f"UserAgent: {CHROME_WINDOWS}", ("Chrome", "119", "Windows", "10")),
        (f"Start session UserAgent: '{CHROME_WINDOWS}'", ("Chrome", "119", "Windows", "10")),
        (f"UserAgent:{CHROME_WINDOWS}   ", ("Chrome", "119", "Windows", "10")),
        (f"UserAgent: {SAFARI_MACOS}", ("Safari", "17", "Mac OS X", "10.15.7")),
        (f"a;b UserAgent: '{SAFARI_MACOS}'", ("Safari", "17", "Mac OS X", "10.15.7")),
    ],
)
def test_user_agent_parsed(message: str, expected: tuple[str, str, str, str]) -> None:
    for data in (
        butler(message=message),
        short(message=f"Start session for user 'L\\u' {message}"),
    ):
        assert ua_fields(enriched(data)) == expected


@pytest.mark.parametrize(
    "message",
    [
        "UserAgent: ''",
        "UserAgent: ",
        "UserAgent:",
        "UserAgent: '   '",
        "Start session for user 'LAB\\testuser1'",
        "UserAgent: not a browser at all",
        "useragent: " + CHROME_WINDOWS,  # the marker is case-sensitive, as in Butler SOS
        "",
    ],
)
def test_empty_or_unparseable_user_agent_adds_nothing(message: str) -> None:
    assert ua_fields(enriched(butler(message=message))) == ("", "", "", "")


def test_user_agent_text_after_first_marker_quotes_removed() -> None:
    assert user_agent_from_message("x UserAgent: 'Mozilla/5.0 (A)' UserAgent: B") == (
        "Mozilla/5.0 (A) UserAgent: B"
    )
    assert user_agent_from_message("UserAgent: ''") == ""
    assert user_agent_from_message("no agent") == ""


# -- exclusion ------------------------------------------------------------------------------


EXCLUDE = {
    "Butler-SOS": {
        "userEvents": {
            "excludeUser": [
                {"directory": "LAB", "userId": "testuser1"},
                {"directory": "INTERNAL", "userId": "sa_scheduler"},
            ]
        }
    }
}


@pytest.mark.parametrize(
    ("directory", "user_id"),
    [
        ("LAB", "testuser1"),
        ("lab", "TESTUSER1"),
        ("Lab", "TestUser1"),
        ("internal", "SA_SCHEDULER"),
    ],
)
def test_exclusion_case_insensitive(directory: str, user_id: str) -> None:
    flow = pipeline(EXCLUDE)
    assert flow.event_or_reason(butler(directory=directory, user_id=user_id), NS) == "excluded"
    message = f"Stop session for user '{directory}\\{user_id}'"
    assert flow.event_or_reason(short(message=message), NS) == "excluded"


@pytest.mark.parametrize(
    ("directory", "user_id"),
    [("LAB", "testuser2"), ("INTERNAL", "testuser1"), ("LAB2", "testuser1"), ("LA", "Btestuser1")],
)
def test_exclusion_needs_both_to_match(directory: str, user_id: str) -> None:
    event = pipeline(EXCLUDE).event_or_reason(butler(directory=directory, user_id=user_id), NS)
    assert isinstance(event, UserEvent)


def test_invalid_wins_over_exclusion() -> None:
    flow = pipeline(EXCLUDE)
    assert flow.event_or_reason(butler(host=""), NS) == "missing_host"


def test_no_exclude_list() -> None:
    document = {"Butler-SOS": {"userEvents": {"excludeUser": None}}}
    assert isinstance(pipeline(document).event_or_reason(butler(), NS), UserEvent)


# -- configured tags ------------------------------------------------------------------------


TAGS = {
    "Butler-SOS": {
        "userEvents": {
            "tags": [{"name": "env", "value": "PROD"}, {"name": "site", "value": "Lund"}],
            "sendToMQTT": {"enable": True},
            "sendToNewRelic": {"enable": True, "destinationAccount": ["A"]},
        },
        "influxdbConfig": {"enable": True},
        "mqttConfig": {"enable": True},
        "newRelic": {"enable": True},
        "thirdPartyToolsCredentials": {
            "newRelic": [{"accountName": "A", "insertApiKey": "NRII-key", "accountId": "1"}]
        },
    }
}


@pytest.mark.parametrize("make", [butler, short], ids=["format_a", "format_b"])
def test_configured_tags_appear_in_every_output(make: MakeDatagram) -> None:
    flow = pipeline(TAGS)
    event = flow.event_or_reason(make(), NS)
    assert isinstance(event, UserEvent)
    line = flow.encoder.line(event)
    assert ",env=PROD,site=Lund " in line
    payload = msgspec.json.decode(flow.encoder.mqtt(event))
    assert payload["tags"] == {"env": "PROD", "site": "Lund"}
    newrelic = msgspec.json.decode(flow.encoder.newrelic(event))
    assert (newrelic["env"], newrelic["site"]) == ("PROD", "Lund")


@pytest.mark.parametrize("make", [butler, short], ids=["format_a", "format_b"])
def test_no_tags_configured(make: MakeDatagram) -> None:
    flow = pipeline()
    event = flow.event_or_reason(make(), NS)
    assert isinstance(event, UserEvent)
    assert msgspec.json.decode(flow.encoder.mqtt(event))["tags"] == {}
    assert "env=" not in flow.encoder.line(event)


@pytest.mark.parametrize("make", [butler, short], ids=["format_a", "format_b"])
def test_full_enrichment_both_formats(make: MakeDatagram) -> None:
    flow = pipeline(app_names={APP_ID: "Sales"})
    data = (
        make(message=f"Start session for user 'LAB\\testuser1' UserAgent: {CHROME_WINDOWS}")
        if make is short
        else make()
    )
    event = flow.event_or_reason(data, NS)
    assert isinstance(event, UserEvent)
    assert (event.app_id, event.app_name) == (APP_ID, "Sales")
    assert ua_fields(event) == ("Chrome", "119", "Windows", "10")


# -- never raises ---------------------------------------------------------------------------


def check_outcome(result: UserEvent | str) -> None:
    if isinstance(result, str):
        assert result in INVALID_REASONS
        return
    assert isinstance(result, UserEvent)
    assert result.command in ACTIONS
    assert result.host.strip() and result.user_directory.strip() and result.user_id.strip()
    assert len(result.host) <= 100 and len(result.user_directory) <= 100
    assert len(result.user_id) <= 100 and len(result.origin) <= 200
    assert len(result.context) <= 500 and len(result.message) <= 1000


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    check_outcome(parse_datagram(data, NS))


PREFIXES = [
    b"/qseow-proxy-session/;",
    b"/qseow-proxy-connection/;",
    b"/QSEOW-PROXY-SESSION/;",
    b"/proxy-user-event/;",
    b"/qseow-proxy-session/;sense1;Start session;",
    b"/qseow-proxy-connection/;sense1;Close connection;LAB;",
    b"/proxy-user-event/;sense1;Proxy;/app/;Start session for user '",
    b"/proxy-user-event/;sense1;Proxy;/hub/;Closing connection ",
]
FIELD = st.one_of(
    st.text(max_size=300),
    st.sampled_from([*ACTIONS, "Opening connection", "LAB", "'LAB\\u'", f"/app/{APP_ID}", ""]),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(PREFIXES),
    st.lists(FIELD, max_size=10),
    st.binary(max_size=64),
)
def test_near_valid_datagrams_never_raise(prefix: bytes, fields: list[str], tail: bytes) -> None:
    data = prefix + ";".join(fields).encode("utf-8", "surrogatepass") + tail
    check_outcome(parse_datagram(data, NS))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PREFIXES), st.lists(FIELD, min_size=4, max_size=8))
def test_pipeline_never_raises(prefix: bytes, fields: list[str]) -> None:
    flow = excluding_pipeline()
    data = prefix + ";".join(fields).encode("utf-8", "surrogatepass")
    result = flow.event_or_reason(data, NS)
    if isinstance(result, str):
        assert result in (*INVALID_REASONS, "excluded")
        return
    assert flow.encoder.line(result).count("\n") == 1
    msgspec.json.decode(flow.encoder.mqtt(result))
    msgspec.json.decode(flow.encoder.newrelic(result))


@functools.cache
def excluding_pipeline() -> EventPipeline:
    return pipeline(EXCLUDE, {APP_ID: "Sales"})
