"""One view of the live sessions over several instances (issue 16, docs/OPERATIONS.md).

Behind a UDP load balancer each Sense proxy sticks to one instance, so each instance holds
the sessions of its own proxies' hosts. `/api/sessions` of any instance with
`senseflow.peers` configured asks every peer for its own view (`?local=1`, the same
filters; concurrently, each within `peerTimeout`) and merges: hosts by name; a host on
several instances (its proxy moved) gets the union of its users, and a user found on
several keeps the entry seen last; every count is recomputed from what is shown (a user on
two hosts counts once in the totals). A peer that does not answer is listed in
`missingPeers` and the answer says `partial: true`. `?local=1` answers this instance's
view alone, which is also what stops the peers from asking each other in circles.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from senseflow.httpserver import Request, Response
from shared.logs import RateLimitedLog

log = logging.getLogger("senseflow.peers")
failures = RateLimitedLog(log, interval=60.0)

MAX_PEER_BYTES = 64 << 20

Document = dict[str, Any]


class PeerError(Exception):
    pass


def fetch_peer(base: str, query: str, token: str, timeout: float) -> Document:
    """The peer's own `/api/sessions` document (blocking: run on a worker thread)."""
    url = f"{base.rstrip('/')}/api/sessions?{query}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        ) as answer:
            document = msgspec.json.decode(answer.read(MAX_PEER_BYTES))
    except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts, msgspec.DecodeError
        raise PeerError(str(exc)) from exc
    if not isinstance(document, dict) or not isinstance(document.get("hosts"), list):
        raise PeerError("not a sessions document")
    return document


async def gather_peers(
    peers: list[str], query: str, token: str, timeout: float
) -> tuple[list[Document], list[str]]:
    """(documents of the peers that answered, URLs of those that did not)."""

    async def one(peer: str) -> Document | None:
        try:
            call = asyncio.to_thread(fetch_peer, peer, query, token, timeout)
            return await asyncio.wait_for(call, timeout + 0.5)
        except (PeerError, TimeoutError) as exc:
            failures.warning("sessions: peer %s did not answer: %s", peer, exc)
            return None

    answers = await asyncio.gather(*(one(peer) for peer in peers))
    missing = [peer for peer, answer in zip(peers, answers, strict=True) if answer is None]
    return [answer for answer in answers if answer is not None], missing


def merge_documents(local: Document, others: list[Document], missing: list[str]) -> Document:
    """`local` with the peers' hosts merged in, counts recomputed, `partial` flagged."""
    hosts: dict[str, Document] = {}
    for document in (local, *others):
        for host in document["hosts"]:
            found = hosts.get(host["host"])
            hosts[host["host"]] = host if found is None else merge_host(found, host)
    shown = [hosts[name] for name in sorted(hosts, key=lambda h: (h.casefold(), h))]
    users = {user_identity(u) for host in shown for u in host["active"]}
    totals = {
        "sessions": sum(h["sessions"] for h in shown),
        "users": len(users),
        "connections": sum(h["connections"] for h in shown),
    }
    return {
        **local,
        "totals": totals,
        "hosts": shown,
        "partial": bool(missing),
        "missingPeers": missing,
    }


def merge_host(first: Document, second: Document) -> Document:
    users: dict[tuple[str, str], Document] = {}
    for user in (*first["active"], *second["active"]):
        key = user_identity(user)
        found = users.get(key)
        if found is None or user["lastSeen"] > found["lastSeen"]:
            users[key] = user
    active = sorted(users.values(), key=user_identity)
    return {
        **first,
        "sessions": sum(u["sessions"] for u in active),
        "users": len(active),
        "connections": sum(a["connections"] for u in active for a in u["apps"]),
        "active": active,
    }


def user_identity(user: Document) -> tuple[str, str]:
    """Users compare case-insensitively (shared/sessions.py user_key)."""
    return user["userDirectory"].casefold(), user["userId"].casefold()


def merged_handler(
    local: Callable[[Request], Response],
    peers: list[str],
    token: str,
    timeout: float,
    local_view: Callable[[Request], Response] | None = None,
) -> Callable[[Request], Response | Awaitable[Response]]:
    """Wraps the local `/api/sessions` handler; `?local=1` (or no peers) is the local view,
    answered by `local_view` when given (e.g. with ETags, which only fit a local state)."""
    only_local = local_view or local

    def answer(request: Request) -> Response | Awaitable[Response]:
        if not peers or is_local(request.query):
            return only_local(request)
        own = local(request)
        if own.status != 200:
            return own
        return with_peers(request.query, own)

    async def with_peers(query: str, own: Response) -> Response:
        peer_query = urllib.parse.urlencode([*urllib.parse.parse_qsl(query), ("local", "1")])
        others, missing = await gather_peers(peers, peer_query, token, timeout)
        merged = merge_documents(msgspec.json.decode(own.body), others, missing)
        body = msgspec.json.encode(merged)
        return Response(200, own.content_type, body, own.headers)

    return answer


def is_local(query: str) -> bool:
    values = urllib.parse.parse_qs(query).get("local", [])
    return bool(values) and values[-1] not in ("", "0", "false")
