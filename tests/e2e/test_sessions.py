"""Live sessions end to end (SPEC 3a): the writer's state, a writer SIGKILL, `who` replay.

Simulated users start sessions, open and close apps and stop, on three hosts, through the
real service with two workers. The writer is SIGKILLed mid-run. After the drain, the state
the writer checkpointed must equal (a) the ground truth of the simulation, times aside, and
(b) exactly, times included, what `senseflow who` rebuilds from the points in InfluxDB.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from senseflow.commands.who import sessions_at
from shared.config import load_config
from shared.events import ACTIONS
from shared.sessions import SessionEvent, SessionState
from tests.e2e.harness import (
    PacedSender,
    Service,
    influx_count,
    spool_directory,
    spooled_events,
    udp_port,
    write_config,
)
from tests.localservers import InfluxServer, free_ports
from workers.writer.sessions import CHECKPOINT_FILE, SessionCheckpoint

pytestmark = pytest.mark.slow

StartService = Callable[..., Service]
HOSTS = ("SENSE1", "SENSE2", "SENSE3")
APPS = ("3a64c6ff-94b3-4d4b-9b4e-8a6a8b6f1a11", "5c3e1f0a-1111-4a2b-9c3d-0123456789ab", "")
AGENT = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:120.0) Gecko/20100101 Firefox/120.0"


def datagram(action: str, host: str, user: str, app_id: str) -> bytes:
    source = "qseow-proxy-session" if "session" in action else "qseow-proxy-connection"
    context = f"/app/{app_id}" if app_id else "/hub"
    message = f"{action} for user 'LAB\\{user}' UserAgent: {AGENT}"
    return f"/{source}/;{host};{action};LAB;{user};AppAccess;{context};{message}".encode()


def simulation(count: int, seed: int) -> tuple[list[bytes], SessionState]:
    """Mostly well-behaved users (start, open, close, stop), some noise; the ground truth
    is the state of the same events applied in sending order."""
    rng = random.Random(seed)
    truth = SessionState(86_400 * 10**9)
    open_apps: dict[tuple[str, str], list[str]] = {}
    datagrams = []
    for index in range(count):
        host, user = rng.choice(HOSTS), f"user{rng.randrange(80)}"
        apps = open_apps.get((host, user))
        if apps is None:
            action, app = ("Start session", "") if rng.random() < 0.9 else ("Open connection", "")
            open_apps[(host, user)] = [] if action == "Start session" else [app]
        elif apps and rng.random() < 0.4:
            action, app = "Close connection", apps.pop(rng.randrange(len(apps)))
        elif rng.random() < 0.15:
            action, app = "Stop session", ""
            del open_apps[(host, user)]
        else:
            action, app = "Open connection", rng.choice(APPS)
            apps.append(app)
        datagrams.append(datagram(action, host, user, app))
        truth.apply(SessionEvent(index, ACTIONS.index(action), host, "LAB", user, app))
    return datagrams, truth


def without_times(document: dict[str, Any]) -> Any:
    if isinstance(document, dict):
        return {
            k: without_times(v)
            for k, v in document.items()
            if k not in ("at", "since", "lastSeen", "browser", "os")
        }
    if isinstance(document, list):
        return [without_times(item) for item in document]
    return document


def checkpointed_state(config: Path) -> SessionState:
    saved = msgspec.msgpack.decode(
        (spool_directory(config) / CHECKPOINT_FILE).read_bytes(), type=SessionCheckpoint
    )
    assert saved.waiting == []  # the drain applied everything
    return SessionState.restore(saved.state)


@pytest.mark.parametrize("readers", [1, 2])
def test_writer_sigkill_mid_run_keeps_the_session_state_exact(
    start_service: StartService, influx_server: InfluxServer, influx_db: str, readers: int
) -> None:
    """With two readers, receive times (each reader's own stamps) need not follow the
    sending order, so only one reader has a ground truth to compare with; either way the
    state must be that of the events in receive-time order, which `who` replays."""
    datagrams, truth = simulation(6000, seed=21)
    (http_port,) = free_ports()
    running = start_service(mqtt=False, workers=2, readers=readers, httpPort=http_port)
    sender = PacedSender(running.udp_port, datagrams, rate=2000)  # type: ignore[attr-defined]
    sender.start()
    sender.wait_sent(2500)
    (writer,) = running.child_pids("writer")
    os.kill(writer, signal.SIGKILL)
    running.wait_for_log(f"writer (pid {writer}) died: killed by SIGKILL")
    sender.join()
    running.wait_counter("written.influxdb", len(datagrams))
    if readers == 1:  # the restarted writer's state, as the supervisor serves it
        served_equals(http_port, truth)
        ends_written(influx_server, influx_db, truth)
    assert running.terminate() == 0
    assert running.counters()["events"] == len(datagrams)
    assert influx_count(influx_server, influx_db) == len(datagrams)

    config = next(Path(running.log_path).parent.glob("config-0.yaml"))
    live = checkpointed_state(config)
    at = live.clock_ns + 10**9
    shown = live.snapshot(at)
    assert shown["totals"]["users"] > 20 and shown["totals"]["connections"] > 20
    assert sessions_at(load_config(config), at, None, None, None) == shown
    if readers == 1:
        assert without_times(shown) == without_times(truth.snapshot(truth.clock_ns + 1))
        assert live.counters == truth.counters


def served(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
        body: bytes = answer.read()
    return body


def outcome_counters(port: int) -> dict[str, float]:
    return {
        sample.labels["counter"]: sample.value
        for family in text_string_to_metric_families(served(port, "/metrics").decode())
        for sample in family.samples
        if sample.name == "senseflow_session_outcomes_total"
    }


def served_equals(port: int, truth: SessionState) -> None:
    """`/api/sessions` shows the ground truth, and the outcome counters on /metrics add up
    to the truth's, however many writers counted them."""
    expected = without_times(truth.snapshot(truth.clock_ns + 1))
    wait_until(
        lambda: without_times(json.loads(served(port, "/api/sessions"))) == expected,
        "/api/sessions equal to the ground truth",
    )
    assert outcome_counters(port) == truth.counters


def ended_points(influx: InfluxServer, database: str) -> tuple[int, int]:
    """Points in user_session_ended and user_connection_ended."""
    counts = []
    for name in ("user_session_ended", "user_connection_ended"):
        answer = influx.query(f'SELECT count("duration_seconds") FROM "{name}"', db=database)
        series = answer["results"][0].get("series")
        counts.append(series[0]["values"][0][1] if series else 0)
    return counts[0], counts[1]


def ends_of(truth: SessionState) -> tuple[int, int]:
    assert len(truth.ended) == truth.ended_seq  # all kept: countable
    sessions = sum(1 for end in truth.ended if end.app_id is None)
    return sessions, len(truth.ended) - sessions


def ends_written(influx: InfluxServer, database: str, truth: SessionState) -> None:
    """Every end once, however often the writer or the service was killed."""
    expected = ends_of(truth)
    assert expected[0] > 50 and expected[1] > 50
    wait_until(lambda: ended_points(influx, database) == expected, f"{expected} ends written")


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Callable[[Path], Service]]:
    """`senseflow run` on a given config file, as often as asked; every one is stopped."""
    started: list[Service] = []

    def start(config: Path) -> Service:
        started.append(Service(config, tmp_path / f"senseflow-{len(started)}.log"))
        started[-1].wait_running()
        return started[-1]

    yield start
    for each in started:
        each.stop()


def checkpoint_cursor(config: Path) -> int:
    path = spool_directory(config) / CHECKPOINT_FILE
    if not path.exists():
        return 0
    return msgspec.msgpack.decode(path.read_bytes(), type=SessionCheckpoint).cursor


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_whole_service_sigkill_then_restart_keeps_the_session_state_exact(
    tmp_path: Path,
    influx_server: InfluxServer,
    influx_db: str,
    services: Callable[[Path], Service],
) -> None:
    datagrams, truth = simulation(6000, seed=22)
    port = udp_port()
    (http_port,) = free_ports()
    config = write_config(
        tmp_path / "config.yaml",
        port,
        influx_server,
        influx_db,
        workers=2,
        spool={"segmentBytes": 64 * 1024},  # small: covered segments are deleted
        httpPort=http_port,
    )
    first = services(config)
    PacedSender(port, datagrams[:3000], rate=2000).run()
    wait_until(lambda: checkpoint_cursor(config) > 0, "a session checkpoint", timeout=15)
    PacedSender(port, datagrams[3000:3500], rate=2000).run()
    wait_until(lambda: influx_count(influx_server, influx_db) == 3500, "3500 points written")
    first.kill_group()  # the last events are in the spool, not (all) in the checkpoint

    assert spooled_events(spool_directory(config)) < 3500  # the spool let go of some
    second = services(config)
    served_equals(http_port, simulation(3500, seed=22)[1])  # the first 3500 events' truth
    PacedSender(port, datagrams[3500:], rate=2000).run()
    wait_until(lambda: influx_count(influx_server, influx_db) == 6000, "6000 points written")
    served_equals(http_port, truth)
    ends_written(influx_server, influx_db, truth)
    assert second.terminate() == 0
    assert second.counters()["events"] == 2500

    live = checkpointed_state(config)
    at = live.clock_ns + 10**9
    shown = live.snapshot(at)
    assert sessions_at(load_config(config), at, None, None, None) == shown
    assert without_times(shown) == without_times(truth.snapshot(truth.clock_ns + 1))
    assert live.counters == truth.counters
