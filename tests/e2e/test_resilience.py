"""Nothing lost, nothing let in (SPEC 4-5, issue 5): every failure provoked for real.

InfluxDB and Mosquitto are stopped and restarted (each test that does so has its own
server, so the session's servers stay up), children and the whole service are SIGKILLed,
the receiver is flooded, strangers and oversized datagrams are sent. Each test then counts
what arrived in InfluxDB or on the broker against what was sent.

Datagrams carry a unique marker `[m<n>]` in their message, so that an MQTT subscriber can
tell every event apart and count duplicates (QoS 1 is at-least-once).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from senseflow.commands.corpus import make_corpus
from senseflow.commands.send import send
from tests.e2e.harness import (
    EVERYTHING_TOPIC_ONLY,
    PacedSender,
    Service,
    Subscriber,
    influx_count,
    peak_rss_mb,
    spool_directory,
    spool_usage,
    spooled_events,
    udp_port,
    write_config,
)
from tests.localservers import InfluxServer, MosquittoServer
from workers.parse import parse_datagram

pytestmark = pytest.mark.slow

DATABASE = "resilience"
TOPIC = "qliksense/userevent"
MARKER = re.compile(r"\[m(\d+)\]")
RSS_LIMIT_MB = 300
SUBSCRIBER_WINDOW = 20
"""mosquitto's max_inflight_messages towards a subscriber: what it may send twice itself."""

StartService = Callable[..., Service]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def own_influx(tmp_path: Path) -> Iterator[InfluxServer]:
    """An InfluxDB of this test alone, to stop and restart."""
    with InfluxServer(tmp_path / "influxd") as server:
        server.create_database(DATABASE)
        yield server


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[MosquittoServer]:
    """A Mosquitto of this test alone, keeping persistent sessions across its restart."""
    with MosquittoServer(tmp_path / "mosquitto", persistence=True) as server:
        yield server


@pytest.fixture
def service(tmp_path: Path) -> Iterator[StartService]:
    """Start `senseflow run` with a config file; every service started is stopped."""
    started: list[Service] = []

    def start(config: Path, *flags: str) -> Service:
        log = tmp_path / f"senseflow-{len(started)}.log"
        started.append(Service(config, log, *flags))
        started[-1].wait_running()
        return started[-1]

    yield start
    for each in started:
        each.stop()


# -- helpers ----------------------------------------------------------------------------------


def marked_corpus(count: int, seed: int) -> list[bytes]:
    """Realistic datagrams, each with `[m<i>]` in its message (before a user agent, which
    would otherwise become unique and defeat the workers' user-agent cache)."""
    datagrams = []
    for i, datagram in enumerate(make_corpus(count, seed)):
        mark = f"[m{i}]".encode()
        if b"UserAgent:" in datagram:
            datagrams.append(datagram.replace(b"UserAgent:", mark + b" UserAgent:", 1))
        else:
            datagrams.append(datagram + b" " + mark)
    assert all(MARKER.search(parse_datagram(d, 1).message) for d in datagrams[:200])  # type: ignore[union-attr]
    return datagrams


def markers(messages: list[tuple[str, str]]) -> Counter[int]:
    """How often each event (by its marker) arrived on the everything topic."""
    seen: Counter[int] = Counter()
    for topic, payload in messages:
        if topic == TOPIC:
            found = MARKER.search(orjson.loads(payload)["message"])
            assert found, payload
            seen[int(found.group(1))] += 1
    return seen


def wait_influx_count(
    influx: InfluxServer, expected: int, database: str = DATABASE, timeout: float = 40.0
) -> int:
    deadline = time.monotonic() + timeout
    while (count := influx_count(influx, database)) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return count


def receive_drops(counters: dict[str, int]) -> int:
    """Datagrams received and dropped before they became events (not the kernel's drops,
    which were never received, nor a destination's, which are events)."""
    return sum(
        value
        for key, value in counters.items()
        if key.startswith("dropped.")
        and key != "dropped.kernel"
        and not key.startswith("dropped.destination_full")
    )


def assert_counters_add_up(counters: dict[str, int], sent: int) -> None:
    """Every datagram sent was received or dropped by the kernel, and has one outcome."""
    assert counters["received"] + counters.get("dropped.kernel", 0) == sent, counters
    outcomes = counters["events"] + counters["invalid"] + counters["excluded"]
    assert outcomes + receive_drops(counters) == counters["received"], counters
    assert counters["dropped"] == receive_drops(counters), counters  # the summary's sum


def resent_messages(log: str) -> int:
    return sum(int(n) for n in re.findall(r"resending (\d+) unacknowledged", log))


def peak_rss(service: Service) -> dict[str, float]:
    """VmHWM per live process of the service, by name (supervisor, reader-0, ...)."""
    names = {pid: name for name, pid in re.findall(r"started ([\w-]+) \(pid (\d+)\)", service.log)}
    names[str(service.process.pid)] = "supervisor"
    return {names.get(str(pid), str(pid)): peak_rss_mb(pid) for pid in service.group_pids()}


def both_destinations(
    tmp_path: Path, port: int, influx: InfluxServer, database: str, broker: MosquittoServer
) -> Path:
    """A config writing to InfluxDB and to the broker's everything topic only."""
    return write_config(
        tmp_path / "config.yaml",
        port,
        influx,
        database,
        broker,
        butler_overrides=EVERYTHING_TOPIC_ONLY,
    )


def send_from(source: str, port: int, datagrams: list[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        for datagram in datagrams:
            sock.sendto(datagram, ("127.0.0.1", port))


# -- destination outages ----------------------------------------------------------------------


def test_influxdb_down_10s_mid_load_loses_nothing(
    tmp_path: Path, own_influx: InfluxServer, service: StartService
) -> None:
    port = udp_port()
    running = service(write_config(tmp_path / "config.yaml", port, own_influx, DATABASE))
    datagrams = make_corpus(45_000, seed=11)
    sender = PacedSender(port, datagrams, rate=3000)
    sender.start()
    sender.wait_sent(6000)
    running.wait_counter("written.influxdb", 1)

    own_influx.stop()
    time.sleep(10)
    own_influx.start()
    back = time.monotonic()
    sender.join()
    running.wait_counter("written.influxdb", len(datagrams), timeout=40)
    recovery = time.monotonic() - back

    assert wait_influx_count(own_influx, len(datagrams)) == len(datagrams)
    assert "InfluxDB write failed" in running.log
    assert running.terminate() == 0
    counters = running.counters()
    assert_counters_add_up(counters, len(datagrams))
    assert counters["events"] == counters["written.influxdb"] == len(datagrams)
    assert counters["dropped"] == counters["failed.influxdb"] == 0
    assert "died" not in running.log
    print(f"InfluxDB down 10 s: all {len(datagrams)} written {recovery:.1f} s after it was back")


def test_influxdb_down_small_memory_bound_backlog_waits_in_spool(
    tmp_path: Path, own_influx: InfluxServer, service: StartService
) -> None:
    port = udp_port()
    config = write_config(
        tmp_path / "config.yaml",
        port,
        own_influx,
        DATABASE,
        pendingEvents=1000,
        batchSize=500,
        spool={"segmentBytes": 256 * 1024},
    )
    running = service(config)
    spool = spool_directory(config)
    datagrams = make_corpus(36_000, seed=12)
    sender = PacedSender(port, datagrams, rate=3000)
    sender.start()
    sender.wait_sent(3000)
    running.wait_counter("written.influxdb", 1)

    own_influx.stop()
    files_before, bytes_before = spool_usage(spool)
    most_files, most_bytes = files_before, bytes_before
    outage_end = time.monotonic() + 8
    while time.monotonic() < outage_end:
        files, size = spool_usage(spool)
        most_files, most_bytes = max(most_files, files), max(most_bytes, size)
        time.sleep(0.1)
    sent_while_down = sender.sent - 3000
    own_influx.start()
    sender.join()
    running.wait_counter("written.influxdb", len(datagrams), timeout=40)

    # ~24,000 events came while InfluxDB was down; the sink holds 1,000 in memory, the
    # spool all of them: ~200 bytes of line protocol each, in 256 KiB segments.
    assert sent_while_down > 20_000
    assert most_bytes - bytes_before > sent_while_down * 150, (most_bytes, bytes_before)
    assert most_files >= files_before + 10, (most_files, files_before)
    assert wait_influx_count(own_influx, len(datagrams)) == len(datagrams)
    assert running.terminate() == 0
    counters = running.counters()
    assert_counters_add_up(counters, len(datagrams))
    assert counters["written.influxdb"] == len(datagrams)
    assert counters["dropped"] == 0
    files_after, _ = spool_usage(spool)
    assert files_after <= 1  # delivered segments are deleted
    print(f"spool during the outage: up to {most_files} segments, {most_bytes / 1e6:.1f} MB")


def test_spool_full_drops_oldest_and_counts_them_exactly(
    tmp_path: Path, own_influx: InfluxServer, service: StartService
) -> None:
    port = udp_port()
    config = write_config(
        tmp_path / "config.yaml",
        port,
        own_influx,
        DATABASE,
        pendingEvents=1000,
        batchSize=500,
        spool={"maxBytes": 2 * 1024 * 1024, "segmentBytes": 128 * 1024},
    )
    running = service(config)
    own_influx.stop()
    datagrams = make_corpus(20_000, seed=23)
    PacedSender(port, datagrams, rate=4000).run()
    running.wait_counter("events", len(datagrams))
    own_influx.start()
    deadline = time.monotonic() + 40
    while True:
        counters = running.counters()
        dropped = counters.get("dropped.destination_full.influxdb", 0)
        if counters["written.influxdb"] + dropped == len(datagrams):
            break
        assert time.monotonic() < deadline, counters
        time.sleep(0.3)
    assert running.terminate() == 0
    counters = running.counters()
    dropped = counters["dropped.destination_full.influxdb"]
    assert dropped > 10_000  # ~7,000 events fit in 2 MiB; the rest went, oldest first
    assert counters["written.influxdb"] == len(datagrams) - dropped
    assert (
        wait_influx_count(own_influx, counters["written.influxdb"]) == counters["written.influxdb"]
    )
    assert_counters_add_up(counters, len(datagrams))
    assert counters["events"] == len(datagrams)
    _, size = spool_usage(spool_directory(config))
    assert size <= 2 * 1024 * 1024
    print(f"spool full: {dropped} dropped, {counters['written.influxdb']} written")


def test_broker_restart_mid_load_every_event_arrives(
    tmp_path: Path, own_broker: MosquittoServer, service: StartService
) -> None:
    subscriber = Subscriber(own_broker, "qliksense/#", tmp_path / "mqtt.txt", "resilience-sub")
    try:
        port = udp_port()
        config = write_config(
            tmp_path / "config.yaml",
            port,
            broker=own_broker,
            butler_overrides=EVERYTHING_TOPIC_ONLY,
            mqtt={"maxInflight": 1000},
        )
        running = service(config)
        datagrams = marked_corpus(36_000, seed=13)
        sender = PacedSender(port, datagrams, rate=3000)
        sender.start()
        sender.wait_sent(6000)
        running.wait_counter("written.mqtt", 1)

        own_broker.stop()
        time.sleep(8)
        own_broker.start()
        back = time.monotonic()
        sender.join()
        running.wait_counter("written.mqtt", len(datagrams), timeout=40)
        recovery = time.monotonic() - back
        seen = markers(subscriber.wait_count(len(datagrams), timeout=30))
    finally:
        subscriber.stop()

    assert set(seen) == set(range(len(datagrams)))  # every event at least once
    duplicates = sum(seen.values()) - len(seen)
    resent = resent_messages(running.log)
    assert "MQTT reconnected" in running.log
    assert duplicates <= resent + SUBSCRIBER_WINDOW, (duplicates, resent)
    assert running.terminate() == 0
    counters = running.counters()
    assert_counters_add_up(counters, len(datagrams))
    assert counters["written.mqtt"] == counters["events"] == len(datagrams)
    assert counters["dropped"] == 0
    print(
        f"broker down 8 s: {len(seen)} events, {duplicates} duplicates, {resent} resent, "
        f"all acknowledged {recovery:.1f} s after it was back"
    )


# -- crashes ----------------------------------------------------------------------------------


def test_writer_sigkill_mid_load_recovers_from_its_spool(
    tmp_path: Path,
    influx_server: InfluxServer,
    influx_db: str,
    mosquitto_server: MosquittoServer,
    service: StartService,
) -> None:
    subscriber = Subscriber(mosquitto_server, "qliksense/#", tmp_path / "mqtt.txt")
    try:
        port = udp_port()
        running = service(
            both_destinations(tmp_path, port, influx_server, influx_db, mosquitto_server)
        )
        datagrams = marked_corpus(30_000, seed=14)
        sender = PacedSender(port, datagrams, rate=3000)
        sender.start()
        sender.wait_sent(9000)
        (writer,) = running.child_pids("writer")
        os.kill(writer, signal.SIGKILL)
        running.wait_for_log(f"writer (pid {writer}) died: killed by SIGKILL")
        sender.join()
        assert len(running.child_pids("writer")) == 2

        assert wait_influx_count(influx_server, len(datagrams), influx_db) == len(datagrams)
        seen = markers(subscriber.wait_count(len(datagrams), timeout=30))
        assert set(seen) == set(range(len(datagrams)))
        assert running.terminate() == 0
    finally:
        subscriber.stop()
    counters = running.counters()
    assert_counters_add_up(counters, len(datagrams))
    assert counters["events"] == len(datagrams)
    assert counters["dropped"] == 0
    # Replayed batches are counted once: as their record passes the destination's cursor.
    assert counters["written.influxdb"] == counters["written.mqtt"] == len(datagrams)
    replayed = re.findall(r"(\w+): replaying (\d+) batch", running.log)
    print(
        f"writer SIGKILL: replayed {replayed}, {len(datagrams)} in InfluxDB, "
        f"{sum(seen.values()) - len(seen)} MQTT duplicates"
    )


def test_worker_sigkill_mid_load_loses_at_most_the_batch_it_held(
    tmp_path: Path, influx_server: InfluxServer, influx_db: str, service: StartService
) -> None:
    port = udp_port()
    running = service(write_config(tmp_path / "config.yaml", port, influx_server, influx_db))
    datagrams = make_corpus(30_000, seed=22)
    sender = PacedSender(port, datagrams, rate=5000)
    sender.start()
    sender.wait_sent(10_000)
    (worker,) = running.child_pids("worker-0")
    os.kill(worker, signal.SIGKILL)
    running.wait_for_log(f"worker-0 (pid {worker}) died: killed by SIGKILL")
    sender.join()
    running.wait_for_log("started worker-0", after=running.log.index(f"(pid {worker}) died"))
    counters = running.wait_counter("written.influxdb", 1)
    deadline = time.monotonic() + 30
    while counters["written.influxdb"] + counters.get("dropped.worker_crash", 0) < len(datagrams):
        assert time.monotonic() < deadline, counters
        time.sleep(0.5)
        counters = running.counters()
    written = influx_count(influx_server, influx_db)
    assert running.terminate() == 0
    # The raw batch the worker was parsing when killed (at most readerBatchSize datagrams)
    # may be gone, counted as lost; everything else arrives, and nothing is counted twice.
    counters = running.counters()
    assert_counters_add_up(counters, len(datagrams))
    lost = counters.get("dropped.worker_crash", 0)
    assert lost <= 500
    assert written == counters["written.influxdb"] == counters["events"] == len(datagrams) - lost
    print(f"worker SIGKILL: {written} of {len(datagrams)} written, {lost} counted lost")


def test_worker_killed_holding_a_batch_counts_exactly_that_batch_lost(
    tmp_path: Path, influx_server: InfluxServer, influx_db: str, service: StartService
) -> None:
    """The writer is stopped so that the worker's sends block: the worker is then certainly
    holding a batch when it is killed, and the writer, once resumed, counts it lost."""
    port = udp_port()
    config = write_config(
        tmp_path / "config.yaml", port, influx_server, influx_db, workers=1, queueSize=1
    )
    running = service(config)
    (writer,) = running.child_pids("writer")
    (worker,) = running.child_pids("worker-0")
    datagrams = make_corpus(150_000, seed=23)  # more than both channels hold
    os.kill(writer, signal.SIGSTOP)
    try:
        PacedSender(port, datagrams, rate=20_000).run()
        counters = running.wait_counter("dropped.queue_full", 1)  # both channels are full
        assert worker_state(worker) == "S"  # blocked in its send to the writer
        os.kill(worker, signal.SIGKILL)
        running.wait_for_log(f"worker-0 (pid {worker}) died: killed by SIGKILL")
    finally:
        os.kill(writer, signal.SIGCONT)
    running.wait_for_log("died holding")
    counters = running.wait_counter("dropped.worker_crash", 1)
    deadline = time.monotonic() + 30
    while counters.get("written.influxdb", 0) < counters["events"] or not counters["events"]:
        assert time.monotonic() < deadline, counters
        time.sleep(0.5)
        counters = running.counters()
    assert running.terminate() == 0
    counters = running.counters()
    assert_counters_add_up(counters, len(datagrams))
    assert 0 < counters["dropped.worker_crash"] <= 500  # one raw batch, no more
    assert influx_count(influx_server, influx_db) == counters["written.influxdb"]
    assert counters["written.influxdb"] == counters["events"]
    assert f"worker-0 died holding {counters['dropped.worker_crash']} datagram(s)" in running.log
    print(
        f"worker killed holding a batch: dropped.worker_crash={counters['dropped.worker_crash']}, "
        f"queue_full={counters.get('dropped.queue_full', 0)}, events={counters['events']}, "
        f"received={counters['received']}"
    )


def test_sigterm_right_after_a_writer_kill_restarts_it_to_drain(
    tmp_path: Path, influx_server: InfluxServer, influx_db: str, service: StartService
) -> None:
    """The service is told to stop while its writer is dead and waiting for its restart:
    the drain starts the writer again, delivers everything and exits 0."""
    port = udp_port()
    running = service(write_config(tmp_path / "config.yaml", port, influx_server, influx_db))
    datagrams = make_corpus(10_000, seed=25)
    PacedSender(port, datagrams, rate=5000).run()
    (writer,) = running.child_pids("writer")
    os.kill(writer, signal.SIGKILL)
    running.wait_for_log(f"writer (pid {writer}) died")
    assert running.terminate() == 0
    assert len(running.child_pids("writer")) == 2  # started again by the drain
    counters = running.counters()
    assert_counters_add_up(counters, len(datagrams))
    assert counters["events"] == len(datagrams)
    assert influx_count(influx_server, influx_db) == counters["written.influxdb"] == len(datagrams)


def worker_state(pid: int) -> str:
    """The process state letter from /proc (R running, S sleeping, T stopped)."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    return stat.rsplit(")", 1)[1].split()[0]


def test_repeated_kills_of_writer_and_workers_keep_data_and_counters_exact(
    tmp_path: Path,
    influx_server: InfluxServer,
    influx_db: str,
    mosquitto_server: MosquittoServer,
    service: StartService,
) -> None:
    """Writer and workers SIGKILLed in turn under load: what InfluxDB and the broker hold
    and what the counters say agree exactly, lost batches included."""
    subscriber = Subscriber(mosquitto_server, "qliksense/#", tmp_path / "mqtt.txt")
    try:
        port = udp_port()
        running = service(
            both_destinations(tmp_path, port, influx_server, influx_db, mosquitto_server)
        )
        datagrams = marked_corpus(24_000, seed=24)
        sender = PacedSender(port, datagrams, rate=3000)
        sender.start()
        for step, victim in enumerate(["writer", "worker-0", "writer", "worker-1", "worker-0"]):
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
            or counters["written.influxdb"] < counters["events"]
            or counters["written.mqtt"] < counters["events"]
        ):
            assert time.monotonic() < deadline, counters
            time.sleep(0.5)
            counters = running.counters()
        assert running.terminate() == 0
        seen = markers(subscriber.wait_count(counters["events"], timeout=30))
    finally:
        subscriber.stop()
    counters = running.counters()
    assert_counters_add_up(counters, len(datagrams))
    events = counters["events"]
    assert events == len(datagrams) - counters.get("dropped.worker_crash", 0)
    assert counters["written.influxdb"] == events == influx_count(influx_server, influx_db)
    assert counters["written.mqtt"] == events == len(seen)
    print(
        f"5 kills: {events} events, {counters.get('dropped.worker_crash', 0)} lost with "
        f"workers, {sum(seen.values()) - len(seen)} MQTT duplicates"
    )


def test_whole_service_sigkill_while_influxdb_down_replays_spool_after_restart(
    tmp_path: Path, own_influx: InfluxServer, service: StartService
) -> None:
    port = udp_port()
    config = write_config(tmp_path / "config.yaml", port, own_influx, DATABASE)
    first = service(config)
    own_influx.stop()
    datagrams = make_corpus(20_000, seed=15)
    PacedSender(port, datagrams, rate=5000).run()
    first.wait_counter("events", len(datagrams))
    deadline = time.monotonic() + 20
    while spooled_events(spool_directory(config)) < len(datagrams):
        assert time.monotonic() < deadline, spooled_events(spool_directory(config))
        time.sleep(0.1)
    first.kill_group()
    assert first.group_pids() == []

    own_influx.start()
    second = service(config)
    assert wait_influx_count(own_influx, len(datagrams)) == len(datagrams)
    second.wait_counter("written.influxdb", len(datagrams))
    assert "replaying" in second.log
    assert second.terminate() == 0
    counters = second.counters()
    assert counters["written.influxdb"] == counters["recovered.influxdb"] == len(datagrams)
    assert counters["received"] == 0


# -- overload ---------------------------------------------------------------------------------


def test_overload_counters_add_up_exactly_and_memory_stays_bounded(
    tmp_path: Path, influx_server: InfluxServer, influx_db: str, service: StartService
) -> None:
    port = udp_port()
    config = write_config(
        tmp_path / "config.yaml",
        port,
        influx_server,
        influx_db,
        queueSize=2,
    )
    running = service(config, "--workers", "1")
    pids = {name: running.child_pids(name) for name in ("reader-0", "worker-0", "writer")}
    pool = make_corpus(50_000, seed=16)
    report = send(("127.0.0.1", port), pool, rate=0, count=400_000)
    counters = wait_settled(running, report.sent)
    rss = peak_rss(running)
    assert influx_count(influx_server, influx_db) == counters["events"]
    assert running.terminate() == 0
    counters = running.counters()
    print(
        f"overload: sent {report.sent} at {report.rate:,.0f}/s; counters {counters}; "
        f"peak RSS MB { {name: round(mb) for name, mb in rss.items()} }"
    )
    assert_counters_add_up(counters, report.sent)
    assert counters["written.influxdb"] == counters["events"]
    # It was overloaded: the bounded queue (or, on a busy machine, the socket) overflowed.
    assert counters.get("dropped.queue_full", 0) + counters.get("dropped.kernel", 0) > 0
    if counters.get("dropped.queue_full", 0):  # messageQueue.backpressureThreshold
        assert "backpressure: the workers' queue is" in running.log
    assert {name: running.child_pids(name) for name in pids} == pids  # nobody died
    assert max(rss.values()) < RSS_LIMIT_MB, rss


def wait_settled(running: Service, sent: int, timeout: float = 40.0) -> dict[str, int]:
    """Counters once every datagram sent is accounted for and every event written."""
    deadline = time.monotonic() + timeout
    while True:
        counters = running.counters()
        accounted = counters["received"] + counters.get("dropped.kernel", 0) == sent
        outcomes = counters["events"] + counters["invalid"] + counters["excluded"]
        resolved = outcomes + receive_drops(counters) == counters["received"]
        if accounted and resolved and counters["written.influxdb"] == counters["events"]:
            return counters
        assert time.monotonic() < deadline, counters
        time.sleep(0.3)


# -- guards -----------------------------------------------------------------------------------


def test_allow_list_and_max_message_size(
    tmp_path: Path, influx_server: InfluxServer, influx_db: str, service: StartService
) -> None:
    port = udp_port()
    guards = {
        "userEvents": {
            "udpServerConfig": {
                "enableSourceValidation": True,
                "allowedSources": ["127.0.0.2"],
                "maxMessageSize": 1500,
            }
        }
    }
    config = write_config(
        tmp_path / "config.yaml", port, influx_server, influx_db, butler_overrides=guards
    )
    running = service(config)
    allowed = make_corpus(500, seed=17)
    oversized = [d + b" " + b"x" * 1500 for d in make_corpus(50, seed=18)]
    send_from("127.0.0.1", port, make_corpus(300, seed=19) + oversized[:20])
    send_from("127.0.0.2", port, allowed + oversized[20:])
    running.wait_counter("written.influxdb", 500)
    assert influx_count(influx_server, influx_db) == 500
    assert running.terminate() == 0
    counters = running.counters()
    assert counters["received"] == 850
    assert counters["events"] == counters["written.influxdb"] == 500
    assert counters["dropped.source_not_allowed"] == 300
    assert counters["dropped.too_large"] == 50
    assert counters["dropped"] == 350
    assert_counters_add_up(counters, 850)


def test_host_name_allow_list_and_rate_limit(
    tmp_path: Path, influx_server: InfluxServer, influx_db: str, service: StartService
) -> None:
    port = udp_port()
    guards = {
        "userEvents": {
            "udpServerConfig": {
                "enableSourceValidation": True,
                "allowedSources": ["localhost"],
                "rateLimit": {"enable": True, "maxMessagesPerMinute": 6000},  # 100/s
            }
        }
    }
    config = write_config(
        tmp_path / "config.yaml", port, influx_server, influx_db, butler_overrides=guards
    )
    running = service(config)
    send_from("127.0.0.2", port, make_corpus(50, seed=20))  # before: spends no tokens
    started = time.monotonic()
    send_from("127.0.0.1", port, make_corpus(1000, seed=21))
    elapsed = time.monotonic() - started
    counters = wait_received(running, 1050)
    events = counters["events"]
    running.wait_counter("written.influxdb", events)
    assert influx_count(influx_server, influx_db) == events
    assert running.terminate() == 0
    counters = running.counters()
    assert counters["dropped.source_not_allowed"] == 50
    assert counters["dropped.rate_limited"] + counters["events"] == 1000
    # A bucket of one second's worth (100), refilled at 100/s while the burst was read.
    assert 100 <= counters["events"] <= 100 + int(100 * elapsed) + 50, (counters, elapsed)
    assert_counters_add_up(counters, 1050)
    assert re.search(r"source validation on: [2-9]\d* allowed address", running.log)


def wait_received(running: Service, count: int, timeout: float = 20.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        counters = running.counters() if "counters: " in running.log else {"received": -1}
        if counters["received"] == count and counters["events"] + receive_drops(counters) == count:
            return counters
        assert time.monotonic() < deadline, counters
        time.sleep(0.2)
