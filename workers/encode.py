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
"""

from __future__ import annotations

import hashlib
import re
import time

import msgspec

from shared.config import Config
from shared.events import UserEvent

MEASUREMENT = "user_events"
NEW_RELIC_EVENT_TYPE = "qs_userEvent"

_TAG_ESCAPES = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ "})
_LINE_BREAKS = str.maketrans({"\n": None, "\r": None})
_BACKSLASHES_BEFORE_SPACE = re.compile(r"\\+(?= )")
_FIELD_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": None, "\r": None})
_CACHE_LIMIT = 65536


def escape_tag(value: str) -> str:
    """Escape a tag key or value; '' means the tag must be left out."""
    value = value.translate(_LINE_BREAKS).rstrip("\\")  # breaks first: "a\\\n" ends in "\\"
    if "\\ " in value:
        value = _BACKSLASHES_BEFORE_SPACE.sub("", value)
    return value.translate(_TAG_ESCAPES)


def escape_field_string(value: str) -> str:
    return value.translate(_FIELD_ESCAPES)


class MqttPayload(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The MQTT JSON payload of SPEC 3; unknown values are left out."""

    messageType: str  # noqa: N815 - the wire names are camelCase
    host: str
    command: str
    userDir: str  # noqa: N815
    userId: str  # noqa: N815
    origin: str
    context: str
    message: str
    tags: msgspec.Raw
    appId: str = ""  # noqa: N815
    appName: str = ""  # noqa: N815
    uaBrowserName: str = ""  # noqa: N815
    uaBrowserMajorVersion: str = ""  # noqa: N815
    uaOsName: str = ""  # noqa: N815
    uaOsVersion: str = ""  # noqa: N815
    timestamp: str


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
        self._tag_cache: dict[str, str] = {}
        self._field_cache: dict[str, str] = {}
        self._scramble_cache: dict[str, str] = {}
        self._iso_second = -1
        self._iso_prefix = ""
        self.scramble = butler.user_events.send_to_new_relic.scramble
        self._nr_static = {a.name: a.value for a in butler.new_relic.event.attribute.static or []}
        self._nr_tags = dict(tags)

    # -- InfluxDB ---------------------------------------------------------------------------

    def line(self, event: UserEvent) -> str:
        """One line of line protocol, newline-terminated."""
        tag = self._tag
        field = self._field
        user_full = event.user_full
        parts = [
            MEASUREMENT,
            _tag_pair("host", tag(event.host)),
            _tag_pair("event_action", tag(event.command)),
            _tag_pair("userFull", tag(user_full)),
            _tag_pair("userDirectory", tag(event.user_directory)),
            _tag_pair("userId", tag(event.user_id)),
            _tag_pair("origin", tag(event.origin)),
        ]
        if event.app_id:
            parts.append(_tag_pair("appId", tag(event.app_id)))
            parts.append(_tag_pair("appName", tag(event.app_name)))
        if event.ua_browser_name or event.ua_os_name:
            parts.append(_tag_pair("qs_uaBrowserName", tag(event.ua_browser_name)))
            parts.append(_tag_pair("qs_uaBrowserMajorVersion", tag(event.ua_browser_major)))
            parts.append(_tag_pair("qs_uaOsName", tag(event.ua_os_name)))
            parts.append(_tag_pair("qs_uaOsVersion", tag(event.ua_os_version)))
        parts.append(self._tag_suffix)
        parts.append(f' userFull_field="{field(user_full)}",userId_field="{field(event.user_id)}"')
        if event.app_id:
            parts.append(f',appId_field="{event.app_id}"')
            if event.app_name:
                parts.append(f',appName_field="{field(event.app_name)}"')
        parts.append(f" {event.received_ns}\n")
        return "".join(parts)

    def _tag(self, value: str) -> str:
        escaped = self._tag_cache.get(value)
        if escaped is None:
            escaped = escape_tag(value)
            _remember(self._tag_cache, value, escaped)
        return escaped

    def _field(self, value: str) -> str:
        escaped = self._field_cache.get(value)
        if escaped is None:
            escaped = escape_field_string(value)
            _remember(self._field_cache, value, escaped)
        return escaped

    # -- MQTT -------------------------------------------------------------------------------

    def mqtt(self, event: UserEvent) -> bytes:
        return self._json.encode(
            MqttPayload(
                messageType=event.message_type,
                host=event.host,
                command=event.command,
                userDir=event.user_directory,
                userId=event.user_id,
                origin=event.origin,
                context=event.context,
                message=event.message,
                tags=self._tags_json,
                appId=event.app_id,
                appName=event.app_name,
                uaBrowserName=event.ua_browser_name,
                uaBrowserMajorVersion=event.ua_browser_major,
                uaOsName=event.ua_os_name,
                uaOsVersion=event.ua_os_version,
                timestamp=self.iso_timestamp(event.received_ns),
            )
        )

    def iso_timestamp(self, ns: int) -> str:
        """ISO 8601 UTC with milliseconds, as JavaScript's toISOString() writes it."""
        second, rest = divmod(ns, 1_000_000_000)
        if second != self._iso_second:
            self._iso_second = second
            self._iso_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._iso_prefix}.{rest // 1_000_000:03d}Z"

    # -- New Relic --------------------------------------------------------------------------

    def newrelic(self, event: UserEvent) -> bytes:
        return self._json.encode(self.newrelic_event(event))

    def newrelic_event(self, event: UserEvent) -> dict[str, str | int]:
        user_full, directory, user_id = event.user_full, event.user_directory, event.user_id
        if self.scramble:
            user_full, directory, user_id = map(self._scrambled, (user_full, directory, user_id))
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

    def _scrambled(self, value: str) -> str:
        digest = self._scramble_cache.get(value)
        if digest is None:
            digest = scramble(value)
            _remember(self._scramble_cache, value, digest)
        return digest


def scramble(value: str) -> str:
    """16 hex digits of SHAKE-256: stable per user, not reversible."""
    return hashlib.shake_256(value.encode("utf-8")).hexdigest(8)


def _tag_pair(key: str, escaped_value: str) -> str:
    return f",{key}={escaped_value}" if escaped_value else ""


def _remember(cache: dict[str, str], key: str, value: str) -> None:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value
