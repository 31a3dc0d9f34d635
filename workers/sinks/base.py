"""What every destination offers the writer: `start`, `write_batch`, `flush`, `close`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from shared.events import EncodedBatch


class DestinationUnreachable(Exception):
    """A destination could not be reached at start."""


Acknowledge = Callable[[list[int]], None]
"""Told the spool sequence numbers of batches a destination has delivered completely."""


def ignore_acks(seqs: list[int]) -> None:
    """The acknowledgement callback of a sink used without a spool."""


class Sink(Protocol):
    name: str
    on_ack: Acknowledge

    async def start(self) -> None:
        """Connect and check the destination; raise DestinationUnreachable if it cannot."""

    async def write_batch(self, batch: EncodedBatch, seq: int = -1) -> None:
        """Take a batch; waits (backpressure) only while the sink's own bound is reached.

        Once every event of the batch is delivered (or counted failed), `on_ack([seq])` is
        called; acknowledgements come in any order."""

    async def flush(self) -> None:
        """Send everything taken so far and wait until it is acknowledged."""

    async def close(self) -> None:
        """Flush, then release connections."""
