"""Certificates made by the tests (openssl CLI) and a threaded HTTPS server for stand-ins.

Every key is an EC P-256 key (fast to make); certificates are valid for two days.
"""

from __future__ import annotations

import http.server
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DAYS = "2"


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class Identity:
    cert: str
    key: str


def make_ca(directory: Path, name: str) -> Identity:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-days",
        DAYS,
        "-subj",
        f"/CN={name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    return Identity(str(cert), str(key))


def make_leaf(
    directory: Path,
    name: str,
    ca: Identity,
    *,
    server_ip: str = "",
    passphrase: str = "",
    server_dns: str = "",
) -> Identity:
    """A server certificate for `server_ip` (or, with `server_dns`, for that DNS name
    only, as Qlik's node certificates are), or (without either) a client certificate."""
    cert, key, csr = (directory / f"{name}{suffix}" for suffix in (".pem", ".key", ".csr"))
    openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        f"/CN={server_dns or server_ip or name}",
    )
    extensions = directory / f"{name}.ext"
    usage = "serverAuth" if server_ip or server_dns else "clientAuth"
    lines = [
        "basicConstraints=CA:FALSE",
        f"extendedKeyUsage={usage}",
        "subjectKeyIdentifier=hash",
        "authorityKeyIdentifier=keyid",
    ]
    if server_dns:
        lines.append(f"subjectAltName=DNS:{server_dns}")
    elif server_ip:
        lines.append(f"subjectAltName=IP:{server_ip}")
    extensions.write_text("\n".join(lines) + "\n")
    openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        ca.cert,
        "-CAkey",
        ca.key,
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        DAYS,
        "-extfile",
        str(extensions),
    )
    if passphrase:
        encrypted = directory / f"{name}-encrypted.key"
        openssl(
            "pkey",
            "-in",
            str(key),
            "-out",
            str(encrypted),
            "-aes256",
            "-passout",
            f"pass:{passphrase}",
        )
        key = encrypted
    return Identity(str(cert), str(key))


def server_context(identity: Identity, client_ca: str = "") -> ssl.SSLContext:
    """TLS for a stand-in; with `client_ca`, clients must show a certificate from it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(identity.cert, identity.key)
    if client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=client_ca)
    return context


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: TlsHttpServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.owner.handshake_failures += 1  # a client without an acceptable certificate


class TlsHttpServer:
    """A threaded HTTPS server on a loopback address; `stop()` makes it unreachable."""

    def __init__(
        self,
        handler: type[http.server.BaseHTTPRequestHandler],
        context: ssl.SSLContext,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.host = host
        self.context = context
        self.handshake_failures = 0
        self._server = _Server((host, port), handler, bind_and_activate=True)
        self._server.owner = self
        self._server.socket = context.wrap_socket(
            self._server.socket, server_side=True, do_handshake_on_connect=False
        )
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="stand-in"
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(10)
            self._server.server_close()

    def __enter__(self) -> TlsHttpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True
