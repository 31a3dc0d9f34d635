"""Guards from Butler SOS's `udpServerConfig`: source allow-list and rate limit (SPEC 5)."""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Iterable

log = logging.getLogger(__name__)


def resolve_sources(names: Iterable[str]) -> frozenset[str]:
    """IP addresses of the allowed sources; host names are resolved once, at start."""
    allowed: set[str] = set()
    for name in names:
        name = name.strip()
        try:
            allowed.add(str(ipaddress.ip_address(name)))
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(name, None, type=socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            log.warning("allowedSources: cannot resolve %r (%s); it will not be allowed", name, exc)
            continue
        allowed.update(str(info[4][0]) for info in infos)
    # IPv4 senders may arrive on a dual-stack socket as IPv4-mapped IPv6 addresses.
    allowed.update(f"::ffff:{a}" for a in list(allowed) if ":" not in a)
    return frozenset(allowed)


class RateLimiter:
    """Token bucket: `per_minute` datagrams a minute, bursts up to one second's worth or more."""

    def __init__(self, per_minute: int, clock: object = time.monotonic) -> None:
        self._rate = per_minute / 60.0
        self._capacity = max(1.0, self._rate)
        self._tokens = self._capacity
        self._clock = clock
        self._last = self._now()

    def _now(self) -> float:
        return self._clock()  # type: ignore[operator, no-any-return]

    def allow(self) -> bool:
        now = self._now()
        self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
