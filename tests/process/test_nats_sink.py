"""workers/writer/sinks/nats.py against real nats-server 2.9 (JetStream on), checked by
reading the stream back with an independent nats-py connection: every event stored once,
on its action's subject, with its `Nats-Msg-Id`; a replay of the same batches (the spool
after a crash) adds nothing; a 3-node R3 cluster losing its stream leader mid-load loses
nothing and stores nothing twice."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from shared.config import Config, config_from_document
from shared.counters import Counters
from shared.events import EncodedBatch
from tests.localservers import NatsCluster, NatsServer
from tests.natsstream import Stored, stream_messages
from tests.process import tls
from workers.writer.sinks.base import DestinationUnreachable
from workers.writer.sinks.nats import ACTION_SUBJECTS, NatsSink

WAIT = 30.0  # upper bound for anything awaited; tests finish far sooner
STREAM = "QLIKSENSE_USER_EVENTS"
PREFIX = "qliksense.userevent"
BASE_NS = 1_700_000_000_000_000_000


def make_batch(start: int, count: int) -> EncodedBatch:
    numbers = range(start, start + count)
    return EncodedBatch(
        lines=b"",
        mqtt_payloads=[b'{"n":%d,"msg":"caf\xc3\xa9 \\"q\\""}' % n for n in numbers],
        actions=bytes(n % 4 for n in numbers),
        newrelic=[],
        received_ns=[BASE_NS + n for n in numbers],
        counters={},
    )


def expected(count: int) -> list[Stored]:
    return [
        (
            f"{PREFIX}.{ACTION_SUBJECTS[n % 4]}",
            f"test-{BASE_NS + n}",
            b'{"n":%d,"msg":"caf\xc3\xa9 \\"q\\""}' % n,
        )
        for n in range(count)
    ]


def nats_config(servers: list[str], **options: Any) -> Config:
    section = {"enable": True, "servers": servers, "msgIdPrefix": "test", **options}
    return config_from_document({"senseflow": {"nats": section}}, {})


async def stream_contents(servers: list[str]) -> list[Stored]:
    return await stream_messages(servers, STREAM, f"{PREFIX}.>", WAIT)


async def publish(sink: NatsSink, total: int, size: int = 250) -> None:
    for start in range(0, total, size):
        await sink.write_batch(make_batch(start, min(size, total - start)))


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    with NatsServer() as server:
        yield server


def test_every_event_stored_once_and_a_replay_adds_nothing(nats_server: NatsServer) -> None:
    counters = Counters()
    config = nats_config([nats_server.url], maxPending=300)

    async def scenario() -> list[Stored]:
        for _ in range(2):  # the second run replays the same batches, as the spool would
            sink = NatsSink(config, counters)
            await sink.start()
            try:
                await publish(sink, 2000)
                await asyncio.wait_for(sink.flush(), WAIT)
                assert not sink.unacked and not sink.batches
            finally:
                await asyncio.wait_for(sink.close(), WAIT)
        return await stream_contents([nats_server.url])

    stored = asyncio.run(scenario())
    assert stored == expected(2000)
    snapshot = counters.snapshot()
    assert snapshot["written.nats"] == 4000  # each run acknowledged all it was given
    assert snapshot["nats.duplicates"] == 2000  # the replay, recognised by its ids


def test_server_restart_mid_load_loses_nothing(nats_server: NatsServer) -> None:
    counters = Counters()
    config = nats_config([nats_server.url], maxPending=500, ackTimeout=1.0)

    async def scenario() -> list[Stored]:
        sink = NatsSink(config, counters)
        await sink.start()
        try:
            await publish(sink, 1000)
            await asyncio.to_thread(nats_server.stop)
            writing = asyncio.ensure_future(publish_from(sink, 1000, 1000))
            await asyncio.to_thread(nats_server.start)
            await asyncio.wait_for(writing, WAIT)
            await asyncio.wait_for(sink.flush(), WAIT)
        finally:
            await asyncio.wait_for(sink.close(), WAIT)
        return await stream_contents([nats_server.url])

    stored = asyncio.run(scenario())
    assert sorted(stored) == sorted(expected(2000))
    assert len({msg_id for _, msg_id, _ in stored}) == 2000
    assert counters.snapshot()["written.nats"] == 2000


async def publish_from(sink: NatsSink, start: int, count: int, size: int = 250) -> None:
    for first in range(start, start + count, size):
        await sink.write_batch(make_batch(first, min(size, start + count - first)))


def test_start_without_a_server_is_unreachable() -> None:
    with NatsServer() as server:
        url = server.url
    sink = NatsSink(nats_config([url]), Counters())

    async def scenario() -> None:
        with pytest.raises(DestinationUnreachable, match="NATS"):
            await sink.start()

    asyncio.run(scenario())


@pytest.mark.slow
def test_r3_cluster_losing_its_stream_leader_mid_load_loses_and_doubles_nothing() -> None:
    counters = Counters()
    total = 6000

    async def scenario(cluster: NatsCluster) -> list[Stored]:
        config = nats_config(cluster.urls, replicas=3, maxPending=1000, ackTimeout=2.0)
        sink = NatsSink(config, counters)
        await sink.start()
        try:
            await publish(sink, total // 2)
            leader = await stream_leader(cluster.urls)
            victim = next(s for s in cluster.servers if s.server_name == leader)
            assert victim.pid is not None
            os.kill(victim.pid, signal.SIGKILL)  # by PID, no goodbye to the cluster
            await asyncio.to_thread(victim.stop)  # reaps it
            await publish_from(sink, total // 2, total // 2)
            await asyncio.wait_for(sink.flush(), WAIT * 2)
        finally:
            await asyncio.wait_for(sink.close(), WAIT)
        replay = NatsSink(config, counters)  # the spool after a crash: everything again
        await replay.start()
        try:
            await publish(replay, total)
            await asyncio.wait_for(replay.flush(), WAIT * 2)
        finally:
            await asyncio.wait_for(replay.close(), WAIT)
        alive = [s.url for s in cluster.servers if s.running]
        return await stream_contents(alive)

    with NatsCluster(3) as cluster:
        stored = asyncio.run(scenario(cluster))
    ids = [msg_id for _, msg_id, _ in stored]
    assert len(ids) == len(set(ids)) == total
    assert sorted(stored) == sorted(expected(total))
    assert counters.snapshot()["written.nats"] == 2 * total


async def stream_leader(servers: list[str]) -> str:
    nc = await nats.connect(servers=servers)
    try:
        info = await nc.jetstream().stream_info(STREAM)
        assert info.cluster is not None and info.cluster.leader
        return info.cluster.leader
    finally:
        await nc.close()


def probe(config: Config) -> tuple[bool, str]:
    """check-config's line for NATS (senseflow/commands/tools.py, via the registry)."""
    from senseflow.commands.tools import check_destinations

    return next(
        (ok, detail) for name, ok, detail in check_destinations(config, 5.0) if name == "nats"
    )


def test_check_config_probes_through_the_registry() -> None:
    with NatsServer(user="senseflow", password="s3cret-pw") as server:
        ok, detail = probe(nats_config([server.url], user="senseflow", password="wrong-pw"))
        assert not ok and detail.startswith(f"NATS {server.url}: "), detail
        assert "Authorization Violation" in detail and "wrong-pw" not in detail
        ok, detail = probe(nats_config([server.url], user="senseflow", password="s3cret-pw"))
        assert (ok, detail) == (
            True,
            f"NATS {server.url} accepted us; JetStream stream {STREAM} takes {PREFIX}.>",
        )
        server.stop()
        ok, detail = probe(nats_config([server.url], user="senseflow", password="s3cret-pw"))
        assert not ok and detail.startswith(f"NATS {server.url}: "), detail


def test_mutual_tls(tmp_path: Path) -> None:
    ca = tls.make_ca(tmp_path, "ca")
    server_id = tls.make_leaf(tmp_path, "server", ca, server_ip="127.0.0.1")
    client = tls.make_leaf(tmp_path, "client", ca)
    counters = Counters()
    with NatsServer(tls=(server_id.cert, server_id.key, ca.cert)) as server:
        assert server.url.startswith("tls://")
        no_client_cert = nats_config([server.url], tls={"caFile": ca.cert})
        ok, detail = probe(no_client_cert)
        assert not ok and detail.startswith(f"NATS {server.url}: "), detail
        config = nats_config(
            [server.url], tls={"caFile": ca.cert, "certFile": client.cert, "keyFile": client.key}
        )

        async def scenario() -> list[Stored]:
            sink = NatsSink(config, counters)
            await sink.start()
            try:
                await publish(sink, 100)
                await asyncio.wait_for(sink.flush(), WAIT)
            finally:
                await asyncio.wait_for(sink.close(), WAIT)
            nc_tls = tls_client_context(ca.cert, client)
            return await stream_messages([server.url], STREAM, f"{PREFIX}.>", WAIT, nc_tls)

        assert asyncio.run(scenario()) == expected(100)
    assert counters.snapshot() == {"written.nats": 100}


def tls_client_context(ca: str, client: tls.Identity) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(client.cert, client.key)
    return context


def test_refused_publishes_are_retried_until_the_stream_is_back(nats_server: NatsServer) -> None:
    """No stream: every publish is answered 503 (no responders); retried with backoff, in
    order, and stored once the stream exists again (no help from `ackTimeout`)."""
    counters = Counters()
    config = nats_config([nats_server.url], ackTimeout=600)

    async def scenario() -> list[Stored]:
        sink = NatsSink(config, counters)
        await sink.start()
        admin = await nats.connect(nats_server.url)
        try:
            await admin.jetstream().delete_stream(STREAM)
            await publish(sink, 100, size=10)
            await until(lambda: counters.snapshot().get("retries.nats", 0) >= 2)
            assert counters.snapshot().get("written.nats", 0) == 0
            await admin.jetstream().add_stream(name=STREAM, subjects=[f"{PREFIX}.>"])
            await asyncio.wait_for(sink.flush(), WAIT)
        finally:
            await admin.close()
            await asyncio.wait_for(sink.close(), WAIT)
        return await stream_contents([nats_server.url])

    assert asyncio.run(scenario()) == expected(100)
    assert counters.snapshot()["written.nats"] == 100
    assert counters.snapshot()["nats.republished"] >= 200


async def until(condition: Any, timeout: float = WAIT) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)
