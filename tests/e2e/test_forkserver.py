"""`startMethod: forkserver`: children forked from a preloaded server, restarted after a
SIGKILL with exact counts, and gone when the supervisor is (they watch it by pidfd)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from senseflow.commands.corpus import make_corpus
from tests.e2e.conftest import StartService
from tests.e2e.harness import PacedSender, influx_count
from tests.e2e.test_resilience import assert_counters_add_up
from tests.localservers import InfluxServer

pytestmark = pytest.mark.slow


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_children_killed_under_load_are_forked_again_and_counts_stay_exact(
    start_service: StartService, influx_server: InfluxServer, influx_db: str
) -> None:
    running = start_service(mqtt=False, startMethod="forkserver")
    supervisor = running.process.pid
    (worker,) = running.child_pids("worker-0")
    assert parent_of(worker) != supervisor  # forked by the fork server, not spawned
    port = running.udp_port  # type: ignore[attr-defined]
    datagrams = make_corpus(12_000, seed=31)
    sender = PacedSender(port, datagrams, rate=3000)
    sender.start()
    for step, victim in enumerate(["worker-0", "writer"]):
        sender.wait_sent(3000 * (step + 1))
        pid = running.child_pids(victim)[-1]
        os.kill(pid, signal.SIGKILL)
        running.wait_for_log(f"{victim} (pid {pid}) died: killed by SIGKILL")
        running.wait_for_log(f"started {victim}", after=running.log.index(f"(pid {pid}) died"))
    sender.join()
    counters = running.wait_counter("events", 1)
    deadline = time.monotonic() + 40
    while (
        counters["events"] + counters.get("dropped.worker_crash", 0) < len(datagrams)
        or counters.get("written.influxdb", 0) < counters["events"]
    ):
        assert time.monotonic() < deadline, counters
        time.sleep(0.5)
        counters = running.counters()
    assert running.terminate() == 0
    counters = running.counters()
    assert_counters_add_up(counters, len(datagrams))
    events = counters["events"]
    assert events == len(datagrams) - counters.get("dropped.worker_crash", 0)
    assert counters["written.influxdb"] == events == influx_count(influx_server, influx_db)


def test_children_exit_when_the_supervisor_is_killed(start_service: StartService) -> None:
    running = start_service(mqtt=False, startMethod="forkserver")
    children = [
        pid
        for name in ("reader-0", "worker-0", "worker-1", "writer")
        for pid in running.child_pids(name)
    ]
    assert all(alive(pid) for pid in children)
    os.kill(running.process.pid, signal.SIGKILL)
    running.process.wait(10)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in children):
        assert time.monotonic() < deadline, [pid for pid in children if alive(pid)]
        time.sleep(0.1)


def test_a_killed_fork_server_takes_no_child_along_unseen(
    start_service: StartService, influx_server: InfluxServer, influx_db: str
) -> None:
    """The fork server reports its children's exits; killed, it makes them all look dead.
    The supervisor then makes sure they are (SIGKILL by pidfd) before it settles their
    counts and forks their successors: never two writers on one spool."""
    running = start_service(mqtt=False, startMethod="forkserver")
    names = ("reader-0", "worker-0", "worker-1", "writer")
    first = {name: running.child_pids(name)[-1] for name in names}
    fork_server = parent_of(first["worker-0"])
    assert fork_server != running.process.pid
    port = running.udp_port  # type: ignore[attr-defined]
    datagrams = make_corpus(6000, seed=32)
    sender = PacedSender(port, datagrams[:3000], rate=3000)
    sender.run()
    running.wait_counter("written.influxdb", 1)
    os.kill(fork_server, signal.SIGKILL)
    for name, pid in first.items():
        running.wait_for_log(f"{name} (pid {pid}) died")
        running.wait_for_log(f"started {name}", after=running.log.index(f"(pid {pid}) died"))
    assert not any(alive(pid) for pid in first.values())  # the old ones are gone
    died = running.log.index(f"(pid {first['reader-0']}) died")
    running.wait_for_log("listening on UDP", after=died)  # the new reader is bound
    PacedSender(port, datagrams[3000:], rate=3000).run()
    counters = running.wait_counter("events", 1)
    deadline = time.monotonic() + 40
    while (
        counters["received"] + counters.get("dropped.kernel", 0) < len(datagrams)
        or counters.get("written.influxdb", 0) < counters["events"]
        or counters["events"] + counters.get("dropped.worker_crash", 0) + counters["dropped"]
        < counters["received"]
    ):
        assert time.monotonic() < deadline, counters
        time.sleep(0.5)
        counters = running.counters()
    assert running.terminate() == 0
    counters = running.counters()
    assert_counters_add_up(counters, len(datagrams))
    assert (
        counters["written.influxdb"] == counters["events"] == influx_count(influx_server, influx_db)
    )
