"""TLS client contexts for the HTTP destinations (InfluxDB): verification on by default."""

from __future__ import annotations

import ssl
from typing import Protocol


class TlsSettings(Protocol):
    @property
    def enable(self) -> bool: ...
    @property
    def ca_file(self) -> str: ...
    @property
    def cert_file(self) -> str: ...
    @property
    def key_file(self) -> str: ...
    @property
    def insecure(self) -> bool: ...


def client_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """None without TLS. The system's trust plus `caFile`; a client certificate when given;
    `insecure` (no verification at all) only when asked for by name. Raises OSError (an
    ssl.SSLError is one) when a file cannot be read."""
    if not tls.enable:
        return None
    context = ssl.create_default_context()
    if tls.ca_file:
        context.load_verify_locations(cafile=tls.ca_file)
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file or None)
    if tls.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def scheme(tls: TlsSettings) -> str:
    return "https" if tls.enable else "http"
