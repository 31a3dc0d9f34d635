"""Line protocol from workers/encode.py (SPEC 3): exact lines, properties, a real InfluxDB 1.x.

The tokenizer below is written from InfluxDB 1.x's parser (models/points.go), not from
the encoder: `scan_lines` splits a body into lines as `scanLine` does (a backslash skips
the next byte; after the first space, quotes are tracked), and `parse_line` splits one
line as `scanKey`/`scanFields` do (in the key, a `,`, `=` or space right after a
backslash is escaped; a string field is quoted, with `\\"` and `\\\\` as its escapes).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shared.config import ButlerSOS, Config, NameValue, UserEvents
from shared.events import ACTIONS, UserEvent
from tests.localservers import InfluxServer
from workers.encode import EventEncoder

APP_ID = "2f1ea3c4-7f3b-4a53-a9a3-1b5d3f0c9e11"
T0 = 1_700_000_000_123_456_789

# -- an independent tokenizer ----------------------------------------------------------------


@dataclass
class Point:
    measurement: str
    tags: list[tuple[str, str]]
    fields: list[tuple[str, str]]
    timestamp: int


def scan_lines(body: str) -> list[str]:
    """The lines InfluxDB 1.x's scanLine finds in a write body (without their newline)."""
    lines: list[str] = []
    start = i = equals = commas = 0
    quoted = in_fields = False
    while i < len(body):
        char = body[i]
        if char == "\\":
            i += 2
            continue
        in_fields = in_fields or char == " "
        if in_fields and not quoted and char in "=,":
            equals, commas = equals + (char == "="), commas + (char == ",")
        elif in_fields and char == '"' and equals > commas:
            quoted = not quoted
        elif char == "\n" and not quoted:
            lines.append(body[start:i])
            start, equals, commas, quoted, in_fields = i + 1, 0, 0, False, False
        i += 1
    if start < len(body):
        lines.append(body[start:])
    return lines


def _unescaped(text: str, i: int) -> bool:
    return i == 0 or text[i - 1] != "\\"


def _find_unescaped(text: str, char: str, start: int) -> int:
    return next((j for j in range(start, len(text)) if text[j] == char and _unescaped(text, j)), -1)


def split_key(line: str) -> tuple[list[str], int]:
    """Measurement and `key=value` tag parts, and where the fields start."""
    parts, begin = [], 0
    for i, char in enumerate(line):
        if char in ", " and _unescaped(line, i):
            parts.append(line[begin:i])
            begin = i + 1
            if char == " ":
                return parts, begin
    raise AssertionError(f"no unescaped space after the key: {line!r}")


def unescape_tag(text: str) -> str:
    for char in ", =":
        text = text.replace("\\" + char, char)
    return text


def parse_tag(part: str) -> tuple[str, str]:
    separators = [i for i, char in enumerate(part) if char == "=" and _unescaped(part, i)]
    assert len(separators) == 1, f"tag {part!r} has {len(separators)} unescaped '='"
    key, value = part[: separators[0]], part[separators[0] + 1 :]
    assert key and value, f"empty tag key or value in {part!r}"
    return unescape_tag(key), unescape_tag(value)


def parse_string_value(line: str, i: int) -> tuple[str, int]:
    """A quoted string field value starting at line[i]; returns it and the index after it."""
    assert line[i] == '"', f"string field expected at {i}: {line!r}"
    chars, i = [], i + 1
    while line[i] != '"':
        if line[i] == "\\":
            assert line[i + 1] in '\\"', f"stray backslash in a string field: {line!r}"
            i += 1
        chars.append(line[i])
        i += 1
        assert i < len(line), f"unterminated string field: {line!r}"
    return "".join(chars), i + 1


def parse_fields(line: str, i: int) -> tuple[list[tuple[str, str]], int]:
    """`key="value"` fields from line[i]; returns them and where the timestamp starts."""
    fields = []
    while True:
        equals = _find_unescaped(line, "=", i)
        assert equals > i, f"field key and '=' expected at {i}: {line!r}"
        value, end = parse_string_value(line, equals + 1)
        fields.append((line[i:equals], value))
        if line[end] == " ":
            return fields, end + 1
        assert line[end] == ",", f"',' or ' ' expected after a field: {line!r}"
        i = end + 1


def parse_line(line: str) -> Point:
    parts, i = split_key(line)
    fields, i = parse_fields(line, i)
    assert line[i:].isdigit(), f"timestamp expected at the end: {line!r}"
    return Point(parts[0], [parse_tag(p) for p in parts[1:]], fields, int(line[i:]))


def parse_body(body: str) -> list[Point]:
    return [parse_line(line) for line in scan_lines(body)]


# -- what the encoder must produce --------------------------------------------------------------

_LINE_BREAKS = str.maketrans({"\n": None, "\r": None})
_BACKSLASHES_BEFORE_SPACE = re.compile(r"\\+(?= )")


def stored_tag(value: str) -> str:
    """A tag as InfluxDB 1.x can store it: no line breaks, no backslash at the end of the
    value or right before a space ('' means the tag is left out)."""
    return _BACKSLASHES_BEFORE_SPACE.sub("", value.translate(_LINE_BREAKS).rstrip("\\"))


def expected_point(event: UserEvent, configured: list[tuple[str, str]]) -> Point:
    tags = [
        ("host", event.host),
        ("event_action", event.command),
        ("userFull", event.user_full),
        ("userDirectory", event.user_directory),
        ("userId", event.user_id),
        ("origin", event.origin),
    ]
    if event.app_id:
        tags += [("appId", event.app_id), ("appName", event.app_name)]
    if event.ua_browser_name or event.ua_os_name:
        tags += [
            ("qs_uaBrowserName", event.ua_browser_name),
            ("qs_uaBrowserMajorVersion", event.ua_browser_major),
            ("qs_uaOsName", event.ua_os_name),
            ("qs_uaOsVersion", event.ua_os_version),
        ]
    stored = [(stored_tag(k), stored_tag(v)) for k, v in tags + configured]
    fields = [("userFull_field", event.user_full), ("userId_field", event.user_id)]
    if event.app_id:
        fields += [("appId_field", event.app_id)] + (
            [("appName_field", event.app_name)] if event.app_name else []
        )
    return Point(
        "user_events",
        [(k, v) for k, v in stored if k and v],
        [(k, v.translate(_LINE_BREAKS)) for k, v in fields],
        event.received_ns,
    )


def make_encoder(tags: list[tuple[str, str]] | None = None) -> EventEncoder:
    name_values = [NameValue(name=k, value=v) for k, v in tags or []]
    return EventEncoder(Config(butler=ButlerSOS(user_events=UserEvents(tags=name_values))))


def make_event(user_id: str = "testuser1", **values: str | int) -> UserEvent:
    defaults: dict[str, str | int] = {
        "message_type": "session",
        "host": "sense1",
        "command": "Start session",
        "user_directory": "LAB",
        "origin": "AppAccess",
        "context": "/hub",
        "message": "Start session for user 'LAB\\testuser1'",
        "received_ns": T0,
    }
    return UserEvent(user_id=user_id, **(defaults | values))  # type: ignore[arg-type]


# -- exact lines ----------------------------------------------------------------------------

BACKSLASH = "\\"
HEAD = "user_events,host=sense1,event_action=Start\\ session"
FULL_TAGS = "userFull=LAB\\testuser1,userDirectory=LAB,userId=testuser1"
FULL_FIELDS = 'userFull_field="LAB\\\\testuser1",userId_field="testuser1"'


@pytest.mark.parametrize(
    ("event", "tags", "expected"),
    [
        pytest.param(
            make_event(),
            [],
            f"{HEAD},{FULL_TAGS},origin=AppAccess {FULL_FIELDS} {T0}\n",
            id="minimal",
        ),
        pytest.param(
            make_event(
                command="Open connection",
                app_id=APP_ID,
                app_name="Sales, 2024 = Q1",
                ua_browser_name="Chrome",
                ua_browser_major="119",
                ua_os_name="Windows",
                ua_os_version="10",
            ),
            [("env", "PROD"), ("data center", "north, 1")],
            "user_events,host=sense1,event_action=Open\\ connection,"
            f"{FULL_TAGS},origin=AppAccess,appId={APP_ID},appName=Sales\\,\\ 2024\\ \\=\\ Q1,"
            "qs_uaBrowserName=Chrome,qs_uaBrowserMajorVersion=119,qs_uaOsName=Windows,"
            "qs_uaOsVersion=10,env=PROD,data\\ center=north\\,\\ 1 "
            f'{FULL_FIELDS},appId_field="{APP_ID}",appName_field="Sales, 2024 = Q1" {T0}\n',
            id="everything",
        ),
        pytest.param(
            make_event(origin="", app_id=APP_ID, ua_os_name="Linux"),
            [("empty", ""), ("", "x")],
            f"{HEAD},{FULL_TAGS},appId={APP_ID},qs_uaOsName=Linux "
            f'{FULL_FIELDS},appId_field="{APP_ID}" {T0}\n',
            id="empty-tags-left-out",
        ),
        pytest.param(
            make_event('o"brien\\x'),
            [],
            f'{HEAD},userFull=LAB\\o"brien\\x,userDirectory=LAB,userId=o"brien\\x,origin=AppAccess '
            f'userFull_field="LAB\\\\o\\"brien\\\\x",userId_field="o\\"brien\\\\x" {T0}\n',
            id="field-escapes-quote-and-backslash",
        ),
        pytest.param(
            make_event("a b,c=d"),
            [],
            f"{HEAD},userFull=LAB\\a\\ b\\,c\\=d,userDirectory=LAB,userId=a\\ b\\,c\\=d,"
            f'origin=AppAccess userFull_field="LAB\\\\a b,c=d",userId_field="a b,c=d" {T0}\n',
            id="tag-escapes-comma-equals-space",
        ),
        pytest.param(
            make_event("svc\\\\"),
            [],
            f"{HEAD},userFull=LAB\\svc,userDirectory=LAB,userId=svc,origin=AppAccess "
            f'userFull_field="LAB\\\\svc\\\\\\\\",userId_field="svc\\\\\\\\" {T0}\n',
            id="trailing-backslashes-trimmed-from-tags-only",
        ),
        pytest.param(
            make_event("\\", user_directory="\\\\"),
            [],
            f'{HEAD},origin=AppAccess userFull_field="{8 * BACKSLASH}",userId_field="\\\\" {T0}\n',
            id="tag-of-backslashes-only-left-out",
        ),
    ],
)
def test_exact_line(event: UserEvent, tags: list[tuple[str, str]], expected: str) -> None:
    line = make_encoder(tags).line(event)
    assert line == expected
    assert parse_body(line) == [expected_point(event, tags)]


def test_batch_of_lines_parses_back_event_by_event() -> None:
    encoder = make_encoder([("env", "PROD")])
    events = [make_event(f"user {i}", received_ns=T0 + i) for i in range(3)]
    body = "".join(encoder.line(e) for e in events)
    assert parse_body(body) == [expected_point(e, [("env", "PROD")]) for e in events]


# -- properties -----------------------------------------------------------------------------

_CONTROLS = "".join(map(chr, [*range(0x20), 0x7F]))
# Single specials and the pairs that trip a parser: escapes, backslash runs, quotes.
_TRICKY = [" ", ",", "=", '"', "\\", "\\ ", "\\,", "\\=", '\\"', "\\\\", '" ', "= "]


def texts(extra: str = "", max_chunks: int = 8) -> st.SearchStrategy[str]:
    """Any text without the control characters the parser strips, rich in LP specials."""
    other = st.characters(codec="utf-8", exclude_characters=_CONTROLS)
    chunks = st.one_of(st.sampled_from(_TRICKY + list(extra)), other)
    return st.lists(chunks, max_size=max_chunks).map("".join)


def events(values: st.SearchStrategy[str]) -> st.SearchStrategy[UserEvent]:
    return st.builds(
        make_event,
        user_id=values,
        user_directory=values,
        host=values,
        origin=values,
        command=st.sampled_from(ACTIONS),
        app_id=st.sampled_from(["", APP_ID]),
        app_name=values,
        ua_browser_name=values,
        ua_browser_major=values,
        ua_os_name=values,
        ua_os_version=values,
        received_ns=st.integers(0, 2**63 - 1),
    )


def configured_tags(values: st.SearchStrategy[str]) -> st.SearchStrategy[list[tuple[str, str]]]:
    return st.lists(st.tuples(values, values), max_size=3)


@example(event=make_event('\\ \\=x"'), tags=[]).via("a backslash before a space, then a quote")
@example(event=make_event("LAB"), tags=[("a\\ b", 'x"')]).via("the same in a configured tag")
@given(event=events(texts()), tags=configured_tags(texts()))
def test_any_text_encodes_to_one_line_with_its_own_values(
    event: UserEvent, tags: list[tuple[str, str]]
) -> None:
    line = make_encoder(tags).line(event)
    assert line.endswith("\n")
    assert line.count("\n") == 1
    assert parse_body(line) == [expected_point(event, tags)]


@example(event=make_event("a\\\n"), tags=[("env", "b\\\r")]).via("a backslash before a break")
@given(event=events(texts("\n\r")), tags=configured_tags(texts("\n\r")))
def test_line_breaks_in_values_never_break_the_line(
    event: UserEvent, tags: list[tuple[str, str]]
) -> None:
    line = make_encoder(tags).line(event)
    assert line.count("\n") == 1
    assert "\r" not in line
    assert parse_body(line) == [expected_point(event, tags)]


@given(batch=st.lists(events(texts()), min_size=2, max_size=6))
def test_batch_keeps_one_point_per_event(batch: list[UserEvent]) -> None:
    encoder = make_encoder([("env", "PROD")])
    body = "".join(encoder.line(e) for e in batch)
    assert parse_body(body) == [expected_point(e, [("env", "PROD")]) for e in batch]


# -- a real InfluxDB 1.x --------------------------------------------------------------------

_timestamps = itertools.count(T0, 1000)


def _server_event(user_id: str, user_directory: str, app_name: str) -> UserEvent:
    return make_event(
        user_id,
        user_directory=user_directory,
        app_id=APP_ID,
        app_name=app_name,
        received_ns=next(_timestamps),
    )


@settings(
    max_examples=100,
    deadline=None,
    # One database for all examples: each example reads back only its own time range.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(rows=st.lists(st.tuples(texts(), texts(), texts(), texts()), min_size=1, max_size=40))
def test_real_influxdb_stores_the_values(
    influx_server: InfluxServer, influx_db: str, rows: list[tuple[str, str, str, str]]
) -> None:
    written = [(_server_event(*row[:3]), row[3]) for row in rows]
    body = "".join(make_encoder([("env", env)]).line(event) for event, env in written)
    influx_server.write(influx_db, body.encode())
    assert read_back(influx_server, influx_db, written) == [
        expected_row(event, env) for event, env in written
    ]


_COLUMNS = ("userId_field", "userFull_field", "appName_field", "userId", "appName", "env")


def read_back(
    server: InfluxServer, db: str, written: list[tuple[UserEvent, str]]
) -> list[dict[str, object]]:
    first, last = written[0][0].received_ns, written[-1][0].received_ns
    columns = ", ".join(f'"{c}"' for c in _COLUMNS)
    answer = server.query(
        f"SELECT {columns} FROM user_events WHERE time >= {first} AND time <= {last}",
        db,
        epoch="ns",
    )
    series = answer["results"][0]["series"][0]
    return [dict(zip(series["columns"], row, strict=True)) for row in series["values"]]


def expected_row(event: UserEvent, env: str) -> dict[str, object]:
    return {
        "time": event.received_ns,
        "userId_field": event.user_id,
        "userFull_field": event.user_full,
        "appName_field": event.app_name or None,
        "userId": stored_tag(event.user_id) or None,
        "appName": stored_tag(event.app_name) or None,
        "env": stored_tag(env) or None,
    }
