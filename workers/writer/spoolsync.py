"""The spool's fsync timer (policy `interval`), which also saves the cursors: it runs only
while the spool changes, so that a writer without traffic does not wake up for nothing.
The fsync and the cursor file's write, rename and fsyncs run in a thread: a slow disk
(seconds on a loaded machine) holds up neither the channel nor any sink's deliveries."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from workers.writer.spool import Spool

Sleep = Callable[[float], Awaitable[None]]


async def sync_while_changing(spool: Spool, interval: float, sleep: Sleep = asyncio.sleep) -> None:
    """`spool.sync()` `interval` seconds after a change (an append, a cursor moved), and
    again while changes keep coming; waits without a timer while there are none."""
    changed = asyncio.Event()
    changed.set()  # what happened before we started (replay, counting at start)
    spool.on_change = changed.set
    while True:
        await changed.wait()
        changed.clear()
        await sleep(interval)
        job = spool.sync_job()
        if job is not None:
            await asyncio.to_thread(job)
