"""`senseflow.influxSchema: butler-sos` on InfluxDB 2.x and 3.x: the exact lines the sink
sends, as the recording stand-in of tests/process/test_influx_sink.py receives them.

Butler SOS 15 names the string fields `userFull`, `userId`, `appId_field`, `appName_field`
on 2.x and `userFull_field`, `userId_field`, `appId_field`, `appName_field` on 3.x; its
user-agent tags are `uaBrowserName`, `uaBrowserMajorVersion`, `uaOsName`, `uaOsVersion`.
"""

from __future__ import annotations

import asyncio

import pytest

from shared.config import Config, config_from_document
from shared.counters import Counters
from shared.events import UserEvent
from tests.localservers import LOOPBACK
from tests.process import test_influx_sink as sink_tests
from tests.process.test_influx_sink import StandIn, write_all
from workers.encode import EventEncoder

stand_in = sink_tests.stand_in  # the recording stand-in fixture, under its own name

T0 = 1_700_000_000_000_000_000
APP_ID = "2f1ea3c4-7f3b-4a53-a9a3-1b5d3f0c9e11"
VERSIONED = {
    2: {"v2Config": {"org": "my org", "bucket": "sense", "token": "tok-2"}},
    3: {"v3Config": {"database": "sense", "token": "tok-3"}},
}
HEAD = (
    "user_events,host=sense1,event_action=Open\\ connection,"
    'userFull=LAB\\o"brien,userDirectory=LAB,userId=o"brien,origin=AppAccess'
)
APP_TAGS = f",appId={APP_ID},appName=Sales\\,\\ 2024"
UA_TAGS = ",{}=Chrome,{}=119,{}=Windows,{}=10"
EXPECTED = {
    (2, "butler-sos"): (
        ("uaBrowserName", "uaBrowserMajorVersion", "uaOsName", "uaOsVersion"),
        ("userFull", "userId", "appId_field", "appName_field"),
    ),
    (3, "butler-sos"): (
        ("uaBrowserName", "uaBrowserMajorVersion", "uaOsName", "uaOsVersion"),
        ("userFull_field", "userId_field", "appId_field", "appName_field"),
    ),
    (2, "seed"): (
        ("qs_uaBrowserName", "qs_uaBrowserMajorVersion", "qs_uaOsName", "qs_uaOsVersion"),
        ("userFull_field", "userId_field", "appId_field", "appName_field"),
    ),
}


def make_config(version: int, schema: str, port: int) -> Config:
    influx = {"enable": True, "host": LOOPBACK, "port": port, "version": version}
    document = {
        "Butler-SOS": {
            "influxdbConfig": influx | VERSIONED[version],
            "userEvents": {"tags": [{"name": "qs_env", "value": "dev"}]},
        },
        "senseflow": {"influxSchema": schema},
    }
    return config_from_document(document, {})


def make_event(received_ns: int, app: bool) -> UserEvent:
    return UserEvent(
        message_type="connection",
        host="sense1",
        command="Open connection",
        user_directory="LAB",
        user_id='o"brien',
        origin="AppAccess",
        context=f"/app/{APP_ID}",
        message="",
        received_ns=received_ns,
        app_id=APP_ID if app else "",
        app_name="Sales, 2024" if app else "",
        ua_browser_name="Chrome",
        ua_browser_major="119",
        ua_os_name="Windows",
        ua_os_version="10",
    )


@pytest.mark.parametrize(("version", "schema"), list(EXPECTED))
def test_the_sink_sends_the_schema_names_of_the_version(
    stand_in: StandIn, version: int, schema: str
) -> None:
    config = make_config(version, schema, stand_in.port)
    encoder = EventEncoder(config)
    lines = [encoder.line(make_event(T0, app=True)), encoder.line(make_event(T0 + 1, app=False))]

    asyncio.run(write_all(config, [[line.encode() for line in lines]], Counters()))

    ua, (full, user_id, app_id, app_name) = EXPECTED[(version, schema)]
    user_fields = f'{full}="LAB\\\\o\\"brien",{user_id}="o\\"brien"'
    assert [w.body.decode() for w in stand_in.writes()] == [
        f"{HEAD}{APP_TAGS}{UA_TAGS.format(*ua)},qs_env=dev "
        f'{user_fields},{app_id}="{APP_ID}",{app_name}="Sales, 2024" {T0}\n'
        f"{HEAD}{UA_TAGS.format(*ua)},qs_env=dev {user_fields} {T0 + 1}\n"
    ]
