"""Reading a JetStream stream back with an independent nats-py connection, for tests."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats
import nats.errors
from nats.js.api import ConsumerConfig, DeliverPolicy

T = TypeVar("T")
Stored = tuple[str, str, bytes]
"""subject, Nats-Msg-Id, payload"""


async def retried(request: Callable[[], Awaitable[T]], attempts: int = 3) -> T:
    """A JetStream API request, asked again when it times out: a cluster electing a new
    leader after a node kill may let requests time out (seen in CI)."""
    for _ in range(attempts - 1):
        try:
            return await request()
        except nats.errors.TimeoutError:
            pass
    return await request()


async def stream_messages(
    servers: list[str],
    stream: str,
    subjects: str,
    timeout: float = 30.0,
    tls: ssl.SSLContext | None = None,
) -> list[Stored]:
    """Every message of the stream, in stream order (an ephemeral pull consumer)."""
    nc = await nats.connect(servers=servers, tls=tls)
    try:
        js = nc.jetstream(timeout=timeout)  # a cluster that just lost a node is slow to answer
        stored = (await retried(lambda: js.stream_info(stream))).state.messages
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        sub = await retried(lambda: js.pull_subscribe(subjects, stream=stream, config=config))
        found: list[Stored] = []
        while len(found) < stored:
            for msg in await sub.fetch(min(1000, stored - len(found)), timeout=timeout):
                found.append((msg.subject, (msg.headers or {}).get("Nats-Msg-Id", ""), msg.data))
                await msg.ack()
        return found
    finally:
        await nc.close()
