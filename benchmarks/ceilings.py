"""Ceilings: what the machine, InfluxDB and Mosquitto manage without senseflow in the way.

- socket: a bare uvloop datagram loop that only counts (`udp-count`, a child process),
  fed by `senseflow send` as fast as it can, timed like the receiver (procs.flood_and_time).
- sink: InfluxDB ingesting the same events as pre-encoded line protocol (encoded with
  `workers.pipeline.EventPipeline`), in batches of 5,000, one request at a time (as our
  sink writes) and two at a time; the ceiling is the better of the two.
- broker: the same pre-encoded MQTT payloads at QoS 1 to the everything topic, with a
  QoS 1 subscriber on it, published by our `MqttSink` and, for comparison, by aiomqtt
  (each publish awaited; ~100 in flight) and by paho-mqtt (threaded loop, window 2000).

    python -m benchmarks.ceilings udp-count --port P    # the socket ceiling's receiver
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from benchmarks.e2e import TopicCounter
from shared.config import Config
from shared.counters import Counters
from shared.events import EncodedBatch, RawBatch
from tests.localservers import InfluxServer, MosquittoServer, free_ports
from workers.pipeline import EventPipeline

INFLUX_BATCH = 5000
RAW_BATCH = 500
EVERYTHING_TOPIC = "qliksense/userevent"
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


# -- socket ceiling ---------------------------------------------------------------------------


class CountingProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.count = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.count += 1


async def count_datagrams(port: int, receive_buffer: int) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.bind(("127.0.0.1", port))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(CountingProtocol, sock=sock)
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    print("ready", flush=True)
    await done.wait()
    transport.close()
    return protocol.count


class UdpCounter:
    """The `udp-count` child process on a free port."""

    def __init__(self, receive_buffer: int) -> None:
        self.port = free_ports(1)[0]
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.ceilings",
                "udp-count",
                "--port",
                str(self.port),
                "--receive-buffer",
                str(receive_buffer),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != b"ready":
            self.stop()
            raise RuntimeError("udp-count did not start")

    def stop(self) -> int:
        """Stop it; returns how many datagrams it counted."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=10)
        lines = out.split()
        return int(lines[-1]) if lines and lines[-1].isdigit() else -1


# -- pre-encoded events -----------------------------------------------------------------------


def encode_events(config: Config, pool: list[bytes], count: int) -> list[EncodedBatch]:
    """`count` events from `pool` (cycled), encoded by the workers' pipeline, in raw batches
    of 500 with strictly increasing receive times from now on."""
    pipeline = EventPipeline(config)
    start = time.time_ns()
    batches = []
    for first in range(0, count, RAW_BATCH):
        size = min(RAW_BATCH, count - first)
        datagrams = [pool[(first + i) % len(pool)] for i in range(size)]
        times = [start + (first + i) * 1000 for i in range(size)]
        batches.append(pipeline.process_batch(RawBatch(datagrams, times)))
    return batches


def influx_bodies(batches: list[EncodedBatch]) -> list[bytes]:
    """Line protocol in bodies of INFLUX_BATCH lines."""
    lines = b"".join(batch.lines for batch in batches).splitlines(keepends=True)
    return [b"".join(lines[i : i + INFLUX_BATCH]) for i in range(0, len(lines), INFLUX_BATCH)]


# -- sink ceiling -----------------------------------------------------------------------------


async def _post_all(
    influx: InfluxServer, database: str, bodies: list[bytes], concurrency: int
) -> None:
    import aiohttp

    url = f"{influx.url}/write"
    params = {"db": database, "precision": "ns"}
    queue = list(reversed(bodies))
    async with aiohttp.ClientSession() as session:

        async def post_loop() -> None:
            while queue:
                body = queue.pop()
                async with session.post(url, params=params, data=body) as response:
                    if response.status >= 300:
                        raise RuntimeError(
                            f"InfluxDB: HTTP {response.status}: {await response.text()}"
                        )

        await asyncio.gather(*(post_loop() for _ in range(concurrency)))


def sink_ceiling(influx: InfluxServer, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    """Points per second InfluxDB takes from `bodies`, into a new database."""
    import uvloop

    database = f"ceiling_{time.monotonic_ns()}"
    influx.create_database(database)
    points = sum(body.count(b"\n") for body in bodies)
    try:
        started = time.perf_counter()
        uvloop.run(_post_all(influx, database, bodies, concurrency))
        seconds = time.perf_counter() - started
    finally:
        influx.query(f'DROP DATABASE "{database}"')
    return {
        "points": points,
        "concurrency": concurrency,
        "seconds": round(seconds, 3),
        "rate": round(points / seconds, 1),
    }


# -- broker ceiling ---------------------------------------------------------------------------


def _timed_publish(
    name: str, messages: int, run: Callable[[], Coroutine[Any, Any, None]]
) -> dict[str, Any]:
    import uvloop

    cpu, started = time.process_time(), time.perf_counter()
    uvloop.run(run())
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "client": name,
        "messages": messages,
        "seconds": round(seconds, 3),
        "rate": round(messages / seconds, 1),
        "cpu_us_per_message": round(cpu / messages * 1e6, 2),
    }


def publish_ours(config: Config, batches: list[EncodedBatch]) -> dict[str, Any]:
    """Our MqttSink, as the writer drives it: write_batch per worker batch, then flush."""
    from workers.writer.sinks.mqtt import MqttSink

    async def run() -> None:
        sink = MqttSink(config, Counters())
        await sink.start()
        for batch in batches:
            await sink.write_batch(batch)
        await sink.close()

    return _timed_publish("senseflow MqttSink (window 2000)", _messages(batches), run)


def _payloads(batches: list[EncodedBatch]) -> list[bytes]:
    return [payload for batch in batches for payload in batch.mqtt_payloads]


def _messages(batches: list[EncodedBatch]) -> int:
    return sum(len(batch.mqtt_payloads) for batch in batches)


def publish_aiomqtt(
    broker: MosquittoServer, payloads: list[bytes], in_flight: int
) -> dict[str, Any]:
    """aiomqtt 2.x: `in_flight` tasks, each awaiting one QoS 1 publish after the other."""
    import aiomqtt

    quiet = logging.getLogger("benchmarks.aiomqtt")
    quiet.setLevel(logging.ERROR)  # it warns about every publish waiting for the window

    async def run() -> None:
        async with aiomqtt.Client(
            broker.host,
            broker.port,
            identifier=f"bench-aiomqtt-{time.monotonic_ns()}",
            logger=quiet,
            max_inflight_messages=max(in_flight, 20),
            max_queued_outgoing_messages=0,
        ) as client:
            queue = list(reversed(payloads))

            async def publish_loop() -> None:
                while queue:
                    await client.publish(EVERYTHING_TOPIC, queue.pop(), qos=1)

            await asyncio.gather(*(publish_loop() for _ in range(in_flight)))

    label = "aiomqtt, each publish awaited" if in_flight == 1 else f"aiomqtt, {in_flight} in flight"
    return _timed_publish(label, len(payloads), run)


def publish_paho(broker: MosquittoServer, payloads: list[bytes], window: int) -> dict[str, Any]:
    """paho-mqtt 2.x with its network thread: publish everything, wait for every PUBACK."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-paho-{time.monotonic_ns()}")
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(0)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        cpu, started = time.process_time(), time.perf_counter()
        infos = [client.publish(EVERYTHING_TOPIC, payload, qos=1) for payload in payloads]
        for info in infos:
            info.wait_for_publish(60)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        client.disconnect()
        client.loop_stop()
    return {
        "client": f"paho-mqtt, window {window} (network thread)",
        "messages": len(payloads),
        "seconds": round(seconds, 3),
        "rate": round(len(payloads) / seconds, 1),
        "cpu_us_per_message": round(cpu / len(payloads) * 1e6, 2),
    }


def with_subscriber(
    broker: MosquittoServer, workdir: Path, work: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Run `work` while a QoS 1 mosquitto_sub takes every message on the everything topic."""
    counter = TopicCounter(broker, workdir / f"ceiling-sub-{time.monotonic_ns()}.txt")
    try:
        result = work()
        time.sleep(0.3)
    finally:
        counter.stop()
    result["subscriber_received"] = counter.count()
    counter.path.unlink()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    counter = commands.add_parser("udp-count", help="count datagrams on a UDP port until SIGTERM")
    counter.add_argument("--port", type=int, required=True)
    counter.add_argument("--receive-buffer", type=int, default=32 * 1024 * 1024)
    args = parser.parse_args(argv)
    import uvloop

    print(uvloop.run(count_datagrams(args.port, args.receive_buffer)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
