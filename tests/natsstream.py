"""Reading a JetStream stream back with an independent nats-py connection, for tests."""

from __future__ import annotations

import ssl

import nats
from nats.js.api import ConsumerConfig, DeliverPolicy

Stored = tuple[str, str, bytes]
"""subject, Nats-Msg-Id, payload"""


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
        stored = (await js.stream_info(stream)).state.messages
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
