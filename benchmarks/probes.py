"""Latency probes, each a child process that records (receive time, arrival time) pairs.

Receive time is what the reader stamped on the event (`time.time_ns()` in the reader
process); both probes use the same wall clock on the same machine.

- `influx-proxy`: an HTTP proxy between senseflow's writer and influxd. Every request is
  forwarded as it is; when influxd answers a `/write` with 2xx, the proxy takes the
  time and the timestamp of every `user_events` line in the body (its last field is the
  event's receive time, in ns): that is receive -> InfluxDB acknowledgement, as the writer
  sees it a loopback hop later. Records: (receive ns, ack ns).
- `mqtt-sub`: a minimal MQTT 3.1.1 subscriber (QoS 1, acknowledges every message) that
  takes the arrival time of each read and the `"timestamp"` of each payload (the receive
  time, ISO 8601 with milliseconds): receive -> delivery to a subscriber, through the
  broker. The payload's time is truncated to the millisecond, so each latency is
  over-estimated by 0-1 ms. Records: (receive ns (ms precision), arrival ns).

Records are appended to a binary file of little-endian int64 pairs as they come, so the
parent can cut them into the steps of a run by receive time at any moment.

    python -m benchmarks.probes influx-proxy --port P --upstream http://127.0.0.1:8086 --out F
    python -m benchmarks.probes mqtt-sub --broker-port P --topic T --out F
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import re
import socket
import struct
import subprocess
import sys
import time
from array import array
from pathlib import Path

from workers.writer.sinks import mqtt_protocol as proto

_LINE_TIME = re.compile(rb"^user_events[ ,][^\n]* (\d+)$", re.MULTILINE)
"""The time of each `user_events` line: the session snapshots and ends (user_session_*,
user_connection_ended) carry the snapshot's or the end's time, not a receive time."""
_TIMESTAMP = re.compile(rb'"timestamp":"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z"')


def write_records(out: object, receive_ns: list[int], arrival_ns: int) -> None:
    pairs = array("q")
    for value in receive_ns:
        pairs.append(value)
        pairs.append(arrival_ns)
    out.write(pairs.tobytes())  # type: ignore[attr-defined]
    out.flush()  # type: ignore[attr-defined]


def requests_path(out: Path) -> Path:
    """Where the InfluxDB proxy records (forwarded ns, answered ns) per /write request."""
    return out.with_name(out.name + ".requests")


def read_records(path: Path) -> tuple[array[int], array[int]]:
    """(receive ns, arrival ns) arrays from a probe's file (complete records only)."""
    data = path.read_bytes() if path.exists() else b""
    pairs = array("q")
    pairs.frombytes(data[: len(data) // 16 * 16])
    return pairs[0::2], pairs[1::2]


# -- InfluxDB acknowledgement proxy -----------------------------------------------------------


async def serve_influx_proxy(port: int, upstream: str, out_path: Path) -> None:
    import aiohttp
    from aiohttp import web

    out = open(out_path, "ab")  # noqa: SIM115 - the process ends with it
    requests = open(requests_path(out_path), "ab")  # noqa: SIM115 - the process ends with it
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        forwarded = time.time_ns()
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("content-type", "authorization")
        }
        async with session.request(
            request.method,
            upstream + request.path,
            params=request.query,
            data=body,
            headers=headers,
        ) as response:
            answer = await response.read()
            arrived = time.time_ns()
            status = response.status
            content_type = response.headers.get("Content-Type")
        if request.path == "/write" and 200 <= status < 300:
            times = [int(t) for t in _LINE_TIME.findall(body)]
            write_records(out, times, arrived)
            write_records(requests, [forwarded], arrived)  # how long InfluxDB took
        return web.Response(
            body=answer,
            status=status,
            headers={"Content-Type": content_type} if content_type else None,
        )

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


# -- MQTT delivery subscriber -----------------------------------------------------------------


class _Clock:
    """ISO 'YYYY-MM-DDTHH:MM:SS' -> epoch seconds, cached per second."""

    def __init__(self) -> None:
        self.prefix = b""
        self.seconds = 0

    def ns(self, prefix: bytes, millis: bytes) -> int:
        if prefix != self.prefix:
            self.prefix = prefix
            self.seconds = calendar.timegm(time.strptime(prefix.decode(), "%Y-%m-%dT%H:%M:%S"))
        return self.seconds * 1_000_000_000 + int(millis) * 1_000_000


def subscribe_packet(topic: str, packet_id: int = 1, qos: int = 1) -> bytes:
    body = packet_id.to_bytes(2, "big") + proto.utf8_field(topic) + bytes((qos,))
    return bytes((0x82,)) + proto.remaining_length(len(body)) + body


def run_mqtt_subscriber(port: int, topic: str, out_path: Path) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sock.sendall(proto.connect_packet(f"bench-latency-{time.monotonic_ns()}", 600))
    proto.check_connack(_read_exactly(sock, 4))
    sock.sendall(subscribe_packet(topic))
    suback = _read_exactly(sock, 5)
    if suback[0] != 0x90 or suback[4] > 2:
        sys.exit(f"subscription refused: {suback!r}")
    print("ready", flush=True)
    clock = _Clock()
    buffer = bytearray()
    with open(out_path, "ab") as out:
        while data := sock.recv(1 << 20):
            arrived = time.time_ns()
            buffer += data
            stamps, acks, used = _scan_publishes(buffer, clock)
            del buffer[:used]
            if acks:
                sock.sendall(b"".join(acks))
            if stamps:
                write_records(out, stamps, arrived)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        data += chunk
    return data


def _scan_publishes(buffer: bytearray, clock: _Clock) -> tuple[list[int], list[bytes], int]:
    """Receive times of the complete PUBLISH packets at the front of `buffer`, PUBACKs to send."""
    stamps: list[int] = []
    acks: list[bytes] = []
    position, end = 0, len(buffer)
    while position + 2 <= end:
        kind = buffer[position]
        length, shift, index = 0, 0, position + 1
        while index < end:
            byte = buffer[index]
            length |= (byte & 0x7F) << shift
            index += 1
            if not byte & 0x80:
                break
            shift += 7
        else:
            break
        if index + length > end:
            break
        if kind & 0xF0 == proto.PUBLISH:
            topic_length = struct.unpack_from("!H", buffer, index)[0]
            start = index + 2 + topic_length
            if kind & 0x06:  # QoS 1 or 2: a packet id follows the topic
                acks.append(bytes((proto.PUBACK, 2)) + bytes(buffer[start : start + 2]))
                start += 2
            match = _TIMESTAMP.search(buffer, start, index + length)
            if match:
                stamps.append(clock.ns(match.group(1), match.group(2)))
        position = index + length
    return stamps, acks, position


# -- parent side ------------------------------------------------------------------------------


class Probe:
    """A probe child process; `records()` reads what it has written so far."""

    def __init__(self, args: list[str], out: Path) -> None:
        self.out = out
        out.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.probes", *args, "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"probe {args[0]} did not start: {line!r}")

    def records(self) -> tuple[array[int], array[int]]:
        return read_records(self.out)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def influx_proxy(port: int, upstream: str, out: Path) -> Probe:
    return Probe(["influx-proxy", "--port", str(port), "--upstream", upstream], out)


def mqtt_subscriber(broker_port: int, topic: str, out: Path) -> Probe:
    return Probe(["mqtt-sub", "--broker-port", str(broker_port), "--topic", topic], out)


def write_durations_ms(probe: Probe, from_ns: int, to_ns: int) -> list[float]:
    """How long InfluxDB took to answer each /write the proxy forwarded in [from_ns, to_ns)."""
    forwarded, answered = read_records(requests_path(probe.out))
    return [(a - f) / 1e6 for f, a in zip(forwarded, answered, strict=True) if from_ns <= f < to_ns]


def latencies_ms(probe: Probe, from_ns: int, to_ns: int) -> list[float]:
    """Latencies (ms) of the events received in [from_ns, to_ns)."""
    received, arrived = probe.records()
    return [(a - r) / 1e6 for r, a in zip(received, arrived, strict=True) if from_ns <= r < to_ns]


def percentiles(
    values: list[float], points: tuple[float, ...] = (50, 99, 99.9)
) -> dict[str, float]:
    """Nearest-rank percentiles, named p50 / p99 / p99.9; plus count and max."""
    ordered = sorted(values)
    result: dict[str, float] = {"count": len(ordered)}
    for point in points:
        if ordered:
            rank = max(0, min(len(ordered) - 1, int(-(-point * len(ordered) // 100)) - 1))
            result[f"p{point:g}"] = round(ordered[rank], 2)
    if ordered:
        result["max"] = round(ordered[-1], 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="probe", required=True)
    proxy = commands.add_parser("influx-proxy", help="HTTP proxy recording InfluxDB write acks")
    proxy.add_argument("--port", type=int, required=True)
    proxy.add_argument("--upstream", required=True)
    proxy.add_argument("--out", type=Path, required=True)
    sub = commands.add_parser("mqtt-sub", help="QoS 1 subscriber recording delivery times")
    sub.add_argument("--broker-port", type=int, required=True)
    sub.add_argument("--topic", required=True)
    sub.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.probe == "influx-proxy":
        import uvloop

        uvloop.run(serve_influx_proxy(args.port, args.upstream.rstrip("/"), args.out))
    else:
        run_mqtt_subscriber(args.broker_port, args.topic, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
