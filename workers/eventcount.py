"""Butler SOS's event counts, counted where the host is parsed: in the workers.

Butler SOS (`src/lib/udp_handlers/user_events/message-event.js`, `src/lib/udp-event.js`)
counts every user-event datagram per (source, host, subsystem) before it excludes users:
`source` is the message type without slashes, lower case (`qseow-proxy-session`), `host`
the host field and `subsystem` the origin field (format B's subsystem, which we store as
the origin). A datagram it does not recognise counts as ('Unknown', 'Unknown',
'Unknown'); we count every invalid datagram that way, which costs no second parse.

Bounded: at most MAX_KEYS distinct keys per report interval; past that, events count
under OVERFLOW_KEY (a flood of forged host names cannot grow memory).
"""

from __future__ import annotations

UNKNOWN_KEY = ("Unknown", "Unknown", "Unknown")
OVERFLOW_KEY = ("other", "other", "other")
MAX_KEYS = 1000


class EventCounts:
    """(source, host, subsystem) -> count: of the batch in hand, and of the batches taken.

    A worker re-processes a batch in halves when its encoding is too large for the
    channel; counts therefore go to `batch` first, `begin()` (at the start of every batch)
    forgets an abandoned one, and `commit()` (once the worker has accepted the batch)
    moves them to the totals that `take()` hands over.
    """

    __slots__ = ("batch", "totals")

    def __init__(self) -> None:
        self.batch: dict[tuple[str, str, str], int] = {}
        self.totals: dict[tuple[str, str, str], int] = {}

    def begin(self) -> None:
        if self.batch:
            self.batch = {}

    def add(self, source: str, host: str, subsystem: str) -> None:
        key = (source, host, subsystem)
        self.batch[key] = self.batch.get(key, 0) + 1

    def add_unknown(self) -> None:
        self.batch[UNKNOWN_KEY] = self.batch.get(UNKNOWN_KEY, 0) + 1

    def commit(self) -> None:
        totals = self.totals
        for key, count in self.batch.items():
            if key not in totals and len(totals) >= MAX_KEYS:
                key = OVERFLOW_KEY
            totals[key] = totals.get(key, 0) + count
        self.batch = {}

    def take(self) -> dict[tuple[str, str, str], int]:
        totals, self.totals = self.totals, {}
        return totals


def event_counts_enabled(config: object) -> bool:
    """Butler SOS counts when `qlikSenseEvents.eventCount.enable`, and writes the counts
    when InfluxDB and `qlikSenseEvents.influxdb.enable` are on too: no use counting else."""
    from shared.config import Config

    assert isinstance(config, Config)
    butler = config.butler
    events = butler.qlik_sense_events
    enabled = events.event_count.enable and events.influxdb.enable
    return bool(enabled and butler.influxdb_config.enable)
