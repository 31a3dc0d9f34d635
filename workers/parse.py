"""The two wire formats of Qlik Sense user-event datagrams (SPEC 1).

`parse_datagram` returns a `UserEvent`, or the reason (a short snake_case string) why the
datagram is invalid. It never raises on any input.
"""

from __future__ import annotations

import re

from shared.events import UserEvent

SOURCE_SESSION = "qseow-proxy-session"
SOURCE_CONNECTION = "qseow-proxy-connection"
SOURCE_SHORT = "proxy-user-event"

CAP_NAME = 100
CAP_ORIGIN = 200
CAP_CONTEXT = 500
CAP_MESSAGE = 1000

INVALID_REASONS = (
    "unknown_source",
    "too_few_fields",
    "unknown_action",
    "missing_action",
    "missing_host",
    "missing_user_directory",
    "missing_user_id",
)

BUTLER_COMMANDS = frozenset(
    {"Start session", "Stop session", "Open connection", "Close connection"}
)

# Format B: the action is the start of the message.
SHORT_ACTIONS = (
    ("Start session", "Start session"),
    ("Stop session", "Stop session"),
    ("Opening connection", "Open connection"),
    ("Closing connection", "Close connection"),
    ("Open connection", "Open connection"),
    ("Close connection", "Close connection"),
)

# U+0000-U+001F and U+007F; none of them is `;`, so stripping before splitting is exact.
# Line breaks are kept in the message alone (it is free text, and operators want it as
# sent); every other field loses them too.
_LINE_BREAKS = dict.fromkeys([0x0A, 0x0D])
_CONTROL_BYTES = bytes(c for c in [*range(0x20), 0x7F] if c not in _LINE_BREAKS)
_CONTROL_CHARS = re.compile("[\x00-\x09\x0b\x0c\x0e-\x1f\x7f]")
_SHORT_USER = re.compile(r"'([^'\\]*)\\([^']*)'")


def parse_datagram(data: bytes, received_ns: int) -> UserEvent | str:
    text = _decode_clean(data)
    head = text.partition(";")[0]
    source = head.strip().strip("/").lower()
    if source in (SOURCE_SESSION, SOURCE_CONNECTION):
        return _parse_butler(text, source, received_ns)
    if source == SOURCE_SHORT:
        return _parse_short(text, source, received_ns)
    return "unknown_source"


def _parse_butler(text: str, source: str, received_ns: int) -> UserEvent | str:
    fields = text.split(";", 7)
    if len(fields) < 8:
        return "too_few_fields"
    if _has_line_break(text, len(fields[7])):
        fields[1:7] = [f.translate(_LINE_BREAKS) for f in fields[1:7]]
    _, host, command, directory, user_id, origin, context, message = fields
    command = command[:CAP_NAME]
    if command not in BUTLER_COMMANDS:
        return "unknown_action" if command.strip() else "missing_action"
    return _build(source, host, command, directory, user_id, origin, context, message, received_ns)


def _parse_short(text: str, source: str, received_ns: int) -> UserEvent | str:
    fields = text.split(";", 4)
    if len(fields) < 5:
        return "too_few_fields"
    if _has_line_break(text, len(fields[4])):
        fields[1:4] = [f.translate(_LINE_BREAKS) for f in fields[1:4]]
    _, host, subsystem, context, message = fields
    flat_message = _without_line_breaks(message)
    command = _short_action(flat_message)
    if command is None:
        return "unknown_action"
    match = _SHORT_USER.search(flat_message)
    directory, user_id = match.groups() if match else ("", "")
    return _build(
        source, host, command, directory, user_id, subsystem, context, message, received_ns
    )


def _decode_clean(data: bytes) -> str:
    """The datagram as text, control characters but line breaks removed.

    Checked on the bytes first (C speed; nearly every datagram is clean): in UTF-8 these
    characters are exactly these single bytes, and `replace` never swallows a byte < 0x80.
    """
    text = data.decode("utf-8", "replace")
    if len(data.translate(None, _CONTROL_BYTES)) != len(data):
        text = _CONTROL_CHARS.sub("", text)
    return text


def _without_line_breaks(text: str) -> str:
    if "\n" in text or "\r" in text:
        return text.translate(_LINE_BREAKS)
    return text


def _has_line_break(text: str, message_length: int) -> bool:
    """Whether a line break stands anywhere before the message (rare: checked, not assumed)."""
    end = len(text) - message_length
    return text.find("\n", 0, end) >= 0 or text.find("\r", 0, end) >= 0


def _short_action(message: str) -> str | None:
    start = message.lstrip()
    for prefix, action in SHORT_ACTIONS:
        if start.startswith(prefix):
            return action
    return None


def _build(
    source: str,
    host: str,
    command: str,
    directory: str,
    user_id: str,
    origin: str,
    context: str,
    message: str,
    received_ns: int,
) -> UserEvent | str:
    host = host[:CAP_NAME]
    directory = directory[:CAP_NAME]
    user_id = user_id[:CAP_NAME]
    if not host.strip():
        return "missing_host"
    if not directory.strip():
        return "missing_user_directory"
    if not user_id.strip():
        return "missing_user_id"
    return UserEvent(
        source,
        host,
        command,
        directory,
        user_id,
        origin[:CAP_ORIGIN],
        context[:CAP_CONTEXT],
        message[:CAP_MESSAGE],
        received_ns,
    )
