"""Outages at a steady rate: events lost and recovery time per failure (issue 5, SPEC 4).

Starts its own influxd and mosquitto (persistence on). For each scenario a fresh
`senseflow run` (InfluxDB 1.x and MQTT QoS 1 on the everything topic) gets a steady load
of realistic datagrams, each marked `[m<i>]` in its message, which a persistent
mosquitto_sub (clean session off, fixed id) receives. After --warmup seconds, one failure:

- influxdb: influxd stopped for --outage s, then started again;
- broker:   mosquitto stopped for --outage s, then started again (its persistent
            sessions, the subscriber's queued messages included, survive);
- writer:   the writer process SIGKILLed; the supervisor restarts it;
- worker:   worker-0 SIGKILLed; the supervisor restarts it (the batch it held, if any, is
            lost and counted `dropped.worker_crash`);
- service:  the whole process group SIGKILLed, then `senseflow run` started again at
            once with the same config and spool;
- rss:      influxd stopped for --rss-outage s, default bounds: peak RSS per process.

A sampler records every 0.25 s the datagrams sent, the points in InfluxDB, the distinct
events on the topic and the RSS of every process. Figures per destination:

- lost: sent minus distinct events delivered, once nothing more arrives. For `service`
  it is split into what was sent while no process listened on the port (UDP keeps
  nothing for a closed port) and what the killed service had (received or in its
  socket buffer) but had not yet spooled;
- recovery: from the moment the destination (or the restarted process) is back until
  the first sample at which it holds everything sent up to that moment (less the lost);
- duplicates on the topic (QoS 1 is at-least-once);
- counted lost (the run's `dropped` counters) and whether the run's counters add up.

    .venv/bin/python -m benchmarks.outages                       # everything, ~6 minutes
    .venv/bin/python -m benchmarks.outages --scenarios influxdb writer --rate 2000
    .venv/bin/python -m benchmarks.outages --json out/outages.json --markdown out/outages.md
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from senseflow.commands.corpus import make_corpus
from tests.e2e.harness import (
    EVERYTHING_TOPIC_ONLY,
    PacedSender,
    Service,
    Subscriber,
    spool_directory,
    spool_usage,
    udp_port,
    write_config,
)
from tests.localservers import InfluxServer, MosquittoServer

SCENARIOS = ("influxdb", "broker", "writer", "worker", "service", "rss")
TOPIC = b"qliksense/userevent "
MARKER = re.compile(rb"\[m(\d+)\]")
SAMPLE_INTERVAL = 0.25
QUERY_TIMEOUT = 1.0
SETTLE_TIMEOUT = 90.0


@dataclass
class Outcome:
    scenario: str
    rate: float
    sent: int = 0
    down_seconds: float = 0.0
    lost: dict[str, int] = field(default_factory=dict)
    lost_port_closed: int = 0
    lost_in_service: int = 0
    recovery_seconds: dict[str, float | None] = field(default_factory=dict)
    duplicates: int = 0
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    rss_before_mb: dict[str, float] = field(default_factory=dict)
    spool_peak_mb: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)
    timeline: list[tuple[float, int, int, int, float]] = field(default_factory=list)
    """(seconds since the failure, sent, InfluxDB points, distinct events on the topic,
    the writer's RSS in MB)."""


def marked_datagrams(count: int, seed: int) -> list[bytes]:
    """`count` realistic datagrams, the i-th marked `[m<i>]` in its message (before any
    user agent, which would otherwise become unique and miss the workers' cache)."""
    pool = make_corpus(min(count, 20_000), seed)
    marked = []
    for i in range(count):
        datagram, mark = pool[i % len(pool)], b"[m%d]" % i
        if b"UserAgent:" in datagram:
            marked.append(datagram.replace(b"UserAgent:", mark + b" UserAgent:", 1))
        else:
            marked.append(datagram + b" " + mark)
    return marked


class TopicTally:
    """Distinct markers and messages in a subscriber's output file, read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.seen: set[int] = set()
        self.messages = 0

    def update(self) -> int:
        with open(self.path, "rb") as output:
            output.seek(self.offset)
            data = output.read()
        complete = data.rfind(b"\n") + 1
        self.offset += complete
        for line in data[:complete].splitlines():
            if line.startswith(TOPIC) and (found := MARKER.search(line)):
                self.seen.add(int(found.group(1)))
                self.messages += 1
        return len(self.seen)


def count_points(influx: InfluxServer, database: str) -> int:
    """Points in `user_events`, with a short timeout: a server starting up may not answer
    for seconds, and the sampler must not stall (that would delay every figure)."""
    query = urllib.parse.urlencode(
        {"q": "SELECT count(userId_field) FROM user_events", "db": database}
    )
    with urllib.request.urlopen(f"{influx.url}/query?{query}", timeout=QUERY_TIMEOUT) as answer:
        series = orjson.loads(answer.read())["results"][0].get("series")
    return int(series[0]["values"][0][1]) if series else 0


@dataclass
class Sample:
    at: float
    sent: int
    influx: int
    mqtt: int
    writer_rss_mb: float


class Sampler(threading.Thread):
    """Every SAMPLE_INTERVAL: sent, InfluxDB points, distinct events on the topic, RSS."""

    def __init__(self, run: Run) -> None:
        super().__init__(name="sampler", daemon=True)
        self.run_ = run
        self.samples: list[Sample] = []
        self.rss: dict[str, float] = {}
        self.spool_bytes = 0
        self.stopping = threading.Event()
        self.influx = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.wait(SAMPLE_INTERVAL):
                self.sample()
        except BaseException as exc:
            self.error = exc  # the figures would be wrong: run_scenario raises it
            raise

    def sample(self) -> None:
        run = self.run_
        if run.influx.running:
            # Stopped, starting or stopping (a cut answer): keep the last count.
            with contextlib.suppress(OSError, ValueError, LookupError, http.client.HTTPException):
                # max: a server shutting down may answer with no series at all
                self.influx = max(self.influx, count_points(run.influx, run.database))
        writer = run.rss_now().get("writer", 0.0)
        sample = Sample(time.monotonic(), run.sender.sent, self.influx, run.tally.update(), writer)
        self.samples.append(sample)
        for name, mb in run.rss_now("VmHWM").items():
            self.rss[name] = max(self.rss.get(name, 0.0), mb)
        self.spool_bytes = max(self.spool_bytes, spool_usage(run.spool)[1])


class Run:
    """One scenario: servers, a service, a sender, a subscriber, a sampler."""

    def __init__(
        self, args: argparse.Namespace, scenario: str, workdir: Path, servers: Any
    ) -> None:
        self.influx, self.broker = servers
        self.scenario = scenario
        self.workdir = workdir / scenario
        self.workdir.mkdir()
        self.database = f"outage_{scenario}"
        self.influx.create_database(self.database)
        self.port = udp_port()
        self.config = write_config(
            self.workdir / "config.yaml",
            self.port,
            self.influx,
            self.database,
            self.broker,
            butler_overrides=EVERYTHING_TOPIC_ONLY,
        )
        self.spool = spool_directory(self.config)
        self.services: list[Service] = []
        outage = args.rss_outage if scenario == "rss" else args.outage
        count = int(args.rate * (args.warmup + outage + args.after))
        self.sender = PacedSender(self.port, marked_datagrams(count, seed=len(scenario)), args.rate)
        self.subscriber = Subscriber(
            self.broker,
            "qliksense/#",
            self.workdir / "mqtt.txt",
            f"outages-{scenario}-{os.getpid()}",
        )
        self.tally = TopicTally(self.workdir / "mqtt.txt")
        self.sampler = Sampler(self)

    @property
    def service(self) -> Service:
        return self.services[-1]

    def start_service(self) -> Service:
        log = self.workdir / f"senseflow-{len(self.services)}.log"
        self.services.append(Service(self.config, log))
        self.service.wait_running(60)
        return self.service

    def rss_now(self, key: str = "VmRSS") -> dict[str, float]:
        """`key` (VmRSS: now, VmHWM: the peak so far) in MB per process of the service."""
        if not self.services:
            return {}
        names = {
            int(pid): name
            for name, pid in re.findall(r"started ([\w-]+) \(pid (\d+)\)", self.service.log)
        }
        names[self.service.process.pid] = "supervisor"
        rss = {}
        for pid in self.service.group_pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            found = re.search(rf"{key}:\s+(\d+)", status)
            if found:
                rss[names.get(pid, f"other-{pid}")] = int(found.group(1)) / 1024
        return rss

    def close(self) -> None:
        self.sampler.stopping.set()
        for service in self.services:
            service.stop()
        self.subscriber.stop()


def run_scenario(args: argparse.Namespace, scenario: str, workdir: Path, servers: Any) -> Outcome:
    run = Run(args, scenario, workdir, servers)
    outcome = Outcome(scenario, args.rate)
    try:
        run.start_service()
        run.sender.start()
        run.sampler.start()
        time.sleep(args.warmup)
        outcome.rss_before_mb = {k: round(v, 1) for k, v in run.rss_now().items()}
        failed_at = time.monotonic()
        back_at = FAILURES[scenario](run, args)
        sent_at_back = run.sender.sent
        outcome.down_seconds = round(back_at - failed_at, 2)
        run.sender.join()
        outcome.sent = run.sender.sent
        settle(run)
        run.sampler.stopping.set()
        run.sampler.join()
        if run.sampler.error is not None:
            raise RuntimeError("the sampler failed; no figures") from run.sampler.error
        run.sampler.sample()
        measure(outcome, run, failed_at, back_at, sent_at_back)
        run.service.terminate()
        outcome.counters = run.service.counters()
    finally:
        run.close()
    return outcome


def fail_influxdb(run: Run, args: argparse.Namespace) -> float:
    run.influx.stop()
    time.sleep(args.rss_outage if run.scenario == "rss" else args.outage)
    run.influx.start()
    return time.monotonic()


def fail_broker(run: Run, args: argparse.Namespace) -> float:
    run.broker.stop()
    time.sleep(args.outage)
    run.broker.start()
    return time.monotonic()


def kill_writer(run: Run, args: argparse.Namespace) -> float:
    service = run.service
    before = len(service.log)
    os.kill(service.child_pids("writer")[-1], signal.SIGKILL)
    while len(re.findall(r"destination \w+ ready", service.log[before:])) < 2:  # both again
        time.sleep(0.01)
    return time.monotonic()


def kill_worker(run: Run, args: argparse.Namespace) -> float:
    service = run.service
    pid = service.child_pids("worker-0")[-1]
    os.kill(pid, signal.SIGKILL)
    service.wait_for_log(f"(pid {pid}) died")
    service.wait_for_log("started worker-0", after=service.log.index(f"(pid {pid}) died"))
    return time.monotonic()


def kill_service(run: Run, args: argparse.Namespace) -> float:
    run.killed_at_sent = run.sender.sent  # type: ignore[attr-defined]
    run.service.kill_group()
    run.start_service()
    return time.monotonic()


FAILURES = {
    "influxdb": fail_influxdb,
    "broker": fail_broker,
    "writer": kill_writer,
    "worker": kill_worker,
    "service": kill_service,
    "rss": fail_influxdb,
}


def settle(run: Run) -> None:
    """Wait until every event sent arrived at both destinations, or nothing moves for 20 s."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    last, still_since = (-1, -1), time.monotonic()
    while time.monotonic() < deadline:
        current = (run.sampler.influx, len(run.tally.seen))
        if current == (run.sender.sent, run.sender.sent):
            return
        if current != last:
            last, still_since = current, time.monotonic()
        elif time.monotonic() - still_since > 20:
            return
        time.sleep(0.5)


def measure(
    outcome: Outcome, run: Run, failed_at: float, back_at: float, sent_at_back: int
) -> None:
    final = run.sampler.samples[-1]
    outcome.lost = {"influxdb": final.sent - final.influx, "mqtt": final.sent - final.mqtt}
    outcome.duplicates = run.tally.messages - len(run.tally.seen)
    if run.scenario == "service":
        missing = set(range(final.sent)) - run.tally.seen
        killed = run.killed_at_sent  # type: ignore[attr-defined]
        outcome.lost_in_service = sum(1 for i in missing if i < killed)
        outcome.lost_port_closed = len(missing) - outcome.lost_in_service
    for name in ("influxdb", "mqtt"):
        target = sent_at_back - outcome.lost[name]
        done = next(
            (
                s.at
                for s in run.sampler.samples
                if s.at >= back_at and getattr(s, _KEY[name]) >= target
            ),
            None,
        )
        outcome.recovery_seconds[name] = None if done is None else round(done - back_at, 2)
    outcome.timeline = [
        (round(s.at - failed_at, 2), s.sent, s.influx, s.mqtt, round(s.writer_rss_mb, 1))
        for s in run.sampler.samples
    ]
    outcome.peak_rss_mb = {k: round(v, 1) for k, v in sorted(run.sampler.rss.items())}
    outcome.spool_peak_mb = round(run.sampler.spool_bytes / 1e6, 1)


_KEY = {"influxdb": "influx", "mqtt": "mqtt"}


def counters_add_up(counters: dict[str, int]) -> bool:
    """The run's own balance (the summary line at exit): every datagram received has one
    outcome, and each destination wrote every event it had (its own and recovered ones)."""
    outcomes = counters.get("events", 0) + counters.get("invalid", 0) + counters.get("excluded", 0)
    if outcomes + counters.get("dropped", 0) != counters.get("received", 0):
        return False
    return all(
        counters.get(f"written.{d}", 0) + counters.get(f"failed.{d}", 0)
        == counters.get("events", 0) + counters.get(f"recovered.{d}", 0)
        for d in ("influxdb", "mqtt")
    )


def markdown(outcomes: list[Outcome]) -> str:
    lines = [
        "| scenario | sent | down (s) | lost InfluxDB | lost MQTT | counted lost "
        "| counters add up | recovery InfluxDB (s) "
        "| recovery MQTT (s) | MQTT duplicates | spool peak (MB) |",
        "|---|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|",
    ]
    for o in outcomes:
        lost_mqtt = str(o.lost["mqtt"])
        if o.scenario == "service":
            lost_mqtt += f" ({o.lost_port_closed} port closed, {o.lost_in_service} in the service)"
        lines.append(
            f"| {o.scenario} | {o.sent:,} | {o.down_seconds} | {o.lost['influxdb']} | {lost_mqtt} "
            f"| {o.counters.get('dropped', 0)} | {'yes' if counters_add_up(o.counters) else 'NO'} "
            f"| {o.recovery_seconds['influxdb']} | {o.recovery_seconds['mqtt']} "
            f"| {o.duplicates} | {o.spool_peak_mb} |"
        )
    lines += [
        "",
        "| scenario | peak RSS (VmHWM) MB per process (RSS when the failure began) |",
        "|---|---|",
    ]
    for o in outcomes:
        rss = ", ".join(
            f"{k} {v:.0f} ({o.rss_before_mb.get(k, 0):.0f})" for k, v in o.peak_rss_mb.items()
        )
        lines.append(f"| {o.scenario} | {rss} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.outages",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--rate", type=float, default=5000.0, help="datagrams per second")
    parser.add_argument("--warmup", type=float, default=5.0, help="steady seconds before")
    parser.add_argument("--outage", type=float, default=10.0, help="seconds a server is down")
    parser.add_argument("--rss-outage", type=float, default=60.0, help="InfluxDB down (rss)")
    parser.add_argument("--after", type=float, default=25.0, help="seconds of load after")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    parser.add_argument("--markdown", type=Path, help="write the tables here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="senseflow-outages-") as temporary:
        workdir = Path(temporary)
        with (
            InfluxServer(workdir / "influxd") as influx,
            MosquittoServer(workdir / "mosquitto", persistence=True) as broker,
        ):
            for scenario in args.scenarios:
                print(f"{scenario}: running", file=sys.stderr)
                outcome = run_scenario(args, scenario, workdir, (influx, broker))
                brief = {k: v for k, v in asdict(outcome).items() if k != "timeline"}
                print(orjson.dumps(brief).decode(), file=sys.stderr)
                outcomes.append(outcome)
    table = markdown(outcomes)
    print(table)
    if args.json:
        args.json.write_bytes(
            orjson.dumps([asdict(o) for o in outcomes], option=orjson.OPT_INDENT_2)
        )
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")
    return 0 if all(not any(o.lost.values()) for o in outcomes if o.scenario != "service") else 1


if __name__ == "__main__":
    sys.exit(main())
