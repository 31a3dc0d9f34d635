"""Liveness (issue 11): heartbeats in the shared counter block, and the supervisor's kill
of a child that stopped beating. (tests/e2e/test_liveness.py does it to a real service.)"""

from __future__ import annotations

import multiprocessing
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from senseflow.liveness import kill_wedged, silent_for
from shared.config import Config
from shared.counters import SharedCounters, beat, last_beat, new_block
from shared.ipc import Channels, Flag, MessageChannel
from workers.process import Worker

CONTEXT = multiprocessing.get_context("spawn")
WAIT = 30.0


@dataclass
class Sleeper:
    """A child slot around a real process that never beats on its own."""

    name: str
    ready: bool = True
    counters: SharedCounters = field(default_factory=lambda: SharedCounters(new_block(CONTEXT)))
    started_at: float = 0.0
    process: subprocess.Popen[bytes] = field(
        default_factory=lambda: subprocess.Popen(["sleep", "60"])
    )

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def reap(self) -> None:
        self.process.wait(5)


@pytest.fixture
def sleepers() -> Iterator[list[Sleeper]]:
    made: list[Sleeper] = []
    yield made
    for sleeper in made:
        if sleeper.alive:
            sleeper.process.kill()
        sleeper.process.wait(5)


def test_only_a_ready_child_silent_past_the_timeout_is_killed(sleepers: list[Sleeper]) -> None:
    silent, beating, booting = Sleeper("worker-0"), Sleeper("worker-1"), Sleeper("writer")
    booting.ready = False
    sleepers.extend([silent, beating, booting])
    beat(beating.counters)
    now = last_beat(beating.counters) + 1  # one second after its beat
    assert silent_for(beating, now) == pytest.approx(1.0)
    assert silent_for(silent, now) > 5  # never beat: judged from its start (0 here)
    killed = kill_wedged(sleepers, timeout=5.0, now=now)
    assert killed == [silent]
    assert silent.process.returncode == -9  # SIGKILL
    assert beating.alive and booting.alive
    assert kill_wedged(sleepers, timeout=0.0, now=now + 1000) == []  # 0: the check is off


def test_a_restarted_child_is_not_judged_by_its_predecessors_beat(
    sleepers: list[Sleeper],
) -> None:
    child = Sleeper("worker-0")
    sleepers.append(child)
    beat(child.counters)  # the predecessor's last beat, in the slot's block
    child.started_at = last_beat(child.counters) + 100  # its successor started much later
    assert kill_wedged(sleepers, timeout=5.0, now=child.started_at + 1) == []


def test_a_worker_waiting_for_room_in_a_full_channel_keeps_beating() -> None:
    """Backpressure is not a wedge: the worker's send to a full writer channel goes on
    beating, so the supervisor does not kill it."""
    encoded = MessageChannel(64 * 1024)
    channels = Channels(
        raw=MessageChannel(64 * 1024),
        encoded=encoded,
        reports=MessageChannel(64 * 1024),
        stop=Flag(CONTEXT),
    )
    worker = Worker(Config(), channels, 0, SharedCounters(new_block(CONTEXT)))
    message = b"x" * 1000
    while encoded.send_nowait(message):  # the writer takes nothing: the channel fills
        pass
    sender = threading.Thread(target=worker.send, args=(message,))
    sender.start()
    try:
        first = last_beat(worker.counters)
        deadline = time.monotonic() + WAIT
        while last_beat(worker.counters) <= first:  # it beats while it waits
            assert time.monotonic() < deadline, "no heartbeat while blocked in send"
            time.sleep(0.05)
        assert sender.is_alive()  # still waiting for room
    finally:
        while encoded.receive(0.0) is not None:  # the writer takes everything
            pass
        sender.join(WAIT)
        for channel in (channels.raw, channels.encoded, channels.reports):
            channel.close()
    assert not sender.is_alive()
