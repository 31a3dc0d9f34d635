"""Fan-out to the workers: one shared channel that every worker takes batches from, so a
worker that is descheduled (here: SIGSTOPped) holds at most the batch it had; the others
take every batch the readers hand over meanwhile, nothing is dropped, and the stopped one
carries on where it was when it runs again (issue 15: more workers never a trap)."""

from __future__ import annotations

import os
import signal

import pytest

from senseflow.commands.corpus import make_corpus
from tests.e2e.conftest import StartService
from tests.e2e.harness import PacedSender, influx_count
from tests.e2e.test_resilience import assert_counters_add_up
from tests.localservers import InfluxServer

pytestmark = pytest.mark.slow

RATE = 2000
STOPPED_FOR = 4000
"""Datagrams sent while worker-0 is stopped (2 s at RATE)."""
BATCH = 500
"""`readerBatchSize` (default): the most a worker holds."""


def test_a_stopped_worker_stalls_nothing_while_the_other_has_room(
    start_service: StartService, influx_server: InfluxServer, influx_db: str
) -> None:
    running = start_service("--workers", "2", mqtt=False)
    (stopped,) = running.child_pids("worker-0")
    datagrams = make_corpus(10_000, seed=15)
    sender = PacedSender(running.udp_port, datagrams, rate=RATE)  # type: ignore[attr-defined]
    sender.start()
    sender.wait_sent(2000)
    os.kill(stopped, signal.SIGSTOP)
    try:
        before = running.counters()
        sent_before = sender.sent
        sender.wait_sent(sent_before + STOPPED_FOR)
        # Still stopped: worker-1 alone turns what was read meanwhile into events (with
        # batches dealt out in turn, half of them would wait for worker-0). It lags the
        # sender by at most what worker-0 held and the reader's open batch.
        expected = before.get("events", 0) + STOPPED_FOR - 2 * BATCH
        during = running.wait_counter("events", expected, timeout=30)
        assert during.get("dropped.queue_full", 0) == 0, during
        assert stopped_state(stopped) == "T"  # it really was stopped all along
    finally:
        os.kill(stopped, signal.SIGCONT)
    sender.join()
    running.wait_counter("written.influxdb", len(datagrams), timeout=60)
    assert running.terminate() == 0
    counters = running.counters()
    assert_counters_add_up(counters, len(datagrams))
    assert counters["dropped"] == 0, counters
    assert counters["events"] == len(datagrams)  # the corpus has no invalid datagram
    assert counters["written.influxdb"] == counters["events"]
    assert influx_count(influx_server, influx_db) == counters["events"]
    assert (stopped,) == tuple(running.child_pids("worker-0"))  # not restarted: same process


def stopped_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0]
