"""Reading a JetStream stream back with an independent nats-py connection, for tests."""

from __future__ import annotations

import ssl

import nats
import nats.errors
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

Stored = tuple[str, str, bytes]
"""subject, Nats-Msg-Id, payload"""


async def stored_count(js: JetStreamContext, stream: str, attempts: int) -> int:
    """The stream's message count; a cluster electing a new leader may let a request time
    out (seen once in CI after a node kill), so ask again, `attempts` times at most."""
    for attempt in range(attempts):
        try:
            return (await js.stream_info(stream)).state.messages
        except nats.errors.TimeoutError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


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
        stored = await stored_count(js, stream, attempts=3)
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        sub = await js.pull_subscribe(subjects, stream=stream, config=config)
        found: list[Stored] = []
        while len(found) < stored:
            for msg in await sub.fetch(min(1000, stored - len(found)), timeout=timeout):
                found.append((msg.subject, (msg.headers or {}).get("Nats-Msg-Id", ""), msg.data))
                await msg.ack()
        return found
    finally:
        await nc.close()
