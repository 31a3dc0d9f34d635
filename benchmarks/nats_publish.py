"""CPU per JetStream publish with nats-py, three ways, against a local nats-server.

    python -m benchmarks.nats_publish --messages 20000

- `publish_async`: nats-py's JetStream `publish_async` with a `Nats-Msg-Id` header, and one
  `asyncio.gather` over a batch's futures (bulk wait);
- `publish+inbox`: `nc.publish(subject, payload, reply=<inbox>.<n>, headers=...)` per
  message, acks matched by token on one `<inbox>.*` subscription;
- `frames`: what workers/writer/sinks/nats.py does: pre-built HPUB frames, one write per
  batch, the same ack matching.

Reports the client process's CPU seconds per message (wall time too); the server is a
separate process and not counted. Quick: a few seconds each.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from tests.localservers import NatsServer

PAYLOAD = b'{"messageType":"session","host":"sense1","command":"Start session"}' * 5
BATCH = 500


class AckCounter:
    def __init__(self, total: int) -> None:
        self.pending: dict[int, bool] = dict.fromkeys(range(total), True)
        self.done = asyncio.Event()

    async def on_ack(self, msg: Msg) -> None:
        token = int(msg.subject.rpartition(".")[2])
        self.pending.pop(token, None)
        if not self.pending:
            self.done.set()


async def run_publish_async(nc: Client, subject: str, total: int) -> None:
    js = nc.jetstream(publish_async_max_pending=BATCH * 4)
    for start in range(0, total, BATCH):
        futures = [
            await js.publish_async(subject, PAYLOAD, headers={"Nats-Msg-Id": f"pa-{n}"})
            for n in range(start, min(total, start + BATCH))
        ]
        await asyncio.gather(*futures)


async def run_publish_inbox(nc: Client, subject: str, total: int) -> None:
    inbox = nc.new_inbox()
    acks = AckCounter(total)
    await nc.subscribe(f"{inbox}.*", cb=acks.on_ack, pending_msgs_limit=-1)
    for n in range(total):
        await nc.publish(subject, PAYLOAD, reply=f"{inbox}.{n}", headers={"Nats-Msg-Id": f"pi-{n}"})
    await acks.done.wait()


async def run_frames(nc: Client, subject: str, total: int) -> None:
    inbox = nc.new_inbox()
    acks = AckCounter(total)
    await nc.subscribe(f"{inbox}.*", cb=acks.on_ack, pending_msgs_limit=-1)
    await nc.flush()  # the SUB before our frames: they bypass nats-py's pending buffer
    reply, subject_bytes = f"{inbox}.".encode(), subject.encode()
    for start in range(0, total, BATCH):
        frames = []
        for n in range(start, min(total, start + BATCH)):
            header = b"NATS/1.0\r\nNats-Msg-Id: fr-%d\r\n\r\n" % n
            size = len(header)
            frames.append(
                b"HPUB %s %s%d %d %d\r\n%s%s\r\n"
                % (subject_bytes, reply, n, size, size + len(PAYLOAD), header, PAYLOAD)
            )
        assert nc._transport is not None
        nc._transport.writelines(frames)
        await nc._transport.drain()  # type: ignore[no-untyped-call]
    await acks.done.wait()


WAYS: dict[str, Callable[[Client, str, int], Awaitable[None]]] = {
    "publish_async": run_publish_async,
    "publish+inbox": run_publish_inbox,
    "frames": run_frames,
}


async def measure(url: str, messages: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="BENCH", subjects=["bench.>"])
    for name, way in WAYS.items():
        cpu, wall = time.process_time(), time.perf_counter()
        await way(nc, f"bench.{name.replace('+', '_')}", messages)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        print(
            f"{name:14s} {cpu / messages * 1e6:7.1f} µs CPU/msg  "
            f"{messages / wall:9.0f} msg/s  ({messages} messages)"
        )
    await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    args = parser.parse_args()
    with NatsServer() as server:
        asyncio.run(measure(server.url, args.messages))


if __name__ == "__main__":
    main()
