"""Liveness (issue 11): a child that is alive but stopped working is killed and replaced.

A worker is SIGSTOPped under load: it stops beating its heartbeat, so past
`senseflow.heartbeatTimeout` the supervisor kills it (SIGKILL) and starts another. What
it held is counted lost, everything else arrives in InfluxDB, and the counters add up.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from senseflow.commands.corpus import make_corpus
from tests.e2e.harness import PacedSender, Service, influx_count, udp_port, write_config
from tests.e2e.test_resilience import assert_counters_add_up
from tests.localservers import InfluxServer

pytestmark = pytest.mark.slow

HEARTBEAT_TIMEOUT = 2


@pytest.fixture
def running(
    tmp_path: Path, influx_server: InfluxServer, influx_db: str
) -> Iterator[tuple[Service, int]]:
    """The service (2 workers) with a short heartbeat timeout, and its UDP port."""
    port = udp_port()
    config = write_config(
        tmp_path / "config.yaml",
        port,
        influx_server,
        influx_db,
        heartbeatTimeout=HEARTBEAT_TIMEOUT,
    )
    service = Service(config, tmp_path / "senseflow.log")
    try:
        service.wait_running()
        yield service, port
    finally:
        service.stop()


def test_a_stopped_worker_is_killed_replaced_and_nothing_is_lost(
    running: tuple[Service, int], influx_server: InfluxServer, influx_db: str
) -> None:
    service, port = running
    datagrams = make_corpus(30_000, seed=41)
    sender = PacedSender(port, datagrams, rate=5000)
    sender.start()
    sender.wait_sent(10_000)
    (worker,) = service.child_pids("worker-0")
    os.kill(worker, signal.SIGSTOP)  # alive, not dead: only its silence tells
    service.wait_for_log(f"worker-0 (pid {worker}) sent no heartbeat", timeout=60)
    service.wait_for_log(f"worker-0 (pid {worker}) died: killed by SIGKILL")
    service.wait_for_log("started worker-0", after=service.log.index(f"(pid {worker}) died"))
    sender.join()
    counters = service.wait_counter("written.influxdb", 1)
    deadline = time.monotonic() + 60
    while counters["written.influxdb"] + counters.get("dropped.worker_crash", 0) < len(datagrams):
        assert time.monotonic() < deadline, counters
        time.sleep(0.5)
        counters = service.counters()
    written = influx_count(influx_server, influx_db)
    assert service.terminate() == 0
    counters = service.counters()
    assert_counters_add_up(counters, len(datagrams))  # received = events + invalid + ...
    lost = counters.get("dropped.worker_crash", 0)
    assert lost <= 500  # at most the raw batch it was parsing when stopped
    assert written == counters["written.influxdb"] == counters["events"] == len(datagrams) - lost
    assert len(service.child_pids("worker-0")) == 2
    print(f"stopped worker replaced: {written} of {len(datagrams)} written, {lost} counted lost")
