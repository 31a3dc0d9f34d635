"""Three instances behind a real nginx (deploy/nginx-udp.conf), one view of the sessions.

Eight simulated Sense proxies, each its own source address (127.0.0.2-9, all routed to
lo) and its own Sense host, send session scenarios through nginx, which hashes the source
address onto one of three `senseflow run` instances. Each instance lists the other two as
`senseflow.peers`. Expected, before any failure: zero loss, each proxy's host counted on
exactly one instance (the `senseflow_instance` tag of the event counts), and the merged
`/api/sessions` of every instance equal to the ground truth.

Then one instance that holds proxies is SIGKILLed (its whole process group, as a machine
loss) and the scenarios go on. nginx does not notice a dead UDP upstream (it expects no
replies), so the dead instance's proxies keep being sent to it: their events after the
kill are lost at the UDP level, and the test expects exactly that (their counts stay at
what was delivered before the kill). Everything else arrives: the other hosts' counts and
sessions are exact, and the survivors' merged view says `partial` with the dead peer in
`missingPeers`.
"""

from __future__ import annotations

import json
import random
import socket
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.events import ACTIONS
from shared.sessions import SessionEvent, SessionState
from tests.e2e.harness import Service, influx_count, udp_port
from tests.e2e.loadbalancer import Nginx
from tests.e2e.observe import wait_for
from tests.localservers import InfluxServer, free_ports

pytestmark = pytest.mark.slow

StartService = Callable[..., Service]
INSTANCES = 3
SOURCES = [f"127.0.0.{n}" for n in range(2, 10)]
HOST_OF = {source: f"SENSE{n}" for n, source in enumerate(SOURCES, 1)}
APPS = ("3a64c6ff-94b3-4d4b-9b4e-8a6a8b6f1a11", "5c3e1f0a-1111-4a2b-9c3d-0123456789ab", "")
EVENT_COUNTS = {
    "qlikSenseEvents": {
        "influxdb": {"enable": True, "writeFrequency": 300},
        "eventCount": {"enable": True},
    },
}


def datagram(action: str, host: str, user: str, app_id: str) -> bytes:
    source = "qseow-proxy-session" if "session" in action else "qseow-proxy-connection"
    context = f"/app/{app_id}" if app_id else "/hub"
    message = f"{action} for user 'LAB\\{user}' UserAgent: Mozilla/5.0 Firefox/120.0"
    return f"/{source}/;{host};{action};LAB;{user};AppAccess;{context};{message}".encode()


class Scenario:
    """Users starting sessions, opening and closing apps, stopping, on every host; the
    ground truth is the events applied in sending order (one proxy's order is kept: one
    socket, one nginx worker by `reuseport`, one instance)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.open: dict[tuple[str, str], list[str]] = {}
        self.events: list[tuple[str, SessionEvent]] = []

    def next(self) -> tuple[str, bytes]:
        rng = self.rng
        source = rng.choice(SOURCES)
        host, user = HOST_OF[source], f"user{rng.randrange(30)}"
        apps = self.open.get((host, user))
        if apps is None:
            action, app = "Start session", ""
            self.open[(host, user)] = []
        elif apps and rng.random() < 0.4:
            action, app = "Close connection", apps.pop(rng.randrange(len(apps)))
        elif rng.random() < 0.15:
            action, app = "Stop session", ""
            del self.open[(host, user)]
        else:
            action, app = "Open connection", rng.choice(APPS)
            apps.append(app)
        event = SessionEvent(len(self.events), ACTIONS.index(action), host, "LAB", user, app)
        self.events.append((source, event))
        return source, datagram(action, host, user, app)

    def truth(self, hosts: set[str]) -> Any:
        state = SessionState(86_400 * 10**9)
        for _, event in self.events:
            if event.host in hosts:
                state.apply(event)
        return without_times(state.snapshot(state.clock_ns + 1))


def without_times(document: dict[str, Any]) -> Any:
    if isinstance(document, dict):
        return {
            k: without_times(v)
            for k, v in document.items()
            if k not in ("at", "since", "lastSeen", "browser", "os", "partial", "missingPeers")
        }
    if isinstance(document, list):
        return [without_times(item) for item in document]
    return document


class Proxies:
    """One UDP socket per simulated Sense proxy, bound to its own loopback address."""

    def __init__(self, target: int) -> None:
        self.target = ("127.0.0.1", target)
        self.sockets = {}
        for source in SOURCES:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((source, 0))
            self.sockets[source] = sock
        self.sent: Counter[str] = Counter()

    def send(self, scenario: Scenario, count: int, rate: float = 2000) -> None:
        started = time.monotonic()
        for index in range(count):
            source, data = scenario.next()
            self.sockets[source].sendto(data, self.target)
            self.sent[HOST_OF[source]] += 1
            if index % 50 == 49:  # paced: a loss here would be the test's, not the system's
                time.sleep(max(0.0, started + (index + 1) / rate - time.monotonic()))

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()


@pytest.fixture
def proxies_and_instances(
    start_service: StartService, tmp_path: Path
) -> Iterator[tuple[Proxies, list[Service], list[str]]]:
    http_ports = free_ports(INSTANCES)
    urls = [f"http://127.0.0.1:{port}" for port in http_ports]
    instances = [
        start_service(
            mqtt=False,
            butler_overrides=EVENT_COUNTS,
            httpPort=http_ports[i],
            instance=f"node{i}",
            instanceIndex=i,
            instances=INSTANCES,
            peers=[url for url in urls if url != urls[i]],
            peerTimeout=1.0,
        )
        for i in range(INSTANCES)
    ]
    nginx = Nginx(tmp_path / "nginx", udp_port(), [s.udp_port for s in instances])  # type: ignore[attr-defined]
    proxies = Proxies(nginx.port)
    yield proxies, instances, urls
    proxies.close()
    nginx.stop()


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def wait_merged(url: str, expected: Any, missing: list[str]) -> None:
    """The merged `/api/sessions` of `url` shows `expected`; `missing` peers are named."""

    def shown() -> bool:
        return bool(without_times(get(f"{url}/api/sessions")) == expected)

    wait_for(shown, 15, f"merged /api/sessions of {url} equal to the ground truth")
    merged = get(f"{url}/api/sessions")
    assert (merged["partial"], merged["missingPeers"]) == (bool(missing), missing)


def counts_by_host_and_instance(influx: InfluxServer, db: str) -> dict[tuple[str, str], int]:
    answer = influx.query(
        'SELECT sum("counter") FROM "event_count" GROUP BY "host", "senseflow_instance"', db=db
    )
    return {
        (s["tags"]["host"], s["tags"]["senseflow_instance"]): int(s["values"][0][1])
        for s in answer["results"][0].get("series", [])
    }


def placement(influx: InfluxServer, db: str, sent: Counter[str]) -> dict[str, str] | None:
    """host -> the one instance that counted it, once every sent event is counted."""
    counts = counts_by_host_and_instance(influx, db)
    if Counter({host: n for (host, _), n in counts.items()}) != sent:
        return None
    return {host: instance for (host, instance) in counts}


def test_three_instances_behind_nginx_give_one_view_and_survive_a_loss(
    proxies_and_instances: tuple[Proxies, list[Service], list[str]],
    influx_server: InfluxServer,
    influx_db: str,
) -> None:
    proxies, instances, urls = proxies_and_instances
    scenario = Scenario(seed=16)
    proxies.send(scenario, 2400)

    wait_for(lambda: influx_count(influx_server, influx_db) == 2400, 30, "zero loss")
    where = wait_for(lambda: placement(influx_server, influx_db, proxies.sent), 15, "counts")
    assert len(counts_by_host_and_instance(influx_server, influx_db)) == len(SOURCES)
    everyone = set(HOST_OF.values())
    for url in urls:
        wait_merged(url, scenario.truth(everyone), [])
    with urllib.request.urlopen(f"{urls[0]}/metrics", timeout=10) as answer:
        info = (
            'senseflow_instance_info{instance_index="0",instances="3",senseflow_instance="node0"}'
        )
        assert f"{info} 1.0" in answer.read().decode()
    local_hosts = [{h["host"] for h in get(f"{url}/api/sessions?local=1")["hosts"]} for url in urls]
    for index, hosts in enumerate(local_hosts):
        assert hosts <= {host for host, node in where.items() if node == f"node{index}"}

    held = Counter(where.values())  # the instance holding the fewest proxies, at least one
    victim = int(min(held, key=lambda node: held[node]).removeprefix("node"))
    instances[victim].kill_group()
    lost_hosts = {host for host, node in where.items() if node == f"node{victim}"}
    delivered = Counter({host: n for host, n in proxies.sent.items() if host not in lost_hosts})
    before_kill = Counter({host: proxies.sent[host] for host in lost_hosts})
    proxies.send(scenario, 1200)

    survivors = everyone - lost_hosts
    kept = Counter({host: n for host, n in proxies.sent.items() if host in survivors})
    wait_for(
        lambda: placement(influx_server, influx_db, kept + before_kill),
        30,
        "every event of the survivors' proxies counted, the dead one's as before the kill",
    )
    assert delivered != kept  # the survivors' proxies did send after the kill
    total = sum((kept + before_kill).values())
    wait_for(lambda: influx_count(influx_server, influx_db) == total, 30, "nothing else lost")
    expected = scenario.truth(survivors)
    for url in urls[:victim] + urls[victim + 1 :]:
        wait_merged(url, expected, [urls[victim]])
