"""App names from the Qlik Sense Repository Service (QRS), shared with every worker.

Fetch, as Butler SOS does: `GET https://<hostIP>:4242/qrs/app?xrfkey=<16 alphanumerics>`
with the same key in `X-Qlik-Xrfkey` and `X-Qlik-User: UserDirectory=Internal;UserId=
sa_repository`, over mutual TLS with `Butler-SOS.cert`'s client certificate, key
(and passphrase) and CA, every `appNames.extractInterval` ms. A failed refresh keeps the
last good mapping and logs one line.

Share: the supervisor owns one `AppNamesPublisher`, a thread that fetches and writes the
mapping (`{app id in lower case: name}`) as JSON into a runtime directory of its own,
atomically (temporary file + `os.replace`), only when it changed. Each worker's
`AppNamesWatcher` stats that file every report interval (0.5 s) and, when it changed,
reads it and swaps its pipeline's mapping. A worker that starts (or restarts) later reads
the latest mapping at once; nobody restarts; no mutable state is shared.

Why a thread in the supervisor rather than a child process: the work is one small HTTPS
request per minute, blocking I/O that releases the GIL, while the supervisor's loop mostly
waits on its report queue. A thread needs no slot, no readiness report and no restart
policy, and it cannot outlive the supervisor. It holds nothing that must be drained, so
it is a daemon: a request hanging at exit cannot hold the supervisor up.

The server's certificate must chain to `clientCertCA` (the site's Qlik CA) and name the
server: `hostIP` itself (a DNS name, or an IP address in the certificate's IP SANs), or
`senseflow.qrsServerName` when set. Qlik's node certificates name the node's host name,
not its address, so with `hostIP` an address, set `qrsServerName` to that host name
(Butler SOS, through qrs-interact, checks no name at all).
"""

from __future__ import annotations

import functools
import http.client
import logging
import os
import secrets
import shutil
import ssl
import string
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgspec

from shared.config import BUTLER_SECTION, Cert, Config, ConfigError

log = logging.getLogger("senseflow.appnames")

QRS_PORT = 4242
QRS_USER = "UserDirectory=Internal;UserId=sa_repository"
FETCH_TIMEOUT = 10.0
FIRST_FETCH_WAIT = 5.0
"""At start, how long the supervisor waits for the first fetch before starting the workers."""
FILE_NAME = "app-names.json"
_XRF_ALPHABET = string.ascii_letters + string.digits


class QrsApp(msgspec.Struct):
    """The two fields we use of a QRS app entity; the others are ignored."""

    id: str
    name: str


_APPS = msgspec.json.Decoder(list[QrsApp])


def xrf_key() -> str:
    """16 random letters and digits: QRS's cross-site request forgery key."""
    return "".join(secrets.choice(_XRF_ALPHABET) for _ in range(16))


def qrs_tls_context(cert: Cert) -> ssl.SSLContext:
    """Mutual TLS: our client certificate, and a server certificate from the site's CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = True  # against hostIP or qrsServerName: see the module docstring
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=cert.client_cert_ca)
    # A password ("" when none) is always given: OpenSSL would otherwise prompt on the terminal.
    context.load_cert_chain(
        cert.client_cert, cert.client_cert_key, password=cert.client_cert_passphrase or ""
    )
    return context


class NamedHTTPSConnection(http.client.HTTPSConnection):
    """Connects to the address in the URL, and checks the certificate for `server_name`."""

    def __init__(self, host: str, *, server_name: str, **kwargs: Any) -> None:
        super().__init__(host, **kwargs)
        self.server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(  # type: ignore[attr-defined]
            self.sock, server_hostname=self.server_name
        )


class NamedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, context: ssl.SSLContext, server_name: str) -> None:
        super().__init__(context=context)
        self.server_name = server_name

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        connection = functools.partial(NamedHTTPSConnection, server_name=self.server_name)
        return self.do_open(connection, req, context=self._context)  # type: ignore[attr-defined]


class QrsClient:
    """Fetches the app id -> name mapping from one Qlik Sense repository service."""

    def __init__(
        self, host: str, context: ssl.SSLContext, port: int = QRS_PORT, server_name: str = ""
    ) -> None:
        self.base = f"https://{f'[{host}]' if ':' in host else host}:{port}"
        # No proxy: QRS is inside the site; HTTPS_PROXY is meant for the internet (New Relic).
        self.opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), NamedHTTPSHandler(context, server_name or host)
        )

    def fetch(self) -> dict[str, str]:
        """Raises OSError (network, TLS, HTTP status), HTTPException or msgspec.DecodeError."""
        key = xrf_key()
        request = urllib.request.Request(
            f"{self.base}/qrs/app?xrfkey={key}",
            headers={"X-Qlik-Xrfkey": key, "X-Qlik-User": QRS_USER, "Accept": "application/json"},
        )
        with self.opener.open(request, timeout=FETCH_TIMEOUT) as response:
            body = response.read()
        return {app.id.strip().lower(): app.name for app in _APPS.decode(body)}


def publish(path: Path, mapping: dict[str, str]) -> None:
    """Replace the file at `path` atomically: a reader sees the old mapping or the new one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(msgspec.json.encode(mapping))
    os.replace(temporary, path)


class AppNamesPublisher:
    """Owned by the supervisor: fetches from QRS every interval and publishes what changed.

    With `appNames.enableAppNameExtract` off it does nothing and `path` is ''.
    """

    def __init__(self, config: Config) -> None:
        butler = config.butler
        self.enabled = butler.app_names.enable_app_name_extract
        self.interval = butler.app_names.extract_interval / 1000
        self.first_wait = min(FIRST_FETCH_WAIT, config.pipeline.startup_timeout)
        self.host = butler.app_names.host_ip
        self.directory = (
            Path(tempfile.gettempdir()) / f"senseflow-{os.getpid()}-{secrets.token_hex(6)}"
        )
        self.path = str(self.directory / FILE_NAME) if self.enabled else ""
        self.client = (
            QrsClient(
                self.host,
                self._context(butler.cert),
                server_name=config.pipeline.qrs_server_name,
            )
            if self.enabled
            else None
        )
        self.mapping: dict[str, str] | None = None
        self.failing = False
        self.stopping = threading.Event()
        self.first_attempt = threading.Event()
        self.thread: threading.Thread | None = None

    @staticmethod
    def _context(cert: Cert) -> ssl.SSLContext:
        try:
            return qrs_tls_context(cert)
        except OSError as exc:  # ssl.SSLError is one: bad file, wrong passphrase, not PEM
            files = f"{cert.client_cert}, {cert.client_cert_key}, {cert.client_cert_ca}"
            problem = (
                f"{BUTLER_SECTION}.cert: cannot load the files for the QRS API ({files}): {exc}"
            )
            raise ConfigError([problem]) from exc

    def start(self) -> None:
        """Create the runtime directory, start fetching, wait (bounded) for the first try."""
        if not self.enabled:
            return
        self.directory.mkdir(mode=0o700)
        self.thread = threading.Thread(target=self._run, name="appnames", daemon=True)
        self.thread.start()
        self.first_attempt.wait(self.first_wait)

    def stop(self) -> None:
        if self.thread is None:
            return
        self.stopping.set()
        self.thread.join(1.0)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _run(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                self.refresh()
            except Exception:  # a bug here must not stop the service: log it, try again later
                log.exception("app names: refresh crashed; keeping the last names")
            self.first_attempt.set()
            self.stopping.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def refresh(self) -> None:
        assert self.client is not None
        try:
            mapping = self.client.fetch()
        except (OSError, http.client.HTTPException, msgspec.DecodeError) as exc:
            kept = "none" if self.mapping is None else str(len(self.mapping))
            log.warning(
                "app names: refresh from QRS at %s failed (%s); keeping the last names (%s)",
                self.client.base,
                _one_line(exc),
                kept,
            )
            self.failing = True
            return
        if mapping != self.mapping:
            try:
                publish(Path(self.path), mapping)
            except OSError as exc:
                log.warning("app names: cannot write %s: %s", self.path, exc)
                return
            log.info(
                "app names from QRS at %s: %s",
                self.client.base,
                describe_change(self.mapping, mapping),
            )
        elif self.failing:
            log.info("app names: QRS at %s answers again", self.client.base)
        self.mapping = mapping
        self.failing = False


def describe_change(old: dict[str, str] | None, new: dict[str, str]) -> str:
    if old is None:
        return f"{len(new)} app(s)"
    changed = sum(1 for app_id, name in new.items() if old.get(app_id) != name)
    gone = len(old.keys() - new.keys())
    return f"{len(new)} app(s), {changed} new or renamed, {gone} gone"


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:300]
