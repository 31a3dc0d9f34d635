"""The live session state as the writer publishes it for the supervisor (SPEC 3a).

The writer holds the state (workers/writer/sessions.py); the supervisor serves it
(`/api/sessions`, Prometheus, InfluxDB snapshots, MQTT summaries). The writer writes
`sessions.live` in its spool directory, whole, to a temporary file renamed into place, so
a reader sees one version or the next, never half. It holds the state and the events
still in the reorder buffer: the reader applies those to its own copy, so what it shows
lags the events only by the workers' flush and the publish interval, while the writer's
state keeps its exact receive-time order.

Since the deltas (shared/sessiondelta.py) this file is the snapshot they follow: written
at the writer's start and whenever the deltas since outweigh it, numbered (`epoch`, `seq`)
so the reader knows which deltas come after it.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from shared.sessions import Checkpoint, SessionEvent, SessionState

LIVE_FILE = "sessions.live"


class LiveSessions(msgspec.Struct, array_like=True):
    published_ns: int
    state: Checkpoint
    waiting: list[SessionEvent]
    epoch: int = 0
    """The writer's (0: a snapshot no deltas follow)."""
    seq: int = 0
    """The last delta this snapshot includes."""


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(LiveSessions)


class _LiveOut(msgspec.Struct, array_like=True):
    """`LiveSessions` as written: `waiting` may be the writer's bytes, spliced as they are."""

    published_ns: int
    state: Checkpoint
    waiting: list[SessionEvent] | msgspec.Raw
    epoch: int = 0
    seq: int = 0


def encode_live(
    state: SessionState,
    waiting: list[SessionEvent] | msgspec.Raw,
    now_ns: int,
    epoch: int = 0,
    seq: int = 0,
) -> bytes:
    return _ENCODER.encode(_LiveOut(now_ns, state.saved(), waiting, epoch, seq))


def decode_snapshot(data: bytes) -> LiveSessions:
    return _DECODER.decode(data)


def write_atomically(path: Path, data: bytes) -> None:
    """Private (0600: it names users) and never through a link planted in the directory."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
    descriptor = os.open(temporary, flags, 0o600)
    with open(descriptor, "wb") as out:
        out.write(data)
    os.replace(temporary, path)
