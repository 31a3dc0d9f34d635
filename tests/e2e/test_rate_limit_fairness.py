"""The UDP rate limit in the running service, with two readers (issue 12 §4): every source
gets its share, whichever reader its datagrams land on, and everything is counted."""

from __future__ import annotations

import socket

from tests.e2e.conftest import StartService
from tests.localservers import InfluxServer

SOURCES = 8


def datagram(user: str) -> bytes:
    return f"/qseow-proxy-session/;sense1;Start session;LAB;{user};Proxy;/hub;Start".encode()


def test_a_burst_from_one_proxy_leaves_every_other_proxy_its_share(
    influx_server: InfluxServer, influx_db: str, start_service: StartService
) -> None:
    limit = {"enable": True, "maxMessagesPerMinute": 60}
    guards = {"userEvents": {"udpServerConfig": {"rateLimit": limit}}}
    running = start_service(mqtt=False, butler_overrides=guards, readers=2)
    port: int = running.udp_port  # type: ignore[attr-defined]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:
        flood.bind(("127.0.0.1", 0))
        for _ in range(500):  # one proxy bursts first
            flood.sendto(datagram("flooder"), ("127.0.0.1", port))
    for index in range(2, 2 + SOURCES):  # then the others, one event each
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as proxy:
            proxy.bind((f"127.0.0.{index}", 0))
            proxy.sendto(datagram(f"user{index}"), ("127.0.0.1", port))
    running.wait_counter("received", 500 + SOURCES)
    assert running.terminate() == 0
    counters = running.counters()
    assert counters["received"] == 500 + SOURCES
    assert counters["events"] + counters["dropped.rate_limited"] == 500 + SOURCES
    users = influx_server.query('SHOW TAG VALUES FROM user_events WITH KEY = "userId"', influx_db)
    stored = {value for _, value in users["results"][0]["series"][0]["values"]}
    assert stored == {"flooder"} | {f"user{i}" for i in range(2, 2 + SOURCES)}
    assert counters["dropped.rate_limited"] >= 400  # the flood, at 1 a second
