"""The spool's fsync / cursor timer runs only while the spool changes (issue 15: no
wake-ups without traffic). The timer's sleep is injected: it returns at once, so a timer
that kept running would be seen spinning."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from workers.writer.spool import CURSORS, Spool
from workers.writer.spoolsync import sync_while_changing


class Timer:
    def __init__(self) -> None:
        self.rounds = 0

    async def sleep(self, seconds: float) -> None:
        assert seconds == 1.0
        self.rounds += 1
        await asyncio.sleep(0)


async def let_run() -> None:
    for _ in range(50):
        await asyncio.sleep(0)


def saved_cursors(directory: Path) -> dict[str, int]:
    cursors: dict[str, int] = json.loads((directory / CURSORS).read_text())
    return cursors


def test_the_timer_runs_after_changes_only_and_saves_them(tmp_path: Path) -> None:
    spool = Spool(tmp_path, ["influxdb"])
    timer = Timer()

    async def scenario() -> None:
        task = asyncio.create_task(sync_while_changing(spool, 1.0, timer.sleep))
        try:
            await let_run()
            assert timer.rounds == 1  # once for what came before it started, then idle

            seq = spool.append(b"x", events=1)
            await let_run()
            assert timer.rounds == 2

            spool.ack("influxdb", seq, 1, 0)
            spool.persist()  # the cursor moved: saved on the timer (policy `interval`)
            await let_run()
            assert timer.rounds == 3
            assert saved_cursors(tmp_path) == {"influxdb": seq + 1}

            await let_run()
            assert timer.rounds == 3  # no traffic: no more rounds
        finally:
            task.cancel()

    asyncio.run(scenario())
    spool.close()
