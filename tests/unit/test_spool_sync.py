"""The spool's fsync / cursor timer runs only while the spool changes (issue 15: no
wake-ups without traffic). The timer's sleep is injected: it returns at once, so a timer
that kept running would be seen spinning."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path

from workers.writer.spool import Spool
from workers.writer.spoolcursors import CURSORS
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


async def until(condition: Callable[[], bool]) -> None:
    """The sync's file work runs in a thread: wait (bounded) until it shows."""
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.005)


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
            await until(lambda: saved_cursors(tmp_path) == {"influxdb": seq + 1})
            assert timer.rounds == 3

            await let_run()
            assert timer.rounds == 3  # no traffic: no more rounds
        finally:
            task.cancel()

    asyncio.run(scenario())
    spool.close()


class SlowDisk(Spool):
    """A spool whose fsync and cursor save take until the test lets them finish."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, ["mqtt"])
        self.release = threading.Event()
        self.syncing = threading.Event()
        self.released_in_time: list[bool] = []  # per sync

    def _sync_files(self, fd: int, snapshot: tuple[int, bytes] | None) -> None:
        self.syncing.set()
        # Released by a coroutine: only if the loop runs while we wait here.
        self.released_in_time.append(self.release.wait(5))
        super()._sync_files(fd, snapshot)


def test_a_slow_fsync_holds_up_nothing_in_the_loop(tmp_path: Path) -> None:
    """The fsync and the cursor save run in a thread: while the disk takes its time, the
    loop keeps taking batches and delivering (issue 15: the MQTT path must not wait behind
    spool writes). Run in the loop's thread, the sync would block the loop until released."""
    spool = SlowDisk(tmp_path)
    timer = Timer()

    async def scenario() -> None:
        task = asyncio.create_task(sync_while_changing(spool, 1.0, timer.sleep))
        try:
            seq = spool.append(b"x", events=1)
            async with asyncio.timeout(10):
                while not spool.syncing.is_set():
                    await asyncio.sleep(0)  # the loop runs while the disk is busy
            for _ in range(100):
                await asyncio.sleep(0)
            spool.ack("mqtt", seq, 1, 0)
            spool.persist()
            spool.release.set()
            await until(lambda: saved_cursors(tmp_path) == {"mqtt": seq + 1})
        finally:
            task.cancel()

    asyncio.run(scenario())
    spool.close()
    assert spool.released_in_time and all(spool.released_in_time)


def test_an_older_cursor_snapshot_never_overwrites_a_newer_save(tmp_path: Path) -> None:
    """A sync thread late with its snapshot (taken before the cursor moved) does not put
    back the cursor that close() saved meanwhile."""
    spool = Spool(tmp_path, ["influxdb"])
    seq = spool.append(b"x", events=1)
    spool.ack("influxdb", seq, 1, 0)
    spool.persist()
    late = spool.sync_job()  # holds the snapshot {influxdb: 1}
    assert late is not None
    seq = spool.append(b"y", events=1)
    spool.ack("influxdb", seq, 1, 0)
    spool.close()  # saves {influxdb: 2}
    late()
    assert saved_cursors(tmp_path) == {"influxdb": 2}
