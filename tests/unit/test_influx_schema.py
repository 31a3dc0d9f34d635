"""`senseflow.influxSchema` (SPEC 3): `seed`, or the names Butler SOS 15's code writes.

Butler SOS 15 (src/lib/influxdb/v{1,2,3}/user-events.js) writes the user-agent tags as
`uaBrowserName`, `uaBrowserMajorVersion`, `uaOsName`, `uaOsVersion` and names the string
fields by InfluxDB version: 1.x `userFull`, `userId`, `appId`, `appName`; 2.x `userFull`,
`userId`, `appId_field`, `appName_field`; 3.x `userFull_field`, `userId_field`,
`appId_field`, `appName_field`. Escaping is the same under both schemas.
"""

from __future__ import annotations

from typing import Any, Literal

import pytest
from hypothesis import given

from shared.config import (
    ButlerSOS,
    Config,
    ConfigError,
    InfluxdbConfig,
    NameValue,
    Pipeline,
    UserEvents,
    config_from_document,
)
from shared.events import UserEvent
from tests.unit.test_line_protocol import (
    APP_ID,
    FULL_TAGS,
    HEAD,
    T0,
    Point,
    configured_tags,
    events,
    expected_point,
    make_event,
    parse_body,
    texts,
)
from workers.encode import EventEncoder

Schema = Literal["seed", "butler-sos"]

SEED_UA = ("qs_uaBrowserName", "qs_uaBrowserMajorVersion", "qs_uaOsName", "qs_uaOsVersion")
BUTLER_UA = ("uaBrowserName", "uaBrowserMajorVersion", "uaOsName", "uaOsVersion")
SEED_FIELDS = ("userFull_field", "userId_field", "appId_field", "appName_field")
BUTLER_FIELDS = {
    1: ("userFull", "userId", "appId", "appName"),
    2: ("userFull", "userId", "appId_field", "appName_field"),
    3: SEED_FIELDS,
}
VERSIONS = [1, 2, 3]


def names(schema: Schema, version: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(user-agent tag keys, field keys) of a schema, written out from the issue text."""
    if schema == "seed":
        return SEED_UA, SEED_FIELDS
    return BUTLER_UA, BUTLER_FIELDS[version]


def make_encoder(
    schema: Schema, version: int, tags: list[tuple[str, str]] | None = None
) -> EventEncoder:
    user_events = UserEvents(tags=[NameValue(name=k, value=v) for k, v in tags or []])
    butler = ButlerSOS(user_events=user_events, influxdb_config=InfluxdbConfig(version=version))  # type: ignore[arg-type]
    return EventEncoder(Config(butler=butler, pipeline=Pipeline(influx_schema=schema)))


def expected(event: UserEvent, tags: list[tuple[str, str]], schema: Schema, version: int) -> Point:
    """SPEC 3's point (tests/unit/test_line_protocol.py) with the schema's names."""
    point = expected_point(event, tags)
    ua_keys, field_keys = names(schema, version)
    rename = dict(zip(SEED_UA + SEED_FIELDS, ua_keys + field_keys, strict=True))
    point.tags = [(rename.get(k, k), v) for k, v in point.tags]
    point.fields = [(rename.get(k, k), v) for k, v in point.fields]
    return point


EVERYTHING = make_event(
    command="Open connection",
    app_id=APP_ID,
    app_name='Sales, "2024" = Q1\\',
    ua_browser_name="Chrome",
    ua_browser_major="119",
    ua_os_name="Windows",
    ua_os_version="10",
)
EVERYTHING_TAGS = (
    f"user_events,host=sense1,event_action=Open\\ connection,{FULL_TAGS},origin=AppAccess,"
    f'appId={APP_ID},appName=Sales\\,\\ "2024"\\ \\=\\ Q1,'
    "{}=Chrome,{}=119,{}=Windows,{}=10,qs_env=dev "
)
EVERYTHING_FIELDS = (
    '{}="LAB\\\\testuser1",{}="testuser1",'
    f'{{}}="{APP_ID}",{{}}="Sales, \\"2024\\" = Q1\\\\" {T0}\n'
)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("schema", ["seed", "butler-sos"])
def test_exact_line_with_every_tag_and_field(schema: Schema, version: int) -> None:
    ua_keys, field_keys = names(schema, version)
    line = make_encoder(schema, version, [("qs_env", "dev")]).line(EVERYTHING)
    assert line == EVERYTHING_TAGS.format(*ua_keys) + EVERYTHING_FIELDS.format(*field_keys)
    assert parse_body(line) == [expected(EVERYTHING, [("qs_env", "dev")], schema, version)]


def test_butler_sos_lines_written_out_per_version() -> None:
    """The same event, as Butler SOS 15 would store it, spelt out once per version."""
    event = make_event(
        'o"brien\\x',
        app_id=APP_ID,
        app_name="HR app",
        ua_browser_name="Firefox",
        ua_os_name="Mac OS X",
        ua_os_version="10.15",
    )
    tags = (
        f'{HEAD},userFull=LAB\\o"brien\\x,userDirectory=LAB,userId=o"brien\\x,origin=AppAccess,'
        f"appId={APP_ID},appName=HR\\ app,uaBrowserName=Firefox,uaOsName=Mac\\ OS\\ X,"
        "uaOsVersion=10.15 "
    )
    user, user_id = '"LAB\\\\o\\"brien\\\\x"', '"o\\"brien\\\\x"'
    assert make_encoder("butler-sos", 1).line(event) == (
        f'{tags}userFull={user},userId={user_id},appId="{APP_ID}",appName="HR app" {T0}\n'
    )
    assert make_encoder("butler-sos", 2).line(event) == (
        f"{tags}userFull={user},userId={user_id},"
        f'appId_field="{APP_ID}",appName_field="HR app" {T0}\n'
    )
    assert make_encoder("butler-sos", 3).line(event) == (
        f"{tags}userFull_field={user},userId_field={user_id},"
        f'appId_field="{APP_ID}",appName_field="HR app" {T0}\n'
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_butler_sos_without_app_or_agent_has_only_the_user_fields(version: int) -> None:
    full_field, id_field, _, _ = BUTLER_FIELDS[version]
    line = make_encoder("butler-sos", version).line(make_event("a b,c=d"))
    assert line == (
        f"{HEAD},userFull=LAB\\a\\ b\\,c\\=d,userDirectory=LAB,userId=a\\ b\\,c\\=d,"
        f'origin=AppAccess {full_field}="LAB\\\\a b,c=d",{id_field}="a b,c=d" {T0}\n'
    )


@pytest.mark.parametrize("version", VERSIONS)
@given(event=events(texts()), tags=configured_tags(texts()))
def test_butler_sos_any_text_encodes_to_one_line_with_its_own_values(
    version: int, event: UserEvent, tags: list[tuple[str, str]]
) -> None:
    line = make_encoder("butler-sos", version, tags).line(event)
    assert line.count("\n") == 1
    assert parse_body(line) == [expected(event, tags, "butler-sos", version)]


# -- configuration ----------------------------------------------------------------------------


def load(own: dict[str, Any], tags: list[dict[str, str]] | None = None) -> Config:
    butler = {"userEvents": {"tags": tags or []}}
    return config_from_document({"Butler-SOS": butler, "senseflow": own}, {})


def test_schema_defaults_to_seed_and_reads_butler_sos() -> None:
    assert load({}).pipeline.influx_schema == "seed"
    assert load({"influxSchema": "butler-sos"}).pipeline.influx_schema == "butler-sos"


def test_a_bad_schema_is_one_clear_line() -> None:
    with pytest.raises(ConfigError) as caught:
        load({"influxSchema": "butler"})
    assert caught.value.problems == [
        "senseflow.influxSchema: expected one of 'butler-sos', 'seed', found string 'butler'"
    ]


def test_butler_sos_reserves_its_user_agent_tag_names() -> None:
    tags = [{"name": "uaOsName", "value": "x"}]
    assert load({}, tags).butler.user_events.tags == [NameValue(name="uaOsName", value="x")]
    with pytest.raises(ConfigError) as caught:
        load({"influxSchema": "butler-sos"}, tags)
    assert caught.value.problems == [
        "Butler-SOS.userEvents.tags[0].name: expected a name the user_events point does not "
        "use, found 'uaOsName'"
    ]
