"""What changed in the live session state since the writer's last publish (SPEC 3a).

The writer publishes a whole snapshot (`sessions.live`, shared/sessionlive.py) at start
and rarely after, and between them appends one `LiveDelta` per publish to `sessions.delta`:
length-prefixed msgpack frames, the first a `DeltaHeader` naming the snapshot they follow.
The supervisor applies the deltas to its own copy (senseflow/sessionmirror.py), so both
sides' cost follows what changed, not how many users the state holds.

What a delta holds, and why it is enough:
- `entries`: every user entry that changed. An event always sets its user's `last_seen_ns`
  to the state's clock and moves the entry to the end of its host's dict (the order expiry
  relies on), so the changed entries are each host's tail back to the previous publish's
  clock: found without any bookkeeping per event.
- `ended`: the ends numbered since. An entry leaves a host only by ending (Stop, expiry), and
  every end of a session (`app_id` None) is recorded, so those are the removals.
- `batches`: the session events of the spooled batches added since, as the workers encoded
  them (not encoded again), with `first_waiting_ns`: the writer's reorder buffer holds
  exactly the received events from that time on, so the reader keeps its own copy of the
  buffer and shows it applied, as the writer's published state always did.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import msgspec

from shared.sessions import Ended, SessionState, UserEntry

DELTA_FILE = "sessions.delta"
NOTHING_WAITS = -1

_LENGTH = struct.Struct("<I")


class DeltaHeader(msgspec.Struct, array_like=True):
    epoch: int
    """The publishing writer's (a restarted writer starts a new one)."""
    base_seq: int
    """The snapshot's `seq`: the deltas in this file are numbered from `base_seq + 1`."""


class ChangedEntry(msgspec.Struct, array_like=True, gc=False):
    host: str
    key: str
    entry: UserEntry


class Batch(msgspec.Struct, array_like=True, gc=False):
    latest_ns: int
    """Its latest event: a batch wholly before the reorder buffer need not be decoded."""
    events: msgspec.Raw
    """`EncodedBatch.sessions`: a msgpack array of `SessionEvent`."""


class LiveDelta(msgspec.Struct, array_like=True):
    seq: int
    published_ns: int
    clock_ns: int
    counters: dict[str, int]
    ended: list[Ended]
    ended_seq: int
    entries: list[ChangedEntry]
    """In last-seen order within each host."""
    batches: list[Batch]
    first_waiting_ns: int
    """`NOTHING_WAITS` when the reorder buffer is empty."""


class ReadDelta(msgspec.Struct, array_like=True):
    """A `LiveDelta` as the reader decodes it: each changed entry left encoded until it
    knows it is the latest of its user (a reader catching up on several deltas decodes a
    user who changed in each of them once)."""

    seq: int
    published_ns: int
    clock_ns: int
    counters: dict[str, int]
    ended: list[Ended]
    ended_seq: int
    entries: list[tuple[str, str, msgspec.Raw]]
    batches: list[Batch]
    first_waiting_ns: int


_ENCODER = msgspec.msgpack.Encoder()
_HEADER = msgspec.msgpack.Decoder(DeltaHeader)
_DELTA = msgspec.msgpack.Decoder(ReadDelta)
_ENTRY = msgspec.msgpack.Decoder(UserEntry)


def frame(message: DeltaHeader | LiveDelta) -> bytes:
    payload = _ENCODER.encode(message)
    return _LENGTH.pack(len(payload)) + payload


def split_frames(data: bytes) -> tuple[list[memoryview], int]:
    """The whole frames at the start of `data` (views, not copies), and how many bytes
    they take (a frame the writer is still appending stays for the next read)."""
    frames, offset, size, view = [], 0, len(data), memoryview(data)
    while offset + _LENGTH.size <= size:
        (length,) = _LENGTH.unpack_from(data, offset)
        end = offset + _LENGTH.size + length
        if end > size:
            break
        frames.append(view[offset + _LENGTH.size : end])
        offset = end
    return frames, offset


def decode_header(payload: memoryview) -> DeltaHeader:
    return _HEADER.decode(payload)


def decode_delta(payload: memoryview) -> ReadDelta:
    return _DELTA.decode(payload)


def decode_entry(raw: msgspec.Raw) -> UserEntry:
    return _ENTRY.decode(raw)


def changed_entries(state: SessionState, since_clock_ns: int) -> list[ChangedEntry]:
    """The entries an event touched at or after `since_clock_ns` (see the module doc)."""
    changed: list[ChangedEntry] = []
    for host, users in state.hosts.items():
        changed.extend(reversed(list(_tail(host, users, since_clock_ns))))
    return changed


def _tail(host: str, users: dict[str, UserEntry], since_ns: int) -> Iterator[ChangedEntry]:
    for key, entry in reversed(users.items()):
        if entry.last_seen_ns < since_ns:
            return
        yield ChangedEntry(host, key, entry)
