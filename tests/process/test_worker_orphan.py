"""A worker blocked on a full channel exits once its supervisor is gone (issue 12 §4)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from multiprocessing.connection import Connection
from pathlib import Path

import workers.process
from shared.config import Config
from shared.counters import new_block
from shared.events import RAW_ENCODER, RawBatch
from shared.ipc import Channels, Flag, MessageChannel, drain_reports

DATAGRAM = b"/qseow-proxy-session/;sense1;Start session;LAB;user1;Proxy;/hub;Start session"


def supervisor_stand_in(answer: Connection) -> None:
    """Starts one worker, fills the worker -> writer channel (no writer reads it), feeds
    the worker a batch, tells the test the worker's pid once the worker took the batch,
    and waits to be killed."""
    context = multiprocessing.get_context("spawn")
    channels = Channels(
        raw=MessageChannel(1 << 20),
        encoded=MessageChannel(64 * 1024),
        reports=MessageChannel(1 << 20),
        stop=Flag(context),
    )
    while channels.encoded.send_nowait(b"x" * 1024):
        pass
    worker = context.Process(
        target=workers.process.run,
        args=(Config(), channels, 0, os.getpid(), new_block(context)),
        name="worker-0",
    )
    worker.start()
    assert drain_reports(channels.reports, 60), "the worker did not start"
    channels.raw.send(RAW_ENCODER.encode(RawBatch([DATAGRAM], [time.time_ns()])))
    while channels.raw.pending_bytes():  # taken: the worker now waits for room to send
        time.sleep(0.05)
    answer.send(worker.pid)
    time.sleep(3600)


def is_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie has exited; its new parent reaps it


def test_a_worker_blocked_on_a_full_channel_exits_when_its_supervisor_dies() -> None:
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    parent = context.Process(target=supervisor_stand_in, args=(send,))
    parent.start()
    worker_pid = 0
    try:
        assert receive.poll(60), "the stand-in did not start its worker"
        worker_pid = receive.recv()
        os.kill(parent.pid or 0, signal.SIGKILL)
        parent.join(10)
        deadline = time.monotonic() + 30
        while not is_gone(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert is_gone(worker_pid), "the worker outlived its supervisor"
    finally:
        if parent.is_alive():
            parent.kill()
            parent.join(5)
        if worker_pid and not is_gone(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
        receive.close()
        send.close()
