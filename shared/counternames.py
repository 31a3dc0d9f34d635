"""Every counter name, in one place (SPEC 4): constants and the functions that build keys.

The runtime code counts only through these names; the Prometheus metrics
(senseflow/metrics.py), the summary line (shared/counters.py), the InfluxDB queue metrics
(senseflow/influxstats.py) and the counter table of docs/OPERATIONS.md (checked by
tests/unit/test_counternames.py) are derived from them.

Names are dotted. Per run:

    received = events + invalid + excluded + dropped (minus kernel and destination_full)
    events + recovered.D = written.D + failed.D + dropped.destination_full.D + still spooled

Names starting with `HIDDEN` are a process's own bookkeeping in its shared counter block:
never summed, shown or exported.
"""

from __future__ import annotations

# -- datagrams and events ----------------------------------------------------------------------

RECEIVED = "received"
"""UDP datagrams read from the socket."""
QUEUED = "queued"
"""Datagrams handed to the workers."""
EVENTS = "events"
"""Valid user events parsed by the workers."""
EXCLUDED = "excluded"
"""Valid events of a user in `userEvents.excludeUser`."""
INVALID = "invalid"
INVALID_PREFIX = INVALID + "."
DROPPED = "dropped"
SOCKET_ERRORS = "errors.socket"
"""Errors the reader's socket reported (not datagrams: nothing was read)."""

DROP_REASONS: tuple[str, ...] = (
    "too_large",
    "source_not_allowed",
    "rate_limited",
    "queue_full",
    "kernel",
    "worker_crash",
    "spool_corrupt",
)
"""Why a datagram was dropped before it became an event (`dropped.<reason>`); also
`spool_corrupt`, spool *records* that no longer read back (not in the `received` balance)."""


def invalid(reason: str) -> str:
    """A datagram that is not a user event (workers/parse.py INVALID_REASONS)."""
    return INVALID_PREFIX + reason


def dropped(reason: str) -> str:
    return f"{DROPPED}.{reason}"


DROPPED_TOO_LARGE = dropped("too_large")
DROPPED_SOURCE_NOT_ALLOWED = dropped("source_not_allowed")
DROPPED_RATE_LIMITED = dropped("rate_limited")
DROPPED_QUEUE_FULL = dropped("queue_full")
DROPPED_KERNEL = dropped("kernel")
DROPPED_WORKER_CRASH = dropped("worker_crash")
DROPPED_SPOOL_CORRUPT = dropped("spool_corrupt")
SPOOL_MISMATCH = "spool_mismatch"
SPOOL_WRITE_ERRORS = "spool.write_errors"
"""Spool appends that failed (disk full, EIO) and were retried."""

# -- per destination ---------------------------------------------------------------------------

WRITTEN = "written"
FAILED = "failed"
RETRIES = "retries"
RECOVERED = "recovered"
DESTINATION_FULL = "destination_full"
PER_DESTINATION: tuple[str, ...] = (WRITTEN, FAILED, RETRIES, RECOVERED)
"""Prefixes of the `<prefix>.<destination>` counters."""


def written(destination: str) -> str:
    """Events the destination acknowledged."""
    return f"{WRITTEN}.{destination}"


def failed(destination: str) -> str:
    """Events the destination rejected for good."""
    return f"{FAILED}.{destination}"


def retries(destination: str) -> str:
    """Failed attempts that were retried."""
    return f"{RETRIES}.{destination}"


def recovered(destination: str) -> str:
    """Events a previous run left in the spool, delivered by this run."""
    return f"{RECOVERED}.{destination}"


def destination_full(destination: str) -> str:
    """Events given up for one destination only (its spooled backlog passed the bound):
    not part of the `dropped` that balances `received`."""
    return f"{DROPPED}.{DESTINATION_FULL}.{destination}"


def spool_mismatch(destination: str) -> str:
    """Events spooled for a different destination, skipped with `spool.discardMismatch`:
    not part of the `dropped` that balances `received`."""
    return f"{DROPPED}.{SPOOL_MISMATCH}.{destination}"


SESSIONS_UNMATCHED_STOP = "sessions.unmatched_stop"
"""A Stop session for a user with no session on that host (SPEC 3a rule 2)."""
SESSIONS_IMPLICIT_START = "sessions.implicit_start"
"""An Open connection of a user with no session there: it gets one (rule 3)."""
SESSIONS_UNMATCHED_CLOSE = "sessions.unmatched_close"
"""A Close connection with no open connection to close (rule 4)."""
SESSIONS_EXPIRED = "sessions.expired"
"""A user removed from a host after `sessions.maxIdle` without an event (rule 5)."""
SESSION_OUTCOMES: tuple[str, ...] = (
    SESSIONS_UNMATCHED_STOP,
    SESSIONS_UNMATCHED_CLOSE,
    SESSIONS_IMPLICIT_START,
    SESSIONS_EXPIRED,
)
"""Counted in the writer's session state and checkpointed with it (not in a shared
counter block): exact across restarts, cumulative over the spool's lifetime."""

MQTT_REPUBLISHED = "mqtt.republished"
NEWRELIC_SPLITS = "newrelic.splits"
NATS_DUPLICATES = "nats.duplicates"
"""Publishes JetStream acknowledged as duplicates (`Nats-Msg-Id` seen in its window)."""
NATS_REPUBLISHED = "nats.republished"
"""Publishes sent again: unacknowledged after a reconnect, an error or `ackTimeout`."""


def newrelic_written(account: str) -> str:
    return f"newrelic.written.{account}"


def newrelic_failed(account: str) -> str:
    return f"newrelic.failed.{account}"


# -- hidden bookkeeping in a child's shared counter block --------------------------------------

HIDDEN = "_"
HEARTBEAT = "_heartbeat"
"""Every child: monotonic time (ms) of its event loop's last beat (senseflow/liveness.py)."""
WORKER_NUMBER = "_number"
"""A worker slot: the number of its next send to the writer."""
WORKER_HELD = "_held"
"""A worker slot: datagrams it has taken and not yet sent on."""
SPOOLED = "_spooled"
"""The writer: the first spool sequence number whose record this run has not counted yet."""


def cursor(destination: str) -> str:
    """The writer: a destination's spool cursor."""
    return f"_cursor.{destination}"


def limbo(destination: str) -> str:
    """The writer: events given up by the spool while the sink held them, not yet acked."""
    return f"_limbo.{destination}"


def seen(worker: int) -> str:
    """The writer: one past the last send number taken from this worker slot."""
    return f"_seen.{worker}"


def seen_datagrams(worker: int) -> str:
    """The writer: datagrams in that last send."""
    return f"_seen_datagrams.{worker}"


# -- the documented table ----------------------------------------------------------------------

DEST, REASON, ACCOUNT = "<dest>", "<reason>", "<account>"
DOCUMENTED: tuple[str, ...] = (
    RECEIVED,
    QUEUED,
    EVENTS,
    EXCLUDED,
    invalid(REASON),
    *(dropped(reason) for reason in DROP_REASONS),
    written(DEST),
    failed(DEST),
    destination_full(DEST),
    spool_mismatch(DEST),
    SPOOL_WRITE_ERRORS,
    retries(DEST),
    recovered(DEST),
    MQTT_REPUBLISHED,
    newrelic_written(ACCOUNT),
    newrelic_failed(ACCOUNT),
    NEWRELIC_SPLITS,
    NATS_DUPLICATES,
    NATS_REPUBLISHED,
    SOCKET_ERRORS,
    *SESSION_OUTCOMES,
)
"""Every visible counter, as the counter table of docs/OPERATIONS.md names it."""
