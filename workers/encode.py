"""Encoders for the three destinations (SPEC 3), built once per process and reused.

Line protocol escaping follows InfluxDB exactly: measurement escapes `,` and space; tag
keys, tag values and field keys escape `,`, `=` and space; string field values escape
`"` and `\\`. Two limits of the protocol itself are handled here: a line break cannot be
expressed anywhere in a line, so none is ever emitted (the parser already strips control
characters), and InfluxDB 1.x cannot store a tag value (or key) that ends in a
backslash, so trailing backslashes are trimmed from tags. Backslashes right before a space
are dropped from tags too: InfluxDB 1.x's line splitter reads `\\\\ ` as an escaped
backslash and an unescaped space, loses track of quotes after it and can then merge the
next line into this one, rejecting both points. The `*_field` string fields always carry
the exact value (line breaks removed).

Real traffic repeats a few hosts, users, apps and agents, so each group of escaped tags and
fields is cached whole (LRU, bounded: the values come from outside).

`senseflow.influxSchema` picks the tag and field names once, when the encoder is built
(`InfluxNames`): `seed` is SPEC 3's schema, `butler-sos` what Butler SOS 15's code writes
for the configured InfluxDB version, so its Grafana dashboards keep working.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
from typing import NamedTuple

import msgspec

from shared.config import Config
from shared.events import UserEvent

MEASUREMENT = "user_events"
NEW_RELIC_EVENT_TYPE = "qs_userEvent"

_TAG_ESCAPES = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ "})
_LINE_BREAKS = str.maketrans({"\n": None, "\r": None})
_BACKSLASHES_BEFORE_SPACE = re.compile(r"\\+(?= )")
_FIELD_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": None, "\r": None})
_USER_CACHE_SIZE = 16384  # bounds memory too: an entry can reach ~2 KB
_GROUP_CACHE_SIZE = 4096


class InfluxNames(NamedTuple):
    """The user_events names that differ between schemas (SPEC 3)."""

    ua_tags: tuple[str, str, str, str]
    """Browser name, browser major version, OS name, OS version."""
    user_full_field: str
    user_id_field: str
    app_id_field: str
    app_name_field: str


_BUTLER_SOS_UA_TAGS = ("uaBrowserName", "uaBrowserMajorVersion", "uaOsName", "uaOsVersion")
SEED_NAMES = InfluxNames(
    ("qs_uaBrowserName", "qs_uaBrowserMajorVersion", "qs_uaOsName", "qs_uaOsVersion"),
    "userFull_field",
    "userId_field",
    "appId_field",
    "appName_field",
)
# Butler SOS 15, src/lib/influxdb/v{1,2,3}/user-events.js: the field names follow what each
# client library allowed it (1.x and 2.x accept a field named like a tag, 3.x does not).
BUTLER_SOS_NAMES = {
    1: InfluxNames(_BUTLER_SOS_UA_TAGS, "userFull", "userId", "appId", "appName"),
    2: InfluxNames(_BUTLER_SOS_UA_TAGS, "userFull", "userId", "appId_field", "appName_field"),
    3: InfluxNames(
        _BUTLER_SOS_UA_TAGS, "userFull_field", "userId_field", "appId_field", "appName_field"
    ),
}


def influx_names(config: Config) -> InfluxNames:
    if config.pipeline.influx_schema == "butler-sos":
        return BUTLER_SOS_NAMES[config.butler.influxdb_config.version]
    return SEED_NAMES


def escape_tag(value: str) -> str:
    """Escape a tag key or value; '' means the tag must be left out."""
    value = value.translate(_LINE_BREAKS).rstrip("\\")  # breaks first: "a\\\n" ends in "\\"
    if "\\ " in value:
        value = _BACKSLASHES_BEFORE_SPACE.sub("", value)
    return value.translate(_TAG_ESCAPES)


def escape_field_string(value: str) -> str:
    return value.translate(_FIELD_ESCAPES)


class MqttPayload(msgspec.Struct, omit_defaults=True):
    """The MQTT JSON payload of SPEC 3; unknown values are left out.

    Built positionally (faster than 16 keywords), so `timestamp` needs a default to stay
    last; it is never empty. The wire names are camelCase.
    """

    messageType: str
    host: str
    command: str
    userDir: str
    userId: str
    origin: str
    context: str
    message: str
    tags: msgspec.Raw
    appId: str = ""
    appName: str = ""
    uaBrowserName: str = ""
    uaBrowserMajorVersion: str = ""
    uaOsName: str = ""
    uaOsVersion: str = ""
    timestamp: str = ""


class NewRelicAttributes(msgspec.Struct, omit_defaults=True):
    """The per-event New Relic attributes, in their wire order; unknown values left out."""

    eventType: str
    qs_host: str
    qs_event_action: str
    qs_userFull: str
    qs_userDirectory: str
    qs_userId: str
    qs_origin: str
    timestamp: int
    qs_appId: str = ""
    qs_appName: str = ""
    qs_uaBrowserName: str = ""
    qs_uaBrowserMajorVersion: str = ""
    qs_uaOsName: str = ""
    qs_uaOsVersion: str = ""


class EventEncoder:
    """Line protocol, MQTT payload and New Relic event for one enriched event."""

    def __init__(self, config: Config) -> None:
        butler = config.butler
        tags = [(t.name, t.value) for t in butler.user_events.tags or []]
        self._tag_suffix = "".join(
            f",{escape_tag(k)}={escape_tag(v)}" for k, v in tags if escape_tag(k) and escape_tag(v)
        )
        self._tags_json = msgspec.Raw(msgspec.json.encode(dict(tags)))
        self._json = msgspec.json.Encoder()
        names = influx_names(config)
        self._host_groups = functools.lru_cache(_GROUP_CACHE_SIZE)(_host_groups)
        self._user_groups = functools.lru_cache(_USER_CACHE_SIZE)(
            functools.partial(_user_groups, f' {names.user_full_field}="', names.user_id_field)
        )
        self._app_groups = functools.lru_cache(_GROUP_CACHE_SIZE)(
            functools.partial(_app_groups, f',{names.app_id_field}="', names.app_name_field)
        )
        self._ua_tags = functools.lru_cache(_GROUP_CACHE_SIZE)(
            functools.partial(_ua_tags, names.ua_tags)
        )
        self._iso_ms = -1
        self._iso_text = ""
        self._iso_second = -1
        self._iso_prefix = ""
        self.scramble = butler.user_events.send_to_new_relic.scramble
        self._scrambled_user = functools.lru_cache(_USER_CACHE_SIZE)(_scrambled_user)
        self._nr_static = {a.name: a.value for a in butler.new_relic.event.attribute.static or []}
        self._nr_tags = dict(tags)
        self._nr_prefix = _newrelic_prefix({**self._nr_static, **self._nr_tags})

    # -- InfluxDB ---------------------------------------------------------------------------

    def line(self, event: UserEvent) -> str:
        """One line of line protocol, newline-terminated."""
        head, origin = self._host_groups(event.host, event.command, event.origin)
        user_tags, user_fields = self._user_groups(event.user_directory, event.user_id)
        app_tags = app_fields = ua_tags = ""
        if event.app_id:
            app_tags, app_fields = self._app_groups(event.app_id, event.app_name)
        if event.ua_browser_name or event.ua_os_name:
            ua_tags = self._ua_tags(
                event.ua_browser_name,
                event.ua_browser_major,
                event.ua_os_name,
                event.ua_os_version,
            )
        return (
            f"{MEASUREMENT}{head}{user_tags}{origin}{app_tags}{ua_tags}{self._tag_suffix}"
            f"{user_fields}{app_fields} {event.received_ns}\n"
        )

    # -- MQTT -------------------------------------------------------------------------------

    def mqtt(self, event: UserEvent) -> bytes:
        return self._json.encode(
            MqttPayload(
                event.message_type,
                event.host,
                event.command,
                event.user_directory,
                event.user_id,
                event.origin,
                event.context,
                event.message,
                self._tags_json,
                event.app_id,
                event.app_name,
                event.ua_browser_name,
                event.ua_browser_major,
                event.ua_os_name,
                event.ua_os_version,
                self.iso_timestamp(event.received_ns),
            )
        )

    def iso_timestamp(self, ns: int) -> str:
        """ISO 8601 UTC with milliseconds, as JavaScript's toISOString() writes it."""
        ms = ns // 1_000_000
        if ms != self._iso_ms:  # events of a batch mostly share their millisecond
            self._iso_ms = ms
            second, millis = divmod(ms, 1000)
            if second != self._iso_second:
                self._iso_second = second
                self._iso_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._iso_text = f"{self._iso_prefix}.{millis:03d}Z"
        return self._iso_text

    # -- New Relic --------------------------------------------------------------------------

    def newrelic(self, event: UserEvent) -> bytes:
        """The static attributes and tags, encoded once, then this event's attributes."""
        if self._nr_prefix is None:
            return self._json.encode(self.newrelic_event(event))
        user_full, directory, user_id = self._newrelic_user(event)
        attributes = NewRelicAttributes(
            NEW_RELIC_EVENT_TYPE,
            event.host,
            event.command,
            user_full,
            directory,
            user_id,
            event.origin,
            event.received_ns // 1_000_000,
            event.app_id,
            event.app_name,
            event.ua_browser_name,
            event.ua_browser_major,
            event.ua_os_name,
            event.ua_os_version,
        )
        return self._nr_prefix + self._json.encode(attributes)[1:]

    def newrelic_event(self, event: UserEvent) -> dict[str, str | int]:
        """The attributes as one dict: a later value wins, in the place of the first."""
        user_full, directory, user_id = self._newrelic_user(event)
        attributes: dict[str, str | int] = dict(self._nr_static)
        attributes.update(self._nr_tags)
        attributes.update(
            eventType=NEW_RELIC_EVENT_TYPE,
            qs_host=event.host,
            qs_event_action=event.command,
            qs_userFull=user_full,
            qs_userDirectory=directory,
            qs_userId=user_id,
            qs_origin=event.origin,
            timestamp=event.received_ns // 1_000_000,
        )
        optional = {
            "qs_appId": event.app_id,
            "qs_appName": event.app_name,
            "qs_uaBrowserName": event.ua_browser_name,
            "qs_uaBrowserMajorVersion": event.ua_browser_major,
            "qs_uaOsName": event.ua_os_name,
            "qs_uaOsVersion": event.ua_os_version,
        }
        attributes.update((k, v) for k, v in optional.items() if v)
        return attributes

    def _newrelic_user(self, event: UserEvent) -> tuple[str, str, str]:
        """userFull, userDirectory and userId, scrambled when configured."""
        if self.scramble:
            return self._scrambled_user(event.user_directory, event.user_id)
        return event.user_full, event.user_directory, event.user_id


def scramble(value: str) -> str:
    """16 hex digits of SHAKE-256: stable per user, not reversible."""
    return hashlib.shake_256(value.encode("utf-8")).hexdigest(8)


def _scrambled_user(directory: str, user_id: str) -> tuple[str, str, str]:
    return scramble(f"{directory}\\{user_id}"), scramble(directory), scramble(user_id)


def _newrelic_prefix(constant: dict[str, str]) -> bytes | None:
    """`{` and the constant attributes with a trailing comma, ready for an event's own.

    None when a constant name is also an event attribute: then the dict path keeps the
    old rule (the later value, in the place of the first), which a prefix cannot.
    """
    if not constant:
        return b"{"
    if not constant.keys().isdisjoint(NewRelicAttributes.__struct_fields__):
        return None
    return msgspec.json.encode(constant)[:-1] + b","


def _tag_pair(key: str, escaped_value: str) -> str:
    return f",{key}={escaped_value}" if escaped_value else ""


def _host_groups(host: str, action: str, origin: str) -> tuple[str, str]:
    """The host and event_action tags, and the origin tag (which comes after the user)."""
    head = _tag_pair("host", escape_tag(host)) + _tag_pair("event_action", escape_tag(action))
    return head, _tag_pair("origin", escape_tag(origin))


def _user_groups(
    full_field_start: str, id_field: str, directory: str, user_id: str
) -> tuple[str, str]:
    """The three user tags, and the two user fields, the first with its leading space
    (`full_field_start` is ` <key>="`)."""
    full = f"{directory}\\{user_id}"
    tags = (
        _tag_pair("userFull", escape_tag(full))
        + _tag_pair("userDirectory", escape_tag(directory))
        + _tag_pair("userId", escape_tag(user_id))
    )
    fields = (
        f'{full_field_start}{escape_field_string(full)}",'
        f'{id_field}="{escape_field_string(user_id)}"'
    )
    return tags, fields


def _app_groups(
    id_field_start: str, name_field: str, app_id: str, app_name: str
) -> tuple[str, str]:
    """The app tags and fields (`id_field_start` is `,<key>="`); the id is a GUID from the
    enricher, stored as it is."""
    tags = _tag_pair("appId", escape_tag(app_id)) + _tag_pair("appName", escape_tag(app_name))
    fields = f'{id_field_start}{app_id}"'
    if app_name:
        fields += f',{name_field}="{escape_field_string(app_name)}"'
    return tags, fields


def _ua_tags(
    keys: tuple[str, str, str, str], browser: str, major: str, os_name: str, os_version: str
) -> str:
    values = (browser, major, os_name, os_version)
    return "".join(_tag_pair(k, escape_tag(v)) for k, v in zip(keys, values, strict=True))
