"""The NATS JetStream destination end to end (issue 16): `senseflow run` publishing to a
real nats-server, the stream read back by an independent consumer. Every event is in the
stream exactly once, on its action's subject, with its `Nats-Msg-Id`; a server that is
down longer than the memory bound holds the backlog in the spool, which drains when the
server is back."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.e2e.harness import (
    PacedSender,
    Service,
    send_paced,
    spool_directory,
    spool_usage,
    udp_port,
    write_config,
)
from tests.e2e.test_resilience import MARKER, assert_counters_add_up, marked_corpus
from tests.localservers import NatsServer
from tests.natsstream import Stored, stream_messages
from workers.writer.sinks.nats import ACTION_SUBJECTS

STREAM = "QLIKSENSE_USER_EVENTS"
PREFIX = "qliksense.userevent"
COMMANDS = ("Start session", "Stop session", "Open connection", "Close connection")
SUBJECT_OF = {c: f"{PREFIX}.{s}" for c, s in zip(COMMANDS, ACTION_SUBJECTS, strict=True)}


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    with NatsServer() as server:
        yield server


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[Service]]:
    services: list[Service] = []
    yield services
    for service in services:
        service.stop()


def start(tmp_path: Path, services: list[Service], server: NatsServer, **pipeline: Any) -> Any:
    port = udp_port()
    nats = {"enable": True, "servers": [server.url], "msgIdPrefix": "e2e"}
    config = write_config(tmp_path / "config.yaml", port, nats=nats, **pipeline)
    service = Service(config, tmp_path / "senseflow.log")
    services.append(service)
    service.wait_running()
    return service, port, config


def check_stream(stored: list[Stored], count: int) -> None:
    """`count` events, each once: its marker, its subject, a unique id."""
    seen: Counter[int] = Counter()
    for subject, msg_id, payload in stored:
        event = orjson.loads(payload)
        assert subject == SUBJECT_OF[event["command"]], (subject, event["command"])
        assert msg_id.startswith("e2e-")
        found = MARKER.search(event["message"])
        assert found, payload
        seen[int(found.group(1))] += 1
    assert len({msg_id for _, msg_id, _ in stored}) == len(stored)
    assert set(seen) == set(range(count))
    assert set(seen.values()) == {1}


def read_stream(server: NatsServer) -> list[Stored]:
    return asyncio.run(stream_messages([server.url], STREAM, f"{PREFIX}.>"))


def test_every_event_in_the_stream_exactly_once(
    tmp_path: Path, nats_server: NatsServer, started: list[Service]
) -> None:
    service, port, _ = start(tmp_path, started, nats_server)
    datagrams = marked_corpus(4000, seed=16)
    send_paced(port, datagrams, rate=4000)
    service.wait_counter("written.nats", len(datagrams), timeout=60)
    assert service.terminate() == 0
    counters = service.counters()
    assert_counters_add_up(counters, len(datagrams))
    assert counters["written.nats"] == counters["events"] == len(datagrams)
    check_stream(read_stream(nats_server), len(datagrams))


@pytest.mark.slow
def test_server_down_past_the_memory_bound_spool_holds_then_drains(
    tmp_path: Path, nats_server: NatsServer, started: list[Service]
) -> None:
    service, port, config = start(
        tmp_path,
        started,
        nats_server,
        pendingEvents=500,
        batchSize=250,
        spool={"segmentBytes": 128 * 1024},
    )
    spool = spool_directory(config)
    datagrams = marked_corpus(20_000, seed=17)
    sender = PacedSender(port, datagrams, rate=2500)
    sender.start()
    sender.wait_sent(2500)
    service.wait_counter("written.nats", 1)

    nats_server.stop()
    _, bytes_before = spool_usage(spool)
    most_bytes = bytes_before
    outage_end = time.monotonic() + 5
    while time.monotonic() < outage_end:
        most_bytes = max(most_bytes, spool_usage(spool)[1])
        time.sleep(0.1)
    sent_while_down = sender.sent - 2500
    nats_server.start()
    sender.join()
    service.wait_counter("written.nats", len(datagrams), timeout=60)

    # ~12,500 events came while the server was down; at most 500 (+ one batch) wait in
    # memory, the rest in the spool: hundreds of bytes each.
    assert sent_while_down > 10_000
    assert most_bytes - bytes_before > (sent_while_down - 1000) * 100, (most_bytes, bytes_before)
    assert service.terminate() == 0
    counters = service.counters()
    assert_counters_add_up(counters, len(datagrams))
    assert counters["written.nats"] == counters["events"] == len(datagrams)
    assert counters["dropped"] == 0
    check_stream(read_stream(nats_server), len(datagrams))
