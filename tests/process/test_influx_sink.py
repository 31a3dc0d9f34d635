"""workers/writer/sinks/influx.py against a real InfluxDB 1.x and, for 2.x/3.x, a recording
stand-in.

The stand-in is a plain `http.server` on loopback that records every request and answers
/write and /api/v2/write from a script; it is used only where the test influxd cannot
answer (2.x/3.x APIs, the exact requests sent, scripted failures). Authentication is also
checked end to end against an influxd of the test's own started with auth enabled.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import gzip
import json
import threading
import time
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from shared.backoff import Backoff
from shared.config import Config, config_from_document
from shared.counters import Counters
from shared.events import EncodedBatch
from tests.localservers import LOOPBACK, InfluxServer, free_ports
from workers.writer.sinks.base import Ack, Acknowledge, DestinationUnreachable, counting_acks
from workers.writer.sinks.influx import InfluxSink

T0 = 1_700_000_000_000_000_000
WAIT = 10.0  # upper bound for anything awaited; tests finish far sooner


# -- helpers ---------------------------------------------------------------------------------


def make_lines(start: int, count: int, t0: int = T0) -> list[bytes]:
    return [
        b"user_events,host=h%d n=%di %d\n" % (i, i, t0 + i) for i in range(start, start + count)
    ]


def make_batch(lines: list[bytes]) -> EncodedBatch:
    # distinct receive times, so that the acks' latency samples can be told apart
    received = [T0 + i + 1 for i in range(len(lines))]
    return EncodedBatch(
        lines=b"".join(lines),
        mqtt_payloads=[],
        actions=b"",
        newrelic=[],
        received_ns=received,
        counters={},
    )


def influx_config(
    port: int,
    version: int = 1,
    *,
    batch_size: int = 1000,
    flush_interval: int = 60_000,
    **versioned: dict[str, Any],
) -> Config:
    influx: dict[str, Any] = {"enable": True, "host": LOOPBACK, "port": port, "version": version}
    influx |= versioned
    document = {
        "Butler-SOS": {"influxdbConfig": influx},
        "senseflow": {"batchSize": batch_size, "flushInterval": flush_interval},
    }
    return config_from_document(document, {})


def v1_config(port: int, db: str, rp: str = "autogen", **kwargs: Any) -> Config:
    v1 = {"dbName": db, "retentionPolicy": {"name": rp, "duration": kwargs.pop("duration", "0s")}}
    if "auth" in kwargs:
        v1["auth"] = kwargs.pop("auth")
    return influx_config(port, 1, v1Config=v1, **kwargs)


class Deliveries:
    """The sink's acknowledgement callback: counts as a sink without a spool does, and keeps
    the receive times of every delivered chunk (one call per chunk), an event per call."""

    def __init__(self, counters: Counters) -> None:
        self.count = counting_acks(counters, "influxdb")
        self.chunks: list[list[int]] = []
        self.event = asyncio.Event()

    def __call__(self, acks: list[Ack]) -> None:
        self.count(acks)
        self.chunks.append([ns for ack in acks for ns in ack.received_ns])
        self.event.set()

    async def wait(self, chunks: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.chunks) < chunks:
                self.event.clear()
                await self.event.wait()


async def write_all(
    config: Config,
    batches: list[list[bytes]],
    counters: Counters,
    on_ack: Acknowledge | None = None,
    prepare: Callable[[InfluxSink], None] | None = None,
) -> None:
    """Start a sink, write the batches, flush and close it."""
    sink = InfluxSink(config, counters, on_ack)
    if prepare is not None:
        prepare(sink)
    await sink.start()
    try:
        for lines in batches:
            await sink.write_batch(make_batch(lines))
        await asyncio.wait_for(sink.flush(), WAIT)
    finally:
        await asyncio.wait_for(sink.close(), WAIT)


def fast_backoff(sink: InfluxSink) -> None:
    sink.backoff = Backoff(base=0.001, cap=0.01)


def stored_points(influx: InfluxServer, db: str, source: str = "user_events") -> list[list[Any]]:
    answer = influx.query(f"SELECT host, n FROM {source}", db, epoch="ns")
    series = answer["results"][0].get("series", [])
    return series[0]["values"] if series else []


def expected_points(lines: list[bytes]) -> list[list[Any]]:
    points = []
    for line in lines:
        key, value, timestamp = line.split()
        points.append([int(timestamp), key.split(b"=")[1].decode(), int(value[2:-1])])
    return points


# -- a recording HTTP stand-in ---------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class StandIn:
    """Records requests; answers /ping 204, /query 200 and writes from `write_answers` (then 204).

    `reject` marks a write body that must be refused with 400 (as InfluxDB does a bad line).
    """

    write_answers: deque[int] = field(default_factory=deque)
    reject: bytes | None = None
    requests: list[Request] = field(default_factory=list)
    accepted: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    def answer(self, request: Request) -> tuple[int, bytes]:
        with self.lock:
            self.requests.append(request)
            if request.path == "/ping":
                return 204, b""
            if request.path == "/query":
                return 200, b'{"results":[{"statement_id":0}]}'
            if self.write_answers:
                return self.write_answers.popleft(), b'{"error":"scripted failure"}'
            if self.reject is not None and self.reject in request.body:
                return 400, b'{"error":"unable to parse: bad line"}'
            self.accepted.append(request.body)
            return 204, b""

    def writes(self) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path in ("/write", "/api/v2/write")]


class StandInHandler(BaseHTTPRequestHandler):
    server: StandInServer

    def do_GET(self) -> None:
        self.respond()

    def do_POST(self) -> None:
        self.respond()

    def do_HEAD(self) -> None:
        self.respond()

    def respond(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        url = urlsplit(self.path)
        request = Request(
            self.command,
            url.path,
            parse_qs(url.query, keep_blank_values=True),
            dict(self.headers.items()),
            body,
        )
        status, answer = self.server.stand_in.answer(request)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Influxdb-Version", "stand-in")
        if status != 204:
            self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        if status != 204 and self.command != "HEAD":
            self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class StandInServer(ThreadingHTTPServer):
    def __init__(self, stand_in: StandIn) -> None:
        super().__init__((LOOPBACK, 0), StandInHandler)
        self.stand_in = stand_in
        stand_in.port = self.server_address[1]


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    recorder = StandIn()
    server = StandInServer(recorder)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.01}, name="influx-stand-in"
    )
    thread.start()
    try:
        yield recorder
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# -- InfluxDB 1.x, real server ---------------------------------------------------------------


def test_v1_lines_arrive_in_batches_cut_at_batch_size(
    influx_server: InfluxServer, influx_db: str
) -> None:
    lines = make_lines(0, 25)
    counters = Counters()
    delivered = Deliveries(counters)
    config = v1_config(influx_server.port, influx_db, batch_size=10)

    asyncio.run(write_all(config, [lines[i : i + 5] for i in range(0, 25, 5)], counters, delivered))

    assert stored_points(influx_server, influx_db) == expected_points(lines)
    assert counters.snapshot() == {"written.influxdb": 25}
    # cut at 10 twice by the batch size; the rest by flush()
    assert [len(chunk) for chunk in delivered.chunks] == [10, 10, 5]
    assert [ns for chunk in delivered.chunks for ns in chunk] == [T0 + i + 1 for i in range(5)] * 5


def test_v1_a_partial_batch_goes_out_without_a_flush(
    influx_server: InfluxServer, influx_db: str
) -> None:
    counters = Counters()
    delivered = Deliveries(counters)
    config = v1_config(influx_server.port, influx_db, batch_size=1000, flush_interval=20)

    async def scenario() -> None:
        sink = InfluxSink(config, counters, delivered)
        await sink.start()
        try:
            await sink.write_batch(make_batch(make_lines(0, 3)))
            await delivered.wait(1)  # no flush(): a free write slot sent it
            await sink.write_batch(make_batch(make_lines(3, 2)))
            await delivered.wait(2)
        finally:
            await sink.close()

    asyncio.run(scenario())
    assert [len(chunk) for chunk in delivered.chunks] == [3, 2]
    assert stored_points(influx_server, influx_db) == expected_points(make_lines(0, 5))
    assert counters.snapshot() == {"written.influxdb": 5}


@pytest.mark.parametrize(
    "bad_line",
    [
        b"user_events,host=a f=\n",  # unparseable
        b'user_events,host=h3 n="text" 1700000000000000003\n',  # field type conflict
        b"user_events,host=x n=1i 1 trailing-garbage\n",  # unparseable
    ],
)
def test_v1_a_bad_line_is_isolated_and_the_good_lines_are_stored(
    influx_server: InfluxServer, influx_db: str, bad_line: bytes
) -> None:
    good = make_lines(0, 12)
    counters = Counters()
    config = v1_config(influx_server.port, influx_db)
    batch = [*good[:7], bad_line, *good[7:]]

    asyncio.run(write_all(config, [batch], counters))

    assert stored_points(influx_server, influx_db) == expected_points(good)
    assert counters.snapshot() == {"written.influxdb": 12, "failed.influxdb": 1}


def test_v1_creates_the_database_and_retention_policy(influx_server: InfluxServer) -> None:
    db = f"test_rp_{uuid.uuid4().hex}"
    lines = make_lines(0, 4, t0=time.time_ns())  # recent: the policy keeps one hour
    counters = Counters()
    config = v1_config(influx_server.port, db, rp="one_hour", duration="1h")
    try:
        asyncio.run(write_all(config, [lines], counters))
        asyncio.run(write_all(config, [], counters))  # both exist already: start() still works

        answer = influx_server.query(f'SHOW RETENTION POLICIES ON "{db}"')
        policies = {row[0]: row[1] for row in answer["results"][0]["series"][0]["values"]}
        assert policies == {"autogen": "0s", "one_hour": "1h0m0s"}
        assert stored_points(influx_server, db, f'"{db}"."one_hour".user_events') == (
            expected_points(lines)
        )
        assert stored_points(influx_server, db, f'"{db}"."autogen".user_events') == []
        assert counters.snapshot() == {"written.influxdb": 4}
    finally:
        influx_server.query(f'DROP DATABASE "{db}"')


def test_v1_start_fails_clearly_when_nothing_listens() -> None:
    (port,) = free_ports(1)
    sink = InfluxSink(v1_config(port, "db"), Counters())

    async def scenario() -> None:
        with pytest.raises(DestinationUnreachable, match=f"InfluxDB at http://{LOOPBACK}:{port}"):
            await sink.start()
        # retried as onUnreachable: wait does; no session may be left open (warnings are errors)
        with pytest.raises(DestinationUnreachable):
            await sink.start()

    asyncio.run(scenario())
    gc.collect()  # an unclosed aiohttp session would warn now


@pytest.mark.parametrize("auth", [True, False])
def test_v1_sends_basic_auth_when_enabled(stand_in: StandIn, auth: bool) -> None:
    credentials = {"enable": auth, "username": "admin", "password": "pa:ss wörd"}
    config = v1_config(stand_in.port, "senseops", rp="short", duration="2d", auth=credentials)
    lines = make_lines(0, 3)

    asyncio.run(write_all(config, [lines], Counters()))

    token = base64.b64encode("admin:pa:ss wörd".encode()).decode()
    sent = {r.headers.get("Authorization") for r in stand_in.requests}
    assert sent == ({f"Basic {token}"} if auth else {None})
    queries = [parse_qs(r.body.decode())["q"] for r in stand_in.requests if r.path == "/query"]
    assert queries == [
        ["SHOW DATABASES"],
        ['CREATE DATABASE "senseops"'],
        ['CREATE RETENTION POLICY "short" ON "senseops" DURATION 2d REPLICATION 1 DEFAULT'],
    ]
    (write,) = stand_in.writes()
    assert (write.method, write.path, write.body) == ("POST", "/write", b"".join(lines))
    assert write.query == {"db": ["senseops"], "rp": ["short"], "precision": ["ns"]}


class AuthInfluxServer(InfluxServer):
    """influxd with authentication on (the session's test server runs without)."""

    def _config_text(self) -> str:
        text = super()._config_text()
        assert "auth-enabled = false" in text
        return text.replace("auth-enabled = false", "auth-enabled = true")


def query_as(server: InfluxServer, user: str, statement: str, db: str = "") -> dict[str, Any]:
    """InfluxQL with credentials (InfluxServer.query sends none); raises on any error."""
    url = f"{server.url}/query?" + urlencode({"u": user, "p": PASSWORDS[user], "db": db})
    form = urlencode({"q": statement}).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=form), timeout=WAIT) as answer:
        result: dict[str, Any] = json.loads(answer.read())
    assert not any(r.get("error") for r in result["results"]), result
    return result


PASSWORDS = {"admin": "adm1n", "writer": "pässwörd:x"}


def count_as_admin(server: InfluxServer, db: str, rp: str = "autogen") -> int:
    answer = query_as(server, "admin", f'SELECT count(n) FROM "{rp}".user_events', db)
    return int(answer["results"][0]["series"][0]["values"][0][1])


def test_v1_authenticates_to_a_real_influxdb_also_without_admin_privilege() -> None:
    lines = make_lines(0, 5, t0=time.time_ns())

    def config(user: str, db: str, rp: str = "autogen", password: str = "") -> Config:
        auth = {"enable": True, "username": user, "password": password or PASSWORDS[user]}
        return v1_config(server.port, db, rp=rp, duration="7d", auth=auth)

    with AuthInfluxServer() as server:
        # the first user may be created without credentials
        server.query(f"CREATE USER admin WITH PASSWORD '{PASSWORDS['admin']}' WITH ALL PRIVILEGES")
        # an admin creates what is missing
        counters = Counters()
        asyncio.run(write_all(config("admin", "made", "week"), [lines], counters))
        assert count_as_admin(server, "made", "week") == 5
        # a user with WRITE only on databases that exist (the usual Butler SOS setup)
        for statement in [
            "CREATE DATABASE existing",
            'CREATE RETENTION POLICY "week" ON existing DURATION 7d REPLICATION 1',
            f"CREATE USER writer WITH PASSWORD '{PASSWORDS['writer']}'",
            "GRANT WRITE ON existing TO writer",
        ]:
            query_as(server, "admin", statement)
        for rp in ("autogen", "week"):
            asyncio.run(write_all(config("writer", "existing", rp), [lines], counters))
            assert count_as_admin(server, "existing", rp) == 5
        assert counters.snapshot() == {"written.influxdb": 15}

        async def refused(cfg: Config) -> str:
            with pytest.raises(DestinationUnreachable) as refusal:
                await InfluxSink(cfg, Counters()).start()
            return str(refusal.value)

        assert "authorization failed" in asyncio.run(
            refused(config("writer", "existing", password="wrong"))
        )
        # creating a database that does not exist needs admin privilege: said at start
        assert "requires admin privilege" in asyncio.run(refused(config("writer", "missing")))


# -- InfluxDB 2.x / 3.x, stand-in ------------------------------------------------------------


def v2_config(port: int, **kwargs: Any) -> Config:
    v2 = {"org": "my org", "bucket": "bucket/one", "token": "tok-2"}
    return influx_config(port, 2, v2Config=v2, **kwargs)


def v3_config(port: int, **kwargs: Any) -> Config:
    v3 = {"database": "db3", "token": "tok-3", "writeTimeout": 5000}
    return influx_config(port, 3, v3Config=v3, **kwargs)


CONFIGS: dict[int, Callable[..., Config]] = {
    1: lambda port, **kw: v1_config(port, "db1", **kw),
    2: v2_config,
    3: v3_config,
}


@pytest.mark.parametrize(
    ("version", "org", "bucket", "token"),
    [(2, "my org", "bucket/one", "tok-2"), (3, "", "db3", "tok-3")],
)
def test_v2_and_v3_write_line_protocol_to_the_v2_api(
    stand_in: StandIn, version: int, org: str, bucket: str, token: str
) -> None:
    lines = make_lines(0, 6)
    counters = Counters()
    config = CONFIGS[version](stand_in.port, batch_size=3)

    asyncio.run(write_all(config, [lines[:3], lines[3:]], counters))

    assert (stand_in.requests[0].method, stand_in.requests[0].path) == ("GET", "/ping")
    writes = stand_in.writes()
    assert [w.body for w in writes] == [b"".join(lines[:3]), b"".join(lines[3:])]
    for write in writes:
        assert (write.method, write.path) == ("POST", "/api/v2/write")
        assert write.query == {"org": [org], "bucket": [bucket], "precision": ["ns"]}
        assert write.headers["Authorization"] == f"Token {token}"
        assert write.headers["Content-Type"].startswith("text/plain")
    assert counters.snapshot() == {"written.influxdb": 6}


def test_v2_sink_built_outside_the_event_loop_as_the_writer_does(stand_in: StandIn) -> None:
    counters = Counters()
    sink = InfluxSink(v2_config(stand_in.port), counters)  # no running loop here

    async def scenario() -> None:
        await sink.start()
        await sink.write_batch(make_batch(make_lines(0, 2)))
        await sink.close()

    asyncio.run(scenario())
    assert stand_in.accepted == [b"".join(make_lines(0, 2))]
    assert counters.snapshot() == {"written.influxdb": 2}


@pytest.mark.parametrize("version", [2, 3])
def test_v2_and_v3_start_fails_clearly_when_nothing_listens(version: int) -> None:
    (port,) = free_ports(1)

    async def scenario() -> None:
        sink = InfluxSink(CONFIGS[version](port), Counters())
        for _ in range(2):  # a retried start() leaves no client session open
            with pytest.raises(
                DestinationUnreachable, match=f"InfluxDB at http://{LOOPBACK}:{port}"
            ):
                await sink.start()

    asyncio.run(scenario())
    gc.collect()  # an unclosed aiohttp session would warn now


@pytest.mark.parametrize("version", [1, 2, 3])
def test_transient_failures_are_retried_in_order_and_nothing_is_lost(
    stand_in: StandIn, version: int
) -> None:
    stand_in.write_answers.extend([503, 503])
    lines = make_lines(0, 15)
    counters = Counters()
    config = CONFIGS[version](stand_in.port, batch_size=5)

    asyncio.run(
        write_all(
            config, [lines[i : i + 5] for i in range(0, 15, 5)], counters, prepare=fast_backoff
        )
    )

    bodies = [w.body for w in stand_in.writes()]
    first = b"".join(lines[:5])
    assert bodies == [first, first, first, b"".join(lines[5:10]), b"".join(lines[10:])]
    assert stand_in.accepted == [first, b"".join(lines[5:10]), b"".join(lines[10:])]
    assert counters.snapshot() == {"retries.influxdb": 2, "written.influxdb": 15}


@pytest.mark.parametrize("status", [500, 502, 429, 408])
def test_other_transient_statuses_are_retried(stand_in: StandIn, status: int) -> None:
    stand_in.write_answers.append(status)
    lines = make_lines(0, 3)
    counters = Counters()

    asyncio.run(write_all(v2_config(stand_in.port), [lines], counters, prepare=fast_backoff))

    assert stand_in.accepted == [b"".join(lines)]
    assert counters.snapshot() == {"retries.influxdb": 1, "written.influxdb": 3}


@pytest.mark.parametrize("version", [1, 2, 3])
def test_a_rejected_batch_is_split_until_the_bad_line_is_alone(
    stand_in: StandIn, version: int
) -> None:
    stand_in.reject = b"host=bad"
    good = make_lines(0, 9)
    counters = Counters()
    batch = [*good[:5], b"user_events,host=bad n=1i 1\n", *good[5:]]

    asyncio.run(write_all(CONFIGS[version](stand_in.port), [batch], counters))

    # The stand-in stores nothing of a refused body: every good line was sent again, once
    # and in order, and the bad line was tried alone before being given up.
    assert b"".join(stand_in.accepted) == b"".join(good)
    assert b"user_events,host=bad n=1i 1\n" in [w.body for w in stand_in.writes()]
    assert counters.snapshot() == {"written.influxdb": 9, "failed.influxdb": 1}
