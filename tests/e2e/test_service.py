"""`senseflow run` end to end: real UDP in, real InfluxDB 1.x and Mosquitto out."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import orjson
import pytest

from senseflow.commands.corpus import make_corpus
from shared.config import Config
from tests.e2e.conftest import StartService
from tests.e2e.harness import Subscriber, influx_count, send_paced
from tests.localservers import InfluxServer
from workers.pipeline import EventPipeline

TOPIC = "qliksense/userevent"
ACTION_TOPICS = {
    "Start session": "qliksense/userevent/session/start",
    "Stop session": "qliksense/userevent/session/stop",
    "Open connection": "qliksense/userevent/connection/open",
    "Close connection": "qliksense/userevent/connection/close",
}

pytestmark = pytest.mark.slow


def expected_actions(datagrams: list[bytes]) -> Counter[str]:
    """What the pipeline's own parser says each datagram is (the parser has its own tests)."""
    pipeline = EventPipeline(Config())
    outcomes: Counter[str] = Counter()
    for datagram in datagrams:
        result = pipeline.event_or_reason(datagram, 1)
        outcomes[result if isinstance(result, str) else result.command] += 1
    return outcomes


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_100k_datagrams_all_arrive(
    workers: int,
    start_service: StartService,
    subscriber: Subscriber,
    influx_server: InfluxServer,
    influx_db: str,
) -> None:
    datagrams = make_corpus(100_000, seed=workers)
    actions = expected_actions(datagrams)
    assert sum(actions[a] for a in ACTION_TOPICS) == 100_000
    service = start_service("--workers", str(workers))

    sent = send_paced(service.udp_port, datagrams, rate=25_000)  # type: ignore[attr-defined]
    service.wait_counter("written.mqtt", sent)
    service.wait_counter("written.influxdb", sent)

    assert influx_count(influx_server, influx_db) == 100_000
    messages = subscriber.wait_count(200_000)
    per_topic = Counter(topic for topic, _ in messages)
    assert per_topic[TOPIC] == 100_000
    for action, topic in ACTION_TOPICS.items():
        assert per_topic[topic] == actions[action], action
    assert service.terminate() == 0
    counters = service.counters()
    assert counters["received"] == 100_000
    assert counters["events"] == 100_000
    assert counters["written.influxdb"] == 100_000
    assert counters["written.mqtt"] == 100_000
    assert counters["dropped"] == counters["invalid"] == 0


TRICKY_USERS = [
    "user with spaces",
    "comma,user",
    "equals=user",
    'quote"user',
    "back\\slash",
    "ünïcødé 用户 🚀",
    "trailing\\",
    "' OR 1=1 --",
    "x\\,y=z",
]


def test_tricky_values_arrive_exactly(
    start_service: StartService, subscriber: Subscriber, influx_server: InfluxServer, influx_db: str
) -> None:
    service = start_service()
    app_id = "1b2a7a4f-6d5a-4f6e-9a41-3f1f1ba2f0a1"
    datagrams = [
        f"/qseow-proxy-connection/;sense 1;Open connection;LAB, dir;{user};Proxy;/app/{app_id}?a=b;"
        f"Open connection; with 'quotes' and \"doubles\"\nnext line".encode()
        for user in TRICKY_USERS
    ]
    send_paced(service.udp_port, datagrams, rate=1000)  # type: ignore[attr-defined]
    service.wait_counter("written.influxdb", len(datagrams))
    service.wait_counter("written.mqtt", len(datagrams))

    rows = influx_server.query(
        'SELECT "userId", "userId_field", "userFull_field", "userDirectory", "host", "appId" '
        "FROM user_events",
        db=influx_db,
    )["results"][0]["series"][0]
    records = [dict(zip(rows["columns"], values, strict=True)) for values in rows["values"]]
    assert sorted(r["userId_field"] for r in records) == sorted(TRICKY_USERS)
    for record in records:
        user = record["userId_field"]
        assert record["userFull_field"] == f"LAB, dir\\{user}"
        assert record["userId"] == user.rstrip("\\")  # 1.x cannot store a tag ending in '\'
        assert record["userDirectory"] == "LAB, dir"
        assert record["host"] == "sense 1"
        assert record["appId"] == app_id
    assert influx_count(influx_server, influx_db) == len(TRICKY_USERS)

    messages = [orjson.loads(p) for t, p in subscriber.wait_count(2 * len(datagrams)) if t == TOPIC]
    assert sorted(m["userId"] for m in messages) == sorted(TRICKY_USERS)
    for message in messages:
        assert message["userDir"] == "LAB, dir"
        assert message["message"] == "Open connection; with 'quotes' and \"doubles\"\nnext line"
        assert message["tags"] == {"qs_env": "test"}


def test_sigterm_mid_load_writes_everything_received(
    start_service: StartService, influx_server: InfluxServer, influx_db: str
) -> None:
    service = start_service(mqtt=False)
    datagrams = make_corpus(60_000, seed=7)
    sender = threading.Thread(
        target=send_paced,
        args=(service.udp_port, datagrams, 20_000),  # type: ignore[attr-defined]
    )
    sender.start()
    time.sleep(1.5)
    pids = service.group_pids()
    assert len(pids) >= 5  # supervisor, reader, two workers, writer
    assert service.terminate() == 0
    sender.join()

    counters = service.counters()
    received = counters["received"]
    assert 0 < received < 60_000
    assert counters["written.influxdb"] == received - counters["invalid"] - counters["dropped"]
    assert counters["dropped"] == 0
    assert influx_count(influx_server, influx_db) == counters["written.influxdb"]
    assert service.lingering_pids() == []
    assert "drained; exiting" in service.log


def test_killed_worker_is_replaced(
    start_service: StartService, influx_server: InfluxServer, influx_db: str
) -> None:
    service = start_service(mqtt=False)
    (first_worker, *_) = service.child_pids("worker-0")
    os.kill(first_worker, signal.SIGKILL)
    service.wait_for_log("died: killed by SIGKILL")
    service.wait_for_log("started worker-0", after=service.log.index("died: killed by SIGKILL"))
    assert len(service.child_pids("worker-0")) == 2

    datagrams = make_corpus(20_000, seed=3)
    send_paced(service.udp_port, datagrams, rate=20_000)  # type: ignore[attr-defined]
    service.wait_counter("written.influxdb", 20_000)
    assert influx_count(influx_server, influx_db) == 20_000
    assert service.terminate() == 0
