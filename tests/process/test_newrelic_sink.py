"""The New Relic sink against a local HTTPS stand-in for the Event API.

The stand-in speaks the API as documented: `POST /v1/accounts/<accountId>/events`, a gzipped
JSON array, `Api-Key`; it records every request and answers what a test tells it to.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import http.server
import json
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop

from shared.config import Config, config_from_document
from shared.counters import Counters
from shared.events import EncodedBatch, RawBatch
from tests.e2e.harness import Service, send_paced, udp_port, write_config
from tests.process.tls import Identity, TlsHttpServer, make_ca, make_leaf, server_context
from workers.pipeline import EventPipeline
from workers.writer.sinks import newrelic
from workers.writer.sinks.base import Ack, DestinationUnreachable
from workers.writer.sinks.newrelic import NewRelicSink, retry_after_seconds

ACCOUNTS = [
    {
        "accountName": "First NR account",
        "accountId": "1111111",
        "insertApiKey": "NRII-first-secret-key",
    },
    {
        "accountName": "Second NR account",
        "accountId": "2222222",
        "insertApiKey": "NRII-second-secret-key",
    },
]
KEYS = {f"/v1/accounts/{a['accountId']}/events": a["insertApiKey"] for a in ACCOUNTS}
FIRST, SECOND = (f"/v1/accounts/{a['accountId']}/events" for a in ACCOUNTS)
APP_ID = "3fa85f64-5717-4562-b3fc-2c963f66afa6"
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/119.0.0.0 Safari/537.36"
)


def shake(value: str) -> str:
    return hashlib.shake_256(value.encode()).hexdigest(8)


# -- the stand-in ----------------------------------------------------------------------------


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    events: list[dict[str, Any]]
    status: int = 0


Answer = tuple[int, dict[str, str]]


class EventApi:
    """Records requests; `answer(request)` decides the status and headers (200 by default)."""

    def __init__(self, identity: Identity) -> None:
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.answer: Callable[[Request], Answer] = lambda request: (200, {})
        self.server = TlsHttpServer(self._handler(), server_context(identity))
        self.url = self.server.url

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else each answer waits for a delayed ACK (40 ms)
            timeout = 10

            def do_GET(self) -> None:  # the probe at start
                self.reply(404, {}, b'{"error":"not found"}')

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                if headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                request = Request(self.path, headers, json.loads(body))
                status, extra = api.answer(request)
                request.status = status
                with api.lock:
                    api.requests.append(request)
                text = b'{"success":true,"uuid":"x"}' if status < 300 else b'{"error":"no"}'
                self.reply(status, extra, text)

            def reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def accepted(self, path: str) -> list[dict[str, Any]]:
        """Every event the API took for one account, in the order it took them."""
        with self.lock:
            return [e for r in self.requests if r.path == path and r.status < 300 for e in r.events]

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Identity]:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "nr-ca")
    return {"ca": ca, "server": make_leaf(directory, "nr-server", ca, server_ip="127.0.0.1")}


@pytest.fixture
def api(pki: dict[str, Identity]) -> Iterator[EventApi]:
    stand_in = EventApi(pki["server"])
    yield stand_in
    stand_in.stop()


# -- helpers ---------------------------------------------------------------------------------


def butler_section(url: str) -> dict[str, Any]:
    return {
        "newRelic": {
            "enable": True,
            "event": {
                "url": url + "/",
                "header": [{"name": "X-Custom-Header", "value": "custom-value-42"}],
                "attribute": {"static": [{"name": "service", "value": "senseflow-test"}]},
            },
        },
        "userEvents": {
            "tags": [{"name": "qs_env", "value": "test"}],
            "sendToNewRelic": {
                "enable": True,
                "destinationAccount": [a["accountName"] for a in ACCOUNTS],
                "scramble": True,
            },
        },
        "thirdPartyToolsCredentials": {"newRelic": ACCOUNTS},
    }


def make_config(api: EventApi, ca: Identity, **pipeline: Any) -> Config:
    own = {"newRelicCaFile": ca.cert, "flushInterval": 50, **pipeline}
    return config_from_document({"Butler-SOS": butler_section(api.url), "senseflow": own}, {})


def datagram(index: int) -> bytes:
    return (
        f"/qseow-proxy-session/;sense1;Start session;LAB;user{index};AppAccess;/app/{APP_ID};"
        f"Start session for user 'LAB\\user{index}' UserAgent: {CHROME}"
    ).encode()


def batches(config: Config, count: int, per_batch: int = 100) -> list[EncodedBatch]:
    """Encoded batches as the workers make them, events user0..user<count-1> in order."""
    pipeline = EventPipeline(config)
    start = time.time_ns()
    result = []
    for first in range(0, count, per_batch):
        indexes = range(first, min(first + per_batch, count))
        raw = RawBatch([datagram(i) for i in indexes], [start + i * 1_000_000 for i in indexes])
        result.append(pipeline.process_batch(raw))
    return result


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return uvloop.run(coroutine)


async def deliver(sink: NewRelicSink, encoded: list[EncodedBatch]) -> None:
    await sink.start()
    for batch in encoded:
        await sink.write_batch(batch)
    await sink.close()


def user_ids(events: list[dict[str, Any]]) -> list[str]:
    return [e["qs_userId"] for e in events]


def expected_user_ids(count: int) -> list[str]:
    return [shake(f"user{i}") for i in range(count)]


# -- tests -----------------------------------------------------------------------------------


def test_every_account_gets_every_event(api: EventApi, pki: dict[str, Identity]) -> None:
    config = make_config(api, pki["ca"])
    counters = Counters()
    encoded = batches(config, 1000)
    run(deliver(NewRelicSink(config, counters), encoded))

    assert {r.path for r in api.requests} == {FIRST, SECOND}
    for request in api.requests:
        assert request.headers["api-key"] == KEYS[request.path]
        assert request.headers["content-type"] == "application/json"
        assert request.headers["content-encoding"] == "gzip"
        assert request.headers["x-custom-header"] == "custom-value-42"
        assert len(request.events) <= newrelic.MAX_EVENTS
    for path in (FIRST, SECOND):
        events = api.accepted(path)
        assert user_ids(events) == expected_user_ids(1000)  # all, once, in order
    first = api.accepted(FIRST)[7]
    start_ms = encoded[0].received_ns[0] // 1_000_000
    assert first == {
        "eventType": "qs_userEvent",
        "service": "senseflow-test",
        "qs_env": "test",
        "qs_host": "sense1",
        "qs_event_action": "Start session",
        "qs_userFull": shake("LAB\\user7"),
        "qs_userDirectory": shake("LAB"),
        "qs_userId": shake("user7"),
        "qs_origin": "AppAccess",
        "qs_appId": APP_ID,
        "qs_uaBrowserName": "Chrome",
        "qs_uaBrowserMajorVersion": "119",
        "qs_uaOsName": "Windows",
        "qs_uaOsVersion": "10",
        "timestamp": start_ms + 7,
    }
    values = counters.snapshot()
    assert values["written.newrelic"] == 1000  # once per event, when every account has it
    assert values["newrelic.written.First NR account"] == 1000
    assert values["newrelic.written.Second NR account"] == 1000
    assert "failed.newrelic" not in values


def test_one_ack_per_batch_once_every_account_has_it_with_its_receive_times(
    api: EventApi, pki: dict[str, Identity]
) -> None:
    """The sink's one callback carries what the writer counts and what it measures: each
    batch is acknowledged once (two accounts), its receive times once (not per account)."""
    config = make_config(api, pki["ca"])
    encoded = batches(config, 1000)
    acks: list[Ack] = []
    run(deliver(NewRelicSink(config, Counters(), acks.extend), encoded))

    assert sorted(ack.seq for ack in acks) == [-1] * len(encoded)
    assert sum(ack.written for ack in acks) == 1000
    assert not any(ack.failed for ack in acks)
    delivered = sorted(ns for ack in acks for ns in ack.received_ns)
    assert delivered == sorted(ns for batch in encoded for ns in batch.received_ns)


def test_server_errors_are_retried_in_order_and_nothing_is_lost(
    api: EventApi, pki: dict[str, Identity]
) -> None:
    script = iter([(503, {}), (500, {}), (429, {"Retry-After": "7"}), (408, {}), (502, {})])
    lock = threading.Lock()

    def answer(request: Request) -> Answer:
        if request.path != FIRST:
            return (200, {})
        with lock:
            return next(script, (200, {}))

    api.answer = answer
    slept: list[float] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)  # the delay asked for; the test does not wait for it

    config = make_config(api, pki["ca"])
    counters = Counters()
    run(deliver(NewRelicSink(config, counters, sleep=sleep), batches(config, 3000, per_batch=250)))

    assert user_ids(api.accepted(FIRST)) == expected_user_ids(3000)
    assert user_ids(api.accepted(SECOND)) == expected_user_ids(3000)
    refused = [r.status for r in api.requests if r.status >= 300]
    assert refused == [503, 500, 429, 408, 502]
    assert 7.0 in slept  # Retry-After honoured
    assert len(slept) == 5 and all(0 <= d <= 7.0 for d in slept)
    values = counters.snapshot()
    assert values["retries.newrelic"] == 5
    assert values["written.newrelic"] == 3000
    assert "failed.newrelic" not in values


def test_413_leads_to_smaller_batches(api: EventApi, pki: dict[str, Identity]) -> None:
    api.answer = lambda request: (413, {}) if len(request.events) > 300 else (200, {})
    config = make_config(api, pki["ca"], flushInterval=60_000)  # one big chunk, cut at close
    counters = Counters()
    run(deliver(NewRelicSink(config, counters), batches(config, 2000)))

    for path in (FIRST, SECOND):
        sizes = [len(r.events) for r in api.requests if r.path == path]
        assert sizes[0] == 2000  # first try: everything
        assert max(len(r.events) for r in api.requests if r.path == path and r.status == 200) <= 300
        assert user_ids(api.accepted(path)) == expected_user_ids(2000)
    values = counters.snapshot()
    assert values["written.newrelic"] == 2000
    assert values["newrelic.splits"] > 0


def test_a_body_over_the_size_limit_is_split_before_sending(
    api: EventApi, pki: dict[str, Identity], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(newrelic, "MAX_BODY_BYTES", 4000)
    config = make_config(api, pki["ca"], flushInterval=60_000)
    counters = Counters()
    run(deliver(NewRelicSink(config, counters), batches(config, 500)))

    assert all(r.status == 200 for r in api.requests)  # never sent too large
    assert all(len(gzip.compress(json.dumps(r.events).encode())) < 8000 for r in api.requests)
    assert user_ids(api.accepted(FIRST)) == expected_user_ids(500)
    assert counters.get("written.newrelic") == 500


def test_other_4xx_are_counted_failed_with_a_sample_logged(
    api: EventApi, pki: dict[str, Identity], caplog: pytest.LogCaptureFixture
) -> None:
    api.answer = lambda request: (403, {}) if request.path == SECOND else (200, {})
    config = make_config(api, pki["ca"])
    counters = Counters()
    with caplog.at_level(logging.WARNING, logger="senseflow.newrelic"):
        run(deliver(NewRelicSink(config, counters), batches(config, 600)))

    assert user_ids(api.accepted(FIRST)) == expected_user_ids(600)
    assert [r.status for r in api.requests if r.path == SECOND] == [403] * len(
        [r for r in api.requests if r.path == SECOND]
    )  # never retried
    values = counters.snapshot()
    assert "written.newrelic" not in values  # every event was rejected by one account
    assert values["failed.newrelic"] == 600
    assert values["newrelic.written.First NR account"] == 600
    assert values["newrelic.failed.Second NR account"] == 600
    assert "retries.newrelic" not in values
    assert "rejected" in caplog.text and "HTTP 403" in caplog.text
    for secret in ("NRII-first-secret-key", "NRII-second-secret-key", "custom-value-42"):
        assert secret not in caplog.text


def test_the_writer_waits_when_pending_events_reach_the_bound(
    api: EventApi, pki: dict[str, Identity]
) -> None:
    release = threading.Event()

    def answer(request: Request) -> Answer:
        release.wait(10)
        return (200, {})

    api.answer = answer
    config = make_config(api, pki["ca"], pendingEvents=1)  # bound: 2 x MAX_EVENTS
    bound = 2 * newrelic.MAX_EVENTS
    encoded = batches(config, bound + 500, per_batch=500)
    counters = Counters()

    async def scenario() -> None:
        sink = NewRelicSink(config, counters)
        await sink.start()
        for batch in encoded[:-1]:
            await sink.write_batch(batch)  # up to the bound: taken at once
        last = asyncio.create_task(sink.write_batch(encoded[-1]))
        await asyncio.sleep(0.3)
        assert not last.done()  # the writer waits while the API does not answer
        release.set()
        await last
        await sink.close()

    run(scenario())
    assert user_ids(api.accepted(FIRST)) == expected_user_ids(bound + 500)
    assert counters.get("written.newrelic") == bound + 500


def test_start_fails_for_an_untrusted_certificate(api: EventApi, pki: dict[str, Identity]) -> None:
    document = {"Butler-SOS": butler_section(api.url), "senseflow": {}}
    sink = NewRelicSink(config_from_document(document, {}), Counters())
    with pytest.raises(DestinationUnreachable, match="certificate"):
        run(sink.start())


def test_retry_after_as_seconds_or_http_date() -> None:
    assert retry_after_seconds("12") == 12.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("99999") == newrelic.MAX_RETRY_AFTER
    now = 1_700_000_000.0
    assert retry_after_seconds("Tue, 14 Nov 2023 22:13:50 GMT", now=now) == 30.0


def test_senseflow_run_sends_every_event_to_new_relic(
    api: EventApi, pki: dict[str, Identity], tmp_path: Path
) -> None:
    port = udp_port()
    config = write_config(
        tmp_path / "config.yaml",
        port,
        butler_overrides=butler_section(api.url),
        newRelicCaFile=pki["ca"].cert,
    )
    service = Service(config, tmp_path / "senseflow.log")
    try:
        service.wait_running()
        sent = send_paced(port, [datagram(i) for i in range(5000)], rate=20_000)
        service.wait_counter("written.newrelic", sent)
        assert service.terminate() == 0
    finally:
        service.stop()
    for path in (FIRST, SECOND):
        assert sorted(user_ids(api.accepted(path))) == sorted(expected_user_ids(5000))
    counters = service.counters()
    assert counters["received"] == counters["events"] == 5000
    assert counters["written.newrelic"] == 5000
    assert counters.get("failed.newrelic", 0) == 0
    for secret in ("NRII-first-secret-key", "NRII-second-secret-key"):
        assert secret not in service.log
