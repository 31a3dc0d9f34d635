"""What every destination offers the writer: `start`, `write_batch`, `flush`, `close`."""

from __future__ import annotations

from typing import Protocol

from shared.events import EncodedBatch


class DestinationUnreachable(Exception):
    """A destination could not be reached at start."""


class Sink(Protocol):
    name: str

    async def start(self) -> None:
        """Connect and check the destination; raise DestinationUnreachable if it cannot."""

    async def write_batch(self, batch: EncodedBatch) -> None:
        """Take a batch; waits (backpressure) only while the sink's own bound is reached."""

    async def flush(self) -> None:
        """Send everything taken so far and wait until it is acknowledged."""

    async def close(self) -> None:
        """Flush, then release connections."""
