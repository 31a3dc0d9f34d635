"""App names from a local mutual-TLS stand-in for the Qlik Sense Repository Service (QRS).

The stand-in follows the real API: it listens on port 4242 (on its own loopback address,
127.0.0.x, so that tests never collide), demands a client certificate from the site's
CA, refuses a request whose `xrfkey` query parameter differs from its `X-Qlik-Xrfkey`
header (as QRS does, 403), and answers `GET /qrs/app` with a JSON list of full app
entities.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import random
import re
import ssl
import tempfile
import time
import urllib.error
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from senseflow.appnames import (
    QRS_PORT,
    QRS_USER,
    AppNamesPublisher,
    QrsClient,
    qrs_tls_context,
)
from shared.config import Config, ConfigError, config_from_document
from tests.e2e.harness import Service, send_paced, udp_port, write_config
from tests.localservers import InfluxServer
from tests.process.tls import (
    Identity,
    TlsHttpServer,
    make_ca,
    make_leaf,
    port_is_free,
    server_context,
)
from workers.appnames import AppNamesWatcher

APP_SALES = "6f1d6b4e-3c4a-4a52-9c1e-1d2f3a4b5c6d"
APP_HR = "0A1B2C3D-4E5F-4061-8273-94A5B6C7D8E9"  # QRS answers in lower case; be lenient
APP_UNKNOWN = "99999999-8888-4777-8666-555555555555"
PASSPHRASE = "correct horse battery staple"
XRF_KEY = re.compile(r"[A-Za-z0-9]{16}")


# -- the stand-in ----------------------------------------------------------------------------


@dataclass
class QrsRequest:
    path: str
    query_key: str
    header_key: str
    user: str
    client_cn: str
    status: int = 0


class Qrs:
    """A QRS stand-in on <host>:4242; `apps` may be changed while it runs."""

    def __init__(self, identity: Identity, client_ca: str, host: str) -> None:
        self.identity = identity
        self.client_ca = client_ca
        self.host = host
        self.apps: dict[str, str] = {}
        self.requests: list[QrsRequest] = []
        self.server: TlsHttpServer | None = None

    def start(self) -> Qrs:
        context = server_context(self.identity, client_ca=self.client_ca)
        self.server = TlsHttpServer(self._handler(), context, self.host, QRS_PORT)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    @property
    def handshake_failures(self) -> int:
        return self.server.handshake_failures if self.server else 0

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        qrs = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True
            timeout = 10

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                keys = urllib.parse.parse_qs(url.query).get("xrfkey", [""])
                request = QrsRequest(
                    url.path,
                    keys[0],
                    self.headers.get("X-Qlik-Xrfkey", ""),
                    self.headers.get("X-Qlik-User", ""),
                    client_common_name(self.connection),
                )
                qrs.requests.append(request)
                if request.query_key != request.header_key or not request.query_key:
                    self.reply(
                        request, 403, b"XSRF prevention check failed. Possible XSRF discovered."
                    )
                elif request.user != "UserDirectory=Internal;UserId=sa_repository":
                    self.reply(request, 403, b"Forbidden")
                elif url.path != "/qrs/app":
                    self.reply(request, 404, b"")
                else:
                    self.reply(request, 200, json.dumps(qrs.entities()).encode())

            def reply(self, request: QrsRequest, status: int, body: bytes) -> None:
                request.status = status
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def entities(self) -> list[dict[str, Any]]:
        """Full app entities, as QRS sends them; we only read `id` and `name`."""
        return [
            {
                "id": app_id,
                "name": name,
                "appId": "",
                "publishTime": "1753-01-01T00:00:00.000Z",
                "published": False,
                "stream": None,
                "fileSize": 1234,
                "lastReloadTime": None,
                "owner": {"id": "5e7b", "userId": "sa_scheduler", "userDirectory": "INTERNAL"},
                "customProperties": [],
                "tags": [],
                "privileges": None,
                "schemaPath": "App",
            }
            for app_id, name in list(self.apps.items())
        ]


def client_common_name(connection: Any) -> str:
    certificate = connection.getpeercert() or {}
    subject: dict[str, str] = dict(pair for rdn in certificate.get("subject", ()) for pair in rdn)
    return subject.get("commonName", "")


def free_loopback_host() -> str:
    """A loopback address of our own whose port 4242 is free (QRS's port is fixed)."""
    candidates = [f"127.0.{random.randrange(0, 255)}.{random.randrange(2, 255)}" for _ in range(50)]
    return next(host for host in candidates if port_is_free(host, QRS_PORT))


@dataclass(frozen=True)
class Pki:
    ca: Identity
    client: Identity
    client_encrypted: Identity
    rogue_client: Identity
    rogue_ca: Identity
    directory: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("qrs-pki")
    ca = make_ca(directory, "qlik-ca")
    rogue = make_ca(directory, "rogue-ca")
    return Pki(
        ca=ca,
        client=make_leaf(directory, "qrs-client", ca),
        client_encrypted=make_leaf(directory, "qrs-client-pw", ca, passphrase=PASSPHRASE),
        rogue_client=make_leaf(directory, "rogue-client", rogue),
        rogue_ca=rogue,
        directory=directory,
    )


@pytest.fixture
def qrs(pki: Pki) -> Iterator[Qrs]:
    host = free_loopback_host()
    server = make_leaf(pki.directory, f"qrs-server-{host}", pki.ca, server_ip=host)
    stand_in = Qrs(server, pki.ca.cert, host)
    stand_in.apps = {APP_SALES: "Sales dashboard", APP_HR: "HR, people & pay"}
    yield stand_in
    stand_in.stop()


def cert_section(
    pki: Pki, encrypted: bool = False, passphrase: str | None = None
) -> dict[str, Any]:
    client = pki.client_encrypted if encrypted else pki.client
    return {
        "clientCert": client.cert,
        "clientCertKey": client.key,
        "clientCertCA": pki.ca.cert,
        "clientCertPassphrase": passphrase,
    }


def app_names_section(qrs: Qrs, pki: Pki, interval: int = 300, **cert: Any) -> dict[str, Any]:
    return {
        "appNames": {"enableAppNameExtract": True, "extractInterval": interval, "hostIP": qrs.host},
        "cert": cert_section(pki, **cert),
    }


def make_config(qrs: Qrs, pki: Pki, **cert: Any) -> Config:
    return config_from_document({"Butler-SOS": app_names_section(qrs, pki, **cert)}, {})


def client(qrs: Qrs, pki: Pki, **cert: Any) -> QrsClient:
    return QrsClient(qrs.host, qrs_tls_context(make_config(qrs, pki, **cert).butler.cert))


def wait_until(condition: Any, timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.05)
    return result


# -- the QRS client --------------------------------------------------------------------------


def test_fetch_over_mutual_tls_with_a_matching_xrfkey(qrs: Qrs, pki: Pki) -> None:
    qrs.start()
    fetcher = client(qrs, pki)
    assert fetcher.fetch() == {APP_SALES: "Sales dashboard", APP_HR.lower(): "HR, people & pay"}
    fetcher.fetch()

    assert [r.status for r in qrs.requests] == [200, 200]
    for request in qrs.requests:
        assert request.path == "/qrs/app"
        assert XRF_KEY.fullmatch(request.query_key)
        assert request.header_key == request.query_key
        assert request.user == QRS_USER == "UserDirectory=Internal;UserId=sa_repository"
        assert request.client_cn == "qrs-client"
    assert qrs.requests[0].query_key != qrs.requests[1].query_key  # a new key per request


def test_an_encrypted_key_is_opened_with_its_passphrase(qrs: Qrs, pki: Pki) -> None:
    qrs.start()
    assert (
        client(qrs, pki, encrypted=True, passphrase=PASSPHRASE).fetch()[APP_SALES]
        == "Sales dashboard"
    )
    for wrong in ("not the passphrase", None):
        with pytest.raises(ConfigError) as failure:
            AppNamesPublisher(make_config(qrs, pki, encrypted=True, passphrase=wrong))
        (problem,) = failure.value.problems
        assert problem.startswith("Butler-SOS.cert: cannot load the files for the QRS API")
        assert PASSPHRASE not in problem and "not the passphrase" not in problem


def test_the_stand_in_rejects_clients_without_an_accepted_certificate(qrs: Qrs, pki: Pki) -> None:
    qrs.start()
    no_certificate = ssl.create_default_context(cafile=pki.ca.cert)
    no_certificate.check_hostname = False
    rogue = ssl.create_default_context(cafile=pki.ca.cert)
    rogue.check_hostname = False
    rogue.load_cert_chain(pki.rogue_client.cert, pki.rogue_client.key)
    for context in (no_certificate, rogue):
        with pytest.raises(OSError):
            QrsClient(qrs.host, context).fetch()
    wait_until(lambda: qrs.handshake_failures == 2, what="two refused handshakes")
    assert qrs.requests == []


def test_a_server_outside_the_site_ca_is_refused(pki: Pki) -> None:
    host = free_loopback_host()
    impostor = make_leaf(pki.directory, f"impostor-{host}", pki.rogue_ca, server_ip=host)
    stand_in = Qrs(impostor, pki.ca.cert, host).start()
    try:
        with pytest.raises(urllib.error.URLError) as refused:
            QrsClient(host, qrs_tls_context(make_config(stand_in, pki).butler.cert)).fetch()
        assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)
        assert stand_in.requests == []
    finally:
        stand_in.stop()


# -- publishing to the workers ---------------------------------------------------------------


def test_a_site_certificate_for_another_server_is_refused(pki: Pki) -> None:
    """Signed by the site's CA, but naming another node: a man in the middle inside the site."""
    host = free_loopback_host()
    other = make_leaf(pki.directory, f"other-node-{host}", pki.ca, server_ip="127.0.0.1")
    stand_in = Qrs(other, pki.ca.cert, host).start()
    try:
        with pytest.raises(urllib.error.URLError) as refused:
            QrsClient(host, qrs_tls_context(make_config(stand_in, pki).butler.cert)).fetch()
        assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)
        assert "IP address mismatch" in str(refused.value.reason)
        assert stand_in.requests == []
    finally:
        stand_in.stop()


def test_qrs_server_name_matches_a_node_certificate_that_names_no_address(pki: Pki) -> None:
    host = free_loopback_host()
    node = make_leaf(pki.directory, f"node-{host}", pki.ca, server_dns="sense-node1.example.test")
    stand_in = Qrs(node, pki.ca.cert, host).start()
    stand_in.apps = {APP_SALES: "Sales dashboard"}
    document = {"Butler-SOS": app_names_section(stand_in, pki)}
    try:
        by_address = AppNamesPublisher(config_from_document(document, {}))
        assert by_address.client is not None
        with pytest.raises(urllib.error.URLError):
            by_address.client.fetch()
        document["senseflow"] = {"qrsServerName": "sense-node1.example.test"}
        by_name = AppNamesPublisher(config_from_document(document, {}))
        assert by_name.client is not None
        assert by_name.client.fetch() == {APP_SALES: "Sales dashboard"}
        document["senseflow"] = {"qrsServerName": "sense-node2.example.test"}
        wrong_name = AppNamesPublisher(config_from_document(document, {}))
        assert wrong_name.client is not None
        with pytest.raises(urllib.error.URLError):
            wrong_name.client.fetch()
    finally:
        stand_in.stop()


def test_published_names_follow_renames_and_outlive_an_outage(
    qrs: Qrs, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    qrs.start()
    publisher = AppNamesPublisher(make_config(qrs, pki))
    caplog.set_level(logging.INFO, logger="senseflow.appnames")
    publisher.start()  # returns after the first fetch
    try:
        watcher = AppNamesWatcher(publisher.path)
        assert watcher.poll() == {APP_SALES: "Sales dashboard", APP_HR.lower(): "HR, people & pay"}
        assert watcher.poll() is None  # unchanged: nothing to reload
        assert oct(os.stat(publisher.directory).st_mode & 0o777) == "0o700"

        qrs.apps[APP_SALES] = "Sales dashboard (2025)"
        renamed = wait_until(watcher.poll, what="the renamed app")
        assert renamed[APP_SALES] == "Sales dashboard (2025)"

        qrs.stop()
        wait_until(lambda: "failed" in caplog.text, what="a failed refresh")
        wait_until(lambda: caplog.text.count("failed") >= 2, what="a second failed refresh")
        assert watcher.poll() is None  # the last good mapping stays published
        failures = [r for r in caplog.records if "failed" in r.getMessage()]
        assert all(r.levelno == logging.WARNING and "\n" not in r.getMessage() for r in failures)
        assert "keeping the last names (2)" in failures[0].getMessage()
    finally:
        publisher.stop()
    assert not publisher.directory.exists()


def test_nothing_is_published_while_extraction_is_off() -> None:
    publisher = AppNamesPublisher(Config())
    publisher.start()
    publisher.stop()
    assert publisher.path == ""
    assert AppNamesWatcher(publisher.path).poll() is None


# -- end to end: senseflow run, real InfluxDB ------------------------------------------------


def datagram(user: str, app_id: str) -> bytes:
    return (
        f"/qseow-proxy-session/;sense1;Start session;LAB;{user};AppAccess;/app/{app_id};"
        f"Start session for user 'LAB\\{user}'"
    ).encode()


class Run:
    """`senseflow run` writing to the session's InfluxDB; events sent one at a time."""

    def __init__(
        self, config: Path, log: Path, influx: InfluxServer, database: str, port: int
    ) -> None:
        self.service = Service(config, log)
        self.influx = influx
        self.database = database
        self.port = port

    def app_name(self, user: str, app_id: str) -> str | None:
        """Send one event and return the appName tag it was written with."""
        send_paced(self.port, [datagram(user, app_id)], rate=1000, sources=1)
        query = f'SELECT "userId_field", "appName" FROM user_events WHERE "userId" = \'{user}\''
        series = wait_until(
            lambda: self.influx.query(query, db=self.database)["results"][0].get("series"),
            timeout=20,
            what=f"the event of {user} in InfluxDB",
        )
        ((_, _, name),) = series[0]["values"]
        return name  # type: ignore[no-any-return]

    def wait_all_workers_reload(self, after: int, workers: int = 2) -> None:
        """Each worker logs when it takes a newly published mapping; wait for all of them."""
        for index in range(workers):
            self.service.wait_for_log(f"[worker-{index}] app names: ", timeout=15, after=after)


@pytest.fixture
def start_run(tmp_path: Path, influx_server: InfluxServer, influx_db: str) -> Iterator[Any]:
    runs: list[Run] = []

    def start(overrides: dict[str, Any], **pipeline: Any) -> Run:
        port = udp_port()
        config = write_config(
            tmp_path / f"config-{len(runs)}.yaml",
            port,
            influx_server,
            influx_db,
            butler_overrides=overrides,
            **pipeline,
        )
        run = Run(config, tmp_path / f"senseflow-{len(runs)}.log", influx_server, influx_db, port)
        runs.append(run)
        run.service.wait_running()
        return run

    yield start
    for run in runs:
        run.service.stop()


def runtime_directories(pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"senseflow-{pid}-*"))


def test_app_names_from_qrs_reach_influxdb_and_follow_renames(
    qrs: Qrs, pki: Pki, start_run: Any
) -> None:
    qrs.start()
    overrides = app_names_section(qrs, pki, encrypted=True, passphrase=PASSPHRASE)
    run = start_run(overrides)
    assert len(runtime_directories(run.service.process.pid)) == 1

    assert run.app_name("alice", APP_SALES) == "Sales dashboard"
    assert run.app_name("bob", APP_HR.lower()) == "HR, people & pay"
    assert run.app_name("carol", APP_UNKNOWN) is None  # unknown: no appName tag

    offset = len(run.service.log)
    qrs.apps[APP_SALES] = "Sales dashboard (renamed)"
    run.wait_all_workers_reload(after=offset)
    for user in ("rename0", "rename1", "rename2", "rename3"):  # whichever worker takes it
        assert run.app_name(user, APP_SALES) == "Sales dashboard (renamed)"

    qrs.stop()
    run.service.wait_for_log("refresh from QRS at")
    run.service.wait_for_log("keeping the last names (2)")
    assert run.app_name("dave", APP_SALES) == "Sales dashboard (renamed)"
    assert run.app_name("erin", APP_HR) == "HR, people & pay"

    assert run.service.terminate() == 0
    assert runtime_directories(run.service.process.pid) == []
    assert PASSPHRASE not in run.service.log
    assert qrs.requests and all(
        r.status == 200 and r.query_key == r.header_key and r.user == QRS_USER for r in qrs.requests
    )


def test_the_names_file_serves_until_qrs_first_answers(
    qrs: Qrs, pki: Pki, start_run: Any, tmp_path: Path
) -> None:
    names_file = tmp_path / "apps.yaml"
    names_file.write_text(f"{APP_SALES}: From the file\n{APP_UNKNOWN}: Only in the file\n")
    run = start_run(app_names_section(qrs, pki), appNamesFile=str(names_file))  # QRS is down
    run.service.wait_for_log("refresh from QRS at")
    assert run.app_name("frank", APP_SALES) == "From the file"

    offset = len(run.service.log)
    qrs.start()  # QRS comes up: its names win
    run.wait_all_workers_reload(after=offset)
    assert run.app_name("heidi", APP_SALES) == "Sales dashboard"
    assert run.app_name("grace", APP_UNKNOWN) is None  # QRS's mapping replaces the file's
    assert run.service.terminate() == 0
