"""End-to-end throughput: the highest steady rate at which every datagram arrives.

Starts its own influxd and mosquitto (tests/localservers.py), then for each `--workers`
value runs a bounded search: a trial starts `senseflow run`, sends `--count` datagrams at a
steady rate with `senseflow send`'s engine, waits for the service to finish writing,
and counts what arrived (InfluxDB `SELECT count(*)`, MQTT messages on the everything
topic via a QoS 1 mosquitto_sub, messages in the NATS JetStream stream). A trial passes
only with zero loss on every destination. The rate doubles until a trial fails, then
bisects. Per trial it also records CPU seconds and peak RSS of every senseflow process.

    .venv/bin/python -m benchmarks.e2e --workers 1 2 --count 1000000

`--destinations` picks them (default influxdb mqtt); NATS next to MQTT, one at a time:

    .venv/bin/python -m benchmarks.e2e --workers 2 --destinations mqtt
    .venv/bin/python -m benchmarks.e2e --workers 2 --destinations nats
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nats

from senseflow.commands.corpus import make_corpus
from senseflow.commands.send import send
from tests.e2e.harness import Service, influx_count, udp_port, write_config
from tests.localservers import InfluxServer, MosquittoServer, NatsServer

EVERYTHING_TOPIC = "qliksense/userevent"
DESTINATIONS = ("influxdb", "mqtt", "nats")


@dataclass
class Servers:
    """The destination servers of a run; None where not benchmarked."""

    influx: InfluxServer | None
    broker: MosquittoServer | None
    nats: NatsServer | None


@dataclass
class Trial:
    workers: int
    rate: float
    count: int
    achieved_rate: float = 0.0
    influx: int = 0
    mqtt: int = 0
    nats: int = 0
    destinations: list[str] = field(default_factory=lambda: ["influxdb", "mqtt"])
    counters: dict[str, int] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    drain_seconds: float = 0.0

    @property
    def zero_loss(self) -> bool:
        arrived = {"influxdb": self.influx, "mqtt": self.mqtt, "nats": self.nats}
        return all(arrived[d] == self.count for d in self.destinations)

    @property
    def cpu_us_per_event(self) -> float:
        return sum(self.cpu_seconds.values()) / self.count * 1e6 if self.count else 0.0


class TopicCounter:
    """mosquitto_sub printing one short line per message on the everything topic."""

    def __init__(self, broker: MosquittoServer, path: Path) -> None:
        self.path = path
        self._out = open(path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                "mosquitto_sub",
                "-h",
                broker.host,
                "-p",
                str(broker.port),
                "-q",
                "1",
                "-t",
                EVERYTHING_TOPIC,
                "-F",
                "x",
                "-i",
                f"bench-{time.monotonic_ns()}",
            ],
            stdout=self._out,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)

    def count(self) -> int:
        return self.path.stat().st_size // 2  # "x\n" per message

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self._out.close()


def process_stats(pids: dict[str, int]) -> tuple[dict[str, float], dict[str, float]]:
    """CPU seconds (user + system) and peak RSS (MB) per process, from /proc."""
    ticks = float(__import__("os").sysconf("SC_CLK_TCK"))
    cpu, rss = {}, {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        cpu[name] = (int(fields[11]) + int(fields[12])) / ticks
        hwm = next(line for line in status.splitlines() if line.startswith("VmHWM"))
        rss[name] = int(hwm.split()[1]) / 1024
    return cpu, rss


def live_pids(service: Service) -> dict[str, int]:
    pids = {"supervisor": service.process.pid}
    for name in ("writer", *(f"worker-{i}" for i in range(16)), *(f"reader-{i}" for i in range(8))):
        found = service.child_pids(name)
        if found:
            pids[name] = found[-1]
    return pids


async def stream_count(server: NatsServer, stream: str, delete: bool = False) -> int:
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        count = int((await js.stream_info(stream)).state.messages)
        if delete:
            await js.delete_stream(stream)
        return count
    finally:
        await nc.close()


def nats_section(server: NatsServer, stream: str) -> dict[str, Any]:
    prefix = f"bench.{stream.lower()}"
    return {"enable": True, "servers": [server.url], "stream": stream, "subjectPrefix": prefix}


def run_trial(
    workdir: Path,
    servers: Servers,
    workers: int,
    rate: float,
    count: int,
    pool: list[bytes],
    extra: dict[str, Any],
) -> Trial:
    trial = Trial(workers, rate, count)
    trial.destinations = [
        name
        for name, server in zip(
            DESTINATIONS, (servers.influx, servers.broker, servers.nats), strict=True
        )
        if server is not None
    ]
    influx, broker = servers.influx, servers.broker
    database = f"bench_{time.monotonic_ns()}"
    stream = f"BENCH_{time.monotonic_ns()}"
    if influx is not None:
        influx.create_database(database)
    if servers.nats is not None:
        extra = {**extra, "nats": nats_section(servers.nats, stream)}
    port = udp_port()
    config = write_config(workdir / "bench.yaml", port, influx, database, broker, **extra)
    counter = TopicCounter(broker, workdir / "mqtt-count.txt") if broker else None
    service = Service(config, workdir / "senseflow.log", "--workers", str(workers))
    try:
        service.wait_running()
        cpu_before, _ = process_stats(live_pids(service))
        report = send(("127.0.0.1", port), pool, rate, count=count, sources=4)
        trial.achieved_rate = report.rate
        started = time.monotonic()
        wait_until_written(service, count, trial.destinations)
        trial.drain_seconds = time.monotonic() - started
        cpu_after, trial.peak_rss_mb = process_stats(live_pids(service))
        # Only what the load cost: start-up (imports, connections) is left out.
        trial.cpu_seconds = {k: v - cpu_before.get(k, 0.0) for k, v in cpu_after.items()}
        service.terminate()
        trial.counters = service.counters()
        trial.influx = influx_count(influx, database) if influx else 0
        if servers.nats is not None:
            trial.nats = asyncio.run(stream_count(servers.nats, stream))
        if counter is not None:
            deadline = time.monotonic() + 10
            while counter.count() < count and time.monotonic() < deadline:
                time.sleep(0.2)
            trial.mqtt = counter.count()
    finally:
        service.stop()
        if counter is not None:
            counter.stop()
        if influx is not None:
            influx.query(f'DROP DATABASE "{database}"')
        if servers.nats is not None:
            asyncio.run(stream_count(servers.nats, stream, delete=True))
    return trial


def wait_until_written(
    service: Service, count: int, destinations: list[str], idle_timeout: float = 15.0
) -> None:
    """Until every destination has everything, or nothing moved for `idle_timeout` s."""
    last: tuple[int, ...] = (-1,)
    last_change = time.monotonic()
    while True:
        time.sleep(0.5)
        counters = service.counters() if "counters: " in service.log else {}
        now = tuple(counters.get(f"written.{d}", 0) for d in destinations)
        accounted = counters.get("received", 0) >= count and min(now) >= counters.get("events", 0)
        if accounted and counters.get("events", 0) + sum(
            v for k, v in counters.items() if k.startswith(("dropped", "invalid"))
        ) >= counters.get("received", 0):
            return
        if now != last:
            last, last_change = now, time.monotonic()
        elif time.monotonic() - last_change > idle_timeout:
            return


def search(
    args: argparse.Namespace,
    workdir: Path,
    servers: Servers,
    workers: int,
    pool: list[bytes],
) -> tuple[float, list[Trial]]:
    trials: list[Trial] = []
    good, bad = 0.0, 0.0
    rate = args.start_rate
    for _ in range(args.max_trials):
        trial = run_trial(workdir, servers, workers, rate, args.count, pool, {})
        trials.append(trial)
        print(
            f"workers={workers} rate={rate:,.0f}/s sent at {trial.achieved_rate:,.0f}/s: "
            f"influx {trial.influx:,} mqtt {trial.mqtt:,} nats {trial.nats:,} "
            f"of {args.count:,} "
            f"{'OK' if trial.zero_loss else 'LOSS'}; cpu {trial.cpu_us_per_event:.1f} µs/event",
            flush=True,
        )
        if trial.zero_loss and trial.achieved_rate >= rate * 0.97:
            good = max(good, rate)
        else:
            bad = rate if not bad else min(bad, rate)
        if bad and good and bad / good <= 1 + args.precision:
            break
        rate = rate * 2 if not bad else (good + bad) / 2 if good else rate / 2
    return good, trials


def start_servers(stack: ExitStack, workdir: Path, wanted: set[str]) -> Servers:
    def started(name: str, server: Any) -> Any:
        return stack.enter_context(server(workdir / name)) if name in wanted else None

    return Servers(
        started("influxdb", InfluxServer),
        started("mqtt", MosquittoServer),
        started("nats", NatsServer),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--count", type=int, default=1_000_000, help="datagrams per trial")
    parser.add_argument("--start-rate", type=float, default=5000)
    parser.add_argument("--precision", type=float, default=0.15, help="stop when bad/good <= 1+P")
    parser.add_argument("--max-trials", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    parser.add_argument(
        "--destinations",
        nargs="+",
        choices=DESTINATIONS,
        default=["influxdb", "mqtt"],
        help="what the service sends to (each started locally); default influxdb mqtt",
    )
    args = parser.parse_args(argv)
    pool = make_corpus(min(args.count, 50_000), seed=11)
    results: dict[str, object] = {
        "count": args.count,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "destinations": args.destinations,
    }
    with tempfile.TemporaryDirectory(prefix="senseflow-bench-") as tmp, ExitStack() as stack:
        servers = start_servers(stack, Path(tmp), set(args.destinations))
        for workers in args.workers:
            best, trials = search(args, Path(tmp), servers, workers, pool)
            results[f"workers_{workers}"] = {
                "max_zero_loss_rate": best,
                "trials": [
                    {**asdict(t), "zero_loss": t.zero_loss, "cpu_us_per_event": t.cpu_us_per_event}
                    for t in trials
                ],
            }
            print(
                f"== workers={workers}: highest zero-loss rate {best:,.0f} datagrams/s", flush=True
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
