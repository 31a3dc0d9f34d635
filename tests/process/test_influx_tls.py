"""InfluxDB over HTTPS (issue 12 §4): a real influxd 1.x with `https-enabled`, and a TLS
stand-in that demands a client certificate for the 2.x/3.x write API."""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import pytest

from senseflow.commands.tools import check_influxdb
from senseflow.influxstats import InfluxTarget
from shared.config import Config, config_from_document
from shared.counters import Counters
from tests.localservers import LOOPBACK, InfluxServer
from tests.process.test_influx_sink import make_lines, write_all
from tests.process.tls import Identity, TlsHttpServer, make_ca, make_leaf, server_context
from workers.writer.sinks.base import DestinationUnreachable

WAIT = 10.0


class HttpsInfluxServer(InfluxServer):
    """influxd 1.x serving HTTPS only, with a certificate from the test CA."""

    def __init__(self, workdir: Path, server: Identity, ca_file: str) -> None:
        super().__init__(workdir)
        self.identity = server
        self.context = ssl.create_default_context(cafile=ca_file)

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def _config_text(self) -> str:
        https = (
            "  https-enabled = true\n"
            f'  https-certificate = "{self.identity.cert}"\n'
            f'  https-private-key = "{self.identity.key}"\n'
        )
        return super()._config_text().replace("[http]\n", "[http]\n" + https)

    def _is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=1, context=self.context) as r:
                return bool(r.status == 204)
        except OSError:
            return False

    def count(self, db: str) -> int:
        form = urllib.parse.urlencode({"q": "SELECT count(n) FROM user_events", "db": db})
        request = urllib.request.Request(f"{self.url}/query", data=form.encode())
        with urllib.request.urlopen(request, timeout=WAIT, context=self.context) as answer:
            result: dict[str, Any] = json.loads(answer.read())
        series = result["results"][0].get("series")
        return int(series[0]["values"][0][1]) if series else 0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Identity]:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "test-ca")
    return {
        "ca": ca,
        "server": make_leaf(directory, "influx", ca, server_ip=LOOPBACK),
        "client": make_leaf(directory, "senseflow-client", ca),
    }


@pytest.fixture(scope="module")
def https_influx(
    pki: dict[str, Identity], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HttpsInfluxServer]:
    with HttpsInfluxServer(tmp_path_factory.mktemp("influxd"), pki["server"], pki["ca"].cert) as s:
        yield s


def config(port: int, version: int = 1, **tls: Any) -> Config:
    influx: dict[str, Any] = {"enable": True, "host": LOOPBACK, "port": port, "version": version}
    influx |= {
        1: {"v1Config": {"dbName": "secure"}},
        2: {"v2Config": {"org": "o", "bucket": "b", "token": "tok-2"}},
        3: {"v3Config": {"database": "d3", "token": "tok-3"}},
    }[version]
    document = {
        "Butler-SOS": {"influxdbConfig": influx},
        "senseflow": {"flushInterval": 60_000, "influxTls": {"enable": True, **tls}},
    }
    return config_from_document(document, {})


def test_v1_writes_over_https_to_a_real_influxd(
    https_influx: HttpsInfluxServer, pki: dict[str, Identity]
) -> None:
    secure = config(https_influx.port, caFile=pki["ca"].cert)
    counters = Counters()
    asyncio.run(write_all(secure, [make_lines(0, 5)], counters))
    assert https_influx.count("secure") == 5
    assert counters.snapshot() == {"written.influxdb": 5}
    InfluxTarget(secure).post(b"user_events,host=stats n=9i 1\n")  # the queue-metrics path
    assert https_influx.count("secure") == 6
    ok, detail = check_influxdb(secure, WAIT)
    assert ok, detail
    assert detail.startswith("InfluxDB 1.") and f"https://{LOOPBACK}" in detail


def test_the_server_certificate_is_verified_by_default(https_influx: HttpsInfluxServer) -> None:
    unverified = config(https_influx.port)  # our CA is not in the system's trust
    with pytest.raises(DestinationUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(write_all(unverified, [make_lines(0, 1)], Counters()))
    ok, detail = check_influxdb(unverified, WAIT)
    assert not ok and "CERTIFICATE_VERIFY_FAILED" in detail
    asyncio.run(
        write_all(config(https_influx.port, insecure=True), [make_lines(10, 1)], Counters())
    )


class WriteApi(BaseHTTPRequestHandler):
    bodies: ClassVar[list[bytes]] = []

    def do_GET(self) -> None:
        self.answer()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.startswith("/api/v2/write"):
            WriteApi.bodies.append(body)
        self.answer()

    def answer(self) -> None:
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize("version", [2, 3])
def test_v2_and_v3_present_a_client_certificate(pki: dict[str, Identity], version: int) -> None:
    context = server_context(pki["server"], client_ca=pki["ca"].cert)
    WriteApi.bodies = []
    with TlsHttpServer(WriteApi, context) as stand_in:
        client = {"certFile": pki["client"].cert, "keyFile": pki["client"].key}
        with_cert = config(stand_in.port, version, caFile=pki["ca"].cert, **client)
        asyncio.run(write_all(with_cert, [make_lines(0, 3)], Counters()))
        assert WriteApi.bodies == [b"".join(make_lines(0, 3))]
        without = config(stand_in.port, version, caFile=pki["ca"].cert)
        with pytest.raises(DestinationUnreachable):
            asyncio.run(write_all(without, [make_lines(3, 1)], Counters()))
        assert stand_in.handshake_failures >= 1


def test_unreadable_tls_files_are_reported_not_crashed_on(tmp_path: Path) -> None:
    broken = config(9, caFile=str(tmp_path / "missing.pem"))
    with pytest.raises(DestinationUnreachable, match="cannot load TLS files"):
        asyncio.run(write_all(broken, [make_lines(0, 1)], Counters()))
    ok, detail = check_influxdb(broken, WAIT)
    assert not ok and "influxTls" in detail
