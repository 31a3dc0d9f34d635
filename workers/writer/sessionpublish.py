"""The writer's side of `shared/sessionlive.py`: publish the session state when it moved.

At most every `PUBLISH_SECONDS` (the live view must follow an event within 2 s), and never
while nothing changed (an idle service writes nothing). Encoding grows with the state
(about 50 ms for 100,000 sessions, benchmarks/RESULTS.md), so the pause after a publish is
at least `COST_FACTOR` times what it cost: the publisher never takes more than about a
tenth of the writer's time, whatever the size.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from shared.logs import RateLimitedLog
from shared.sessionlive import LIVE_FILE, encode_live, write_atomically
from workers.writer.sessions import SessionKeeper

log = logging.getLogger("senseflow.sessions")

PUBLISH_SECONDS = 0.5
COST_FACTOR = 10


class SessionPublisher:
    def __init__(self, keeper: SessionKeeper) -> None:
        self.keeper = keeper
        self.path = Path(keeper.spool.directory) / LIVE_FILE
        self.published = -1
        self.pause = PUBLISH_SECONDS
        self.failures = RateLimitedLog(log, interval=60.0)

    def publish(self) -> bool:
        """Write the state if it changed since the last publish; True when written."""
        keeper = self.keeper
        if keeper.generation == self.published:
            return False
        started = time.perf_counter()
        generation = keeper.generation
        data = encode_live(keeper.state, keeper.waiting, time.time_ns())
        try:
            write_atomically(self.path, data)
        except OSError as exc:  # the HTTP view goes stale; the state itself is unharmed
            self.failures.warning("sessions: cannot publish %s: %s", self.path, exc)
            return False
        self.published = generation
        self.pause = max(PUBLISH_SECONDS, COST_FACTOR * (time.perf_counter() - started))
        return True

    async def run(self) -> None:
        while True:
            self.publish()
            await asyncio.sleep(self.pause)
