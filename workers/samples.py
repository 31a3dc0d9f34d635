"""A sample of an invalid datagram for the rate-limited log line, found only when logged."""

from __future__ import annotations

from shared.events import RawBatch
from workers.parse import parse_datagram

SAMPLE_BYTES = 200


class InvalidSample:
    """Formats as `<reason>: <first SAMPLE_BYTES bytes of the datagram>`.

    Passed as a logging argument: `logging` calls `__str__` only for a line it emits, so a
    suppressed line (RateLimitedLog) costs no re-parse.
    """

    def __init__(self, raw: RawBatch) -> None:
        self.raw = raw

    def __str__(self) -> str:
        for datagram in self.raw.datagrams:
            reason = parse_datagram(datagram, 0)
            if isinstance(reason, str):
                return f"{reason}: {truncated(datagram)}"
        return "not found"


def truncated(datagram: bytes) -> str:
    """The start of a datagram as a Python bytes literal (control bytes stay visible)."""
    head = repr(datagram[:SAMPLE_BYTES])
    more = len(datagram) - SAMPLE_BYTES
    return head + (f" ... ({more} more bytes)" if more > 0 else "")
