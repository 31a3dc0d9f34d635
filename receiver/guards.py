"""Guards from Butler SOS's `udpServerConfig`: source allow-list and rate limit (SPEC 5)."""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable

from shared.ipc import SourceCounts

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


IDLE_SECONDS = 60.0
"""A source silent this long stops taking a share of the rate (and leaves the table)."""


class RateLimiter:
    """`per_minute` datagrams a minute for the whole service, shared fairly between sources.

    Each source address has its own token bucket refilled at `per_minute / S`, S being the
    number of sources active in the last minute across every reader (each reader publishes
    its count in `SourceCounts`, shared memory, one slot per reader, no lock). The buckets
    together refill at `per_minute`, whatever the number of readers, and a flood from one
    address empties only its own bucket. The table holds at most `max_sources` addresses; a
    new address past that is refused until one falls idle, so memory stays bounded.
    """

    def __init__(
        self,
        per_minute: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_sources: int = 1024,
        counts: SourceCounts | None = None,
        index: int = 0,
    ) -> None:
        self._total_rate = per_minute / 60.0
        self._clock = clock
        self._max_sources = max_sources
        self._counts = counts
        self._index = index
        # source -> [tokens, time of the last refill]
        self._buckets: dict[str, list[float]] = {}
        self._rate = self._capacity = 0.0
        self._reshare()

    def allow(self, source: str) -> bool:
        now = self._clock()
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self._max_sources:
                return False
            self._buckets[source] = bucket = [0.0, now]
            self._reshare()
            bucket[0] = self._capacity  # a new source starts with a full bucket, as before
        tokens = min(self._capacity, bucket[0] + (now - bucket[1]) * self._rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return True
        bucket[0] = tokens
        return False

    def refresh(self) -> None:
        """Forget idle sources and take the other readers' counts into the share (periodic)."""
        cutoff = self._clock() - IDLE_SECONDS
        for source in [s for s, b in self._buckets.items() if b[1] < cutoff]:
            del self._buckets[source]
        self._reshare()

    def _reshare(self) -> None:
        active = len(self._buckets)
        if self._counts is not None:
            self._counts.publish(self._index, active)
            active = self._counts.total()
        self._rate = self._total_rate / max(1, active)
        self._capacity = max(1.0, self._rate)
