"""Several instances (issue 16): receive-time residue classes, the config keys, the
`senseflow_instance_info` metric and the merged `/api/sessions` (real HTTP on loopback)."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from receiver.endpoint import instance_clock
from senseflow.httpserver import HttpLimits, HttpServer, Request, Response
from senseflow.metrics import instance_info
from senseflow.peers import merge_documents, merged_handler
from shared.config import ConfigError, Pipeline, config_from_document, instance_name, redact
from tests.localservers import free_ports


def test_two_instances_never_stamp_the_same_nanosecond(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen wall clock is the worst case: every reader of every instance asks at once."""
    monkeypatch.setattr("receiver.endpoint.time.time_ns", lambda: 1_700_000_000_000_000_000)
    stamps: list[int] = []
    for index in range(2):
        pipeline = Pipeline(readers=2, instance_index=index, instances=2)
        for reader in range(2):
            clock = instance_clock(pipeline, reader)
            stamps.extend(clock.next() for _ in range(1000))
    assert len(set(stamps)) == len(stamps) == 4000


def test_one_instance_keeps_the_readers_stride() -> None:
    clocks = [instance_clock(Pipeline(readers=3), reader) for reader in range(3)]
    assert [c.next() % 3 for c in clocks] == [0, 1, 2]
    later = instance_clock(Pipeline(readers=2, instance_index=1, instances=3), 1)
    assert later.next() % 6 == 3  # instance 1 of 3, reader 1 of 2


def own(**keys: Any) -> dict[str, Any]:
    return {"Butler-SOS": {}, "senseflow": keys}


def problems_of(document: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_from_document(document, {})
    return caught.value.problems


def test_instance_keys_are_checked() -> None:
    assert problems_of(own(instanceIndex=3, instances=3, peers=["host:1"], peerTimeout=0)) == [
        "senseflow.instanceIndex: expected 0 <= instanceIndex < instances, found 3 and 3",
        "senseflow.peerTimeout: expected seconds > 0, found 0.0",
        "senseflow.peers: expected http(s)://host:port, found 'host:1'",
    ]
    config = config_from_document(own(peers=["http://b:1"], peerToken="s3cret"), {})
    assert redact("token s3cret", config) == "token ***"
    assert instance_name(config.pipeline) == socket.gethostname()
    assert instance_name(Pipeline(instance="node-a")) == "node-a"


def test_instance_info_is_one_gauge_with_the_name() -> None:
    [sample] = instance_info(Pipeline(instance="node-a", instance_index=1, instances=2)).samples
    assert sample.name == "senseflow_instance_info"
    assert sample.labels == {
        "senseflow_instance": "node-a",
        "instance_index": "1",
        "instances": "2",
    }
    assert sample.value == 1


def user(user_id: str, last_seen: str, sessions: int = 1, connections: int = 0) -> dict[str, Any]:
    apps = [{"appId": None, "appName": None, "connections": connections, "since": last_seen}]
    return {
        "userDirectory": "LAB",
        "userId": user_id,
        "sessions": sessions,
        "since": last_seen,
        "lastSeen": last_seen,
        "browser": None,
        "os": None,
        "apps": apps if connections else [],
    }


def host(name: str, *users: dict[str, Any]) -> dict[str, Any]:
    return {
        "host": name,
        "sessions": sum(u["sessions"] for u in users),
        "users": len(users),
        "connections": sum(a["connections"] for u in users for a in u["apps"]),
        "active": list(users),
    }


def document(*hosts: dict[str, Any]) -> dict[str, Any]:
    return {"at": "2026-01-01T00:00:00.000Z", "totals": {}, "hosts": list(hosts)}


def test_merge_recomputes_every_count() -> None:
    """A user on two hosts counts once; a host on two instances (its proxy moved) keeps
    each user once, the entry seen last."""
    mine = document(host("B", user("ann", "2026-01-01T00:00:01.000Z", 1, 2)))
    theirs = document(
        host("A", user("ann", "2026-01-01T00:00:01.000Z")),
        host(
            "B",
            user("ANN", "2026-01-01T00:00:05.000Z", 2, 1),
            user("bob", "2026-01-01T00:00:02.000Z"),
        ),
    )
    merged = merge_documents(mine, [theirs], ["http://down:1"])
    assert [h["host"] for h in merged["hosts"]] == ["A", "B"]
    b = merged["hosts"][1]
    assert [u["userId"] for u in b["active"]] == ["ANN", "bob"]
    assert (b["sessions"], b["users"], b["connections"]) == (3, 2, 1)
    assert merged["totals"] == {"sessions": 4, "users": 2, "connections": 1}
    assert (merged["partial"], merged["missingPeers"]) == (True, ["http://down:1"])
    assert merged["at"] == mine["at"]


class Instance:
    """An HTTP server answering `/api/sessions` with a fixed local view, merged with peers."""

    def __init__(self, local: dict[str, Any], peers: list[str], token: str = "") -> None:
        self.queries: list[str] = []
        self.http = HttpServer("127.0.0.1", 0, HttpLimits(token=token))
        self.http.route("/api/sessions", merged_handler(self.answer(local), peers, token, 1.0))
        self.url = f"http://127.0.0.1:{self.http.port}"
        self.http.start()

    def answer(self, local: dict[str, Any]) -> Any:
        def handler(request: Request) -> Response:
            self.queries.append(request.query)
            return Response(200, "application/json", json.dumps(local).encode())

        return handler


def get(url: str, token: str = "") -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as answer:
        return json.loads(answer.read())


@pytest.fixture
def two_instances() -> Iterator[tuple[Instance, Instance, str]]:
    (dead_port,) = free_ports(1)  # nothing listens there: a peer that is down
    dead = f"http://127.0.0.1:{dead_port}"
    peer = Instance(document(host("A", user("ann", "2026-01-01T00:00:01.000Z"))), [], "tok")
    first = Instance(
        document(host("B", user("bob", "2026-01-01T00:00:01.000Z"))), [peer.url, dead], "tok"
    )
    yield first, peer, dead
    first.http.stop()
    peer.http.stop()


def test_api_sessions_merges_the_peers_and_names_the_missing(
    two_instances: tuple[Instance, Instance, str],
) -> None:
    first, peer, dead = two_instances
    merged = get(f"{first.url}/api/sessions?user=LAB%5Cbob", "tok")
    assert [h["host"] for h in merged["hosts"]] == ["A", "B"]
    assert merged["totals"]["users"] == 2
    assert (merged["partial"], merged["missingPeers"]) == (True, [dead])
    assert peer.queries == ["user=LAB%5Cbob&local=1"]  # same filters, and no recursion


def test_local_asks_no_peer(two_instances: tuple[Instance, Instance, str]) -> None:
    first, peer, _ = two_instances
    local = get(f"{first.url}/api/sessions?local=1", "tok")
    assert [h["host"] for h in local["hosts"]] == ["B"]
    assert "partial" not in local
    assert peer.queries == []
