"""Hostile input against the running service (SPEC 5, issue 5).

100,000 datagrams over real UDP: random bytes (empty ones included), realistic datagrams
mutated byte by byte and field by field, and huge ones up to the largest UDP payload
(65,507 bytes). Sent at a pace the kernel keeps up with; whatever it still drops is
counted from the socket's own drop counter. No process may die, every datagram must be
counted exactly once, every event must reach InfluxDB and the broker, memory stays bounded.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import pytest

from senseflow.commands.corpus import make_corpus
from tests.e2e.harness import (
    PacedSender,
    Service,
    influx_count,
    peak_rss_mb,
    udp_port,
    write_config,
)
from tests.e2e.test_resilience import receive_drops
from tests.localservers import InfluxServer, MosquittoServer

pytestmark = pytest.mark.slow

MAX_UDP = 65_507
COUNT = 100_000
RSS_LIMIT_MB = 300
DATABASE = "fuzz_service"
INSERTS = [
    b";",
    b";;",
    b"\n",
    b"\r\n",
    b"\x00",
    b"\xff",
    b"\xc3",
    b"\xed\xa0\x80",
    b"\\",
    b'"',
    b"'",
    b",",
    b"=",
    b" ",
    b"UserAgent:",
    b"/app/",
    b"\xf0\x9f\x9a\x80",
]


def mutate(rng: random.Random, datagram: bytes) -> bytes:
    data = bytearray(datagram)
    for _ in range(rng.randint(1, 6)):
        position = rng.randint(0, len(data))
        kind = rng.randrange(5)
        if kind == 0 and position < len(data):
            data[position] ^= rng.randint(1, 255)
        elif kind == 1:
            del data[position : position + rng.randint(1, 40)]
        elif kind == 2:
            data[position:position] = rng.choice(INSERTS) * rng.randint(1, 4)
        elif kind == 3:
            del data[position:]  # truncated
        else:
            fields = bytes(data).split(b";")
            rng.shuffle(fields)
            data = bytearray(b";".join(fields))
    return bytes(data)


def huge(rng: random.Random, datagram: bytes) -> bytes:
    """A datagram of 60,000 to 65,507 bytes: random, or a real one with a blown-up field."""
    size = rng.randint(60_000, MAX_UDP)
    if rng.random() < 0.3:
        return rng.randbytes(size)
    fields = datagram.split(b";")
    index = rng.randrange(1, len(fields))
    filler = rng.choice([b"x", b";", b"\\", b'"', b" ", b"\n", b"\xc3\xa9", b"\x00", b"\xff"])
    fields[index] += filler * ((size - len(datagram)) // len(filler))
    return b";".join(fields)[:MAX_UDP]


def hostile_datagrams(count: int, seed: int = 5) -> list[bytes]:
    rng = random.Random(seed)
    valid = make_corpus(5000, seed)
    datagrams = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.01:
            datagrams.append(huge(rng, rng.choice(valid)))
        elif roll < 0.40:
            datagrams.append(rng.randbytes(rng.choice([0, 1, 8, rng.randint(0, 600)])))
        elif roll < 0.90:
            datagrams.append(mutate(rng, rng.choice(valid)))
        else:
            datagrams.append(rng.choice(valid))
    return datagrams


def test_100k_hostile_datagrams_nothing_dies_everything_counted(
    tmp_path: Path, influx_server: InfluxServer, mosquitto_server: MosquittoServer
) -> None:
    datagrams = hostile_datagrams(COUNT)
    assert max(map(len, datagrams)) == MAX_UDP or max(map(len, datagrams)) > 60_000
    influx_server.create_database(DATABASE)
    port = udp_port()
    config = write_config(tmp_path / "config.yaml", port, influx_server, DATABASE, mosquitto_server)
    service = Service(config, tmp_path / "senseflow.log")
    try:
        service.wait_running()
        children = {
            n: service.child_pids(n) for n in ("reader-0", "worker-0", "worker-1", "writer")
        }
        PacedSender(port, datagrams, rate=10_000).run()
        counters = wait_accounted(service, COUNT)
        rss = {pid: peak_rss_mb(pid) for pid in service.group_pids()}
        written = influx_count(influx_server, DATABASE)
        assert service.terminate() == 0
    finally:
        service.stop()
        influx_server.query(f'DROP DATABASE "{DATABASE}"')

    counters = service.counters()
    assert counters["received"] == COUNT - counters.get("dropped.kernel", 0)
    resolved = counters["events"] + counters["invalid"] + receive_drops(counters)
    assert resolved == counters["received"]
    assert counters["dropped"] == receive_drops(counters)
    assert counters["events"] > 0 and counters["invalid"] > 0
    assert written == counters["written.influxdb"] == counters["events"]
    assert counters["written.mqtt"] == counters["events"]
    assert counters["failed.influxdb"] == 0  # every line InfluxDB was sent was valid
    assert {n: service.child_pids(n) for n in children} == children
    assert "died" not in service.log
    assert "Traceback" not in service.log
    assert max(rss.values()) < RSS_LIMIT_MB, rss
    reasons = Counter({k: v for k, v in counters.items() if k.startswith(("invalid.", "dropped."))})
    print(
        f"fuzz: {counters['received']} received, {counters['events']} events, "
        f"{dict(reasons)}, peak RSS MB {sorted(round(v) for v in rss.values())}"
    )


def wait_accounted(service: Service, sent: int, timeout: float = 40.0) -> dict[str, int]:
    """Counters once every datagram is received (or a kernel drop), resolved and written."""
    deadline = time.monotonic() + timeout
    while True:
        counters = service.counters()
        kernel = counters.get("dropped.kernel", 0)
        resolved = counters["events"] + counters["invalid"] + receive_drops(counters)
        if (
            counters["received"] + kernel == sent
            and resolved == counters["received"]
            and counters["written.influxdb"] + counters["failed.influxdb"] >= counters["events"]
            and counters["written.mqtt"] >= counters["events"]
        ):
            return counters
        assert time.monotonic() < deadline, counters
        time.sleep(0.3)
