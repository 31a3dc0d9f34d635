"""The real service under load: trials (for benchmarks/ratesearch.py), latency steps, overload.

One `senseflow run` serves several trials (starting one costs seconds on this machine);
between trials the suite waits until the service has caught up (`settle`), so that a
trial never inherits the backlog of the one before. Datagrams are sent in-process by the
engine of `senseflow send` (`senseflow.commands.send.send`) from one corpus built once.

Modes (what the service writes to):
- `influx`: InfluxDB 1.x only;
- `influx+mqtt`: InfluxDB and MQTT QoS 1, the everything topic only (the issue's target);
- `discard`: no destination, workers that discard (benchmarks/discard.py: receiver alone).
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import yaml

from benchmarks.e2e import TopicCounter
from benchmarks.procs import MachineLoad, RssSampler, ServiceProcesses, cpu_delta, rss_mb
from senseflow.commands.send import send
from shared.config import Pipeline
from shared.ipc import REPORT_INTERVAL
from tests.e2e.harness import REPO, Service, influx_count, udp_port
from tests.localservers import InfluxServer, MosquittoServer

EVERYTHING_TOPIC = "qliksense/userevent"
PER_ACTION_TOPICS = (
    "sessionStartTopic",
    "sessionStopTopic",
    "connectionOpenTopic",
    "connectionCloseTopic",
)
SOURCES = 4


@dataclass
class Bench:
    """What every phase shares: the servers, a work directory, the corpus, the scale."""

    workdir: Path
    influx: InfluxServer
    broker: MosquittoServer
    pool: list[bytes]
    duration: float
    """Seconds of sending per trial / step."""
    drain_limit: float
    """A trial is steady when everything is written within this many s after the last send."""
    settle_timeout: float = 120.0


def config_document(
    mode: str,
    port: int,
    bench: Bench,
    database: str,
    influx_port: int | None = None,
    pipeline: dict[str, Any] | None = None,
) -> dict[str, Any]:
    influx = mode in ("influx", "influx+mqtt")
    mqtt = mode == "influx+mqtt"
    butler: dict[str, Any] = {
        "userEvents": {
            "udpServerConfig": {"serverHost": "127.0.0.1", "portUserActivityEvents": port},
            "tags": [{"name": "qs_env", "value": "bench"}],
            "sendToInfluxdb": {"enable": influx},
            "sendToMQTT": {
                "enable": mqtt,
                "postTo": {
                    "everythingTopic": {"enable": True, "topic": EVERYTHING_TOPIC},
                    **{key: {"enable": False} for key in PER_ACTION_TOPICS},
                },
            },
        },
        "influxdbConfig": {"enable": False},
        "mqttConfig": {"enable": False},
    }
    if influx:
        butler["influxdbConfig"] = {
            "enable": True,
            "host": "127.0.0.1",
            "port": influx_port or bench.influx.port,
            "version": 1,
            "v1Config": {"dbName": database, "retentionPolicy": {"name": "autogen"}},
        }
    if mqtt:
        butler["mqttConfig"] = {
            "enable": True,
            "brokerHost": bench.broker.host,
            "brokerPort": bench.broker.port,
        }
    return {"Butler-SOS": butler, "senseflow": {"summaryInterval": 1, **(pipeline or {})}}


def own_spool(directory: Path) -> dict[str, Any]:
    """A spool directory of the service's own (the default, `spool` in the working
    directory, would be shared by every service started from the repository, and one
    service would replay another's records), when this version of senseflow has a spool."""
    fields = {f.name for f in msgspec.structs.fields(Pipeline)}
    return {"spool": {"directory": str(directory)}} if "spool" in fields else {}


def destinations(mode: str) -> list[str]:
    return {"influx": ["influxdb"], "influx+mqtt": ["influxdb", "mqtt"]}.get(mode, [])


def logged_at(line: str) -> float:
    """Epoch seconds of a text log line (`2026-11-25 15:56:22,429 INFO ...`, local time)."""
    stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def parse_counters(line: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"([\w.]+)=(\d+)", line.split("counters: ", 1)[1])}


class RunningService:
    """One `senseflow run` in `mode` with `workers` workers, its database and MQTT counter."""

    def __init__(
        self,
        bench: Bench,
        mode: str,
        workers: int,
        *,
        influx_port: int | None = None,
        env: dict[str, str] | None = None,
        count_mqtt: bool = True,
        pipeline: dict[str, Any] | None = None,
        tree: Path | None = None,
    ) -> None:
        """`env`: variables added to the service's environment; `tree`: run another
        checkout's code (its directory as cwd and PYTHONPATH; benchmarks/ab.py)."""
        self.bench = bench
        self.mode = mode
        self.workers = workers
        self.port = udp_port()
        self.database = f"bench_{time.monotonic_ns()}"
        tag = f"{mode.replace('+', '-')}-w{workers}-{time.monotonic_ns()}"
        config = bench.workdir / f"{tag}.yaml"
        pipeline = {**own_spool(bench.workdir / f"{tag}.spool"), **(pipeline or {})}
        config.write_text(
            yaml.safe_dump(
                config_document(mode, self.port, bench, self.database, influx_port, pipeline)
            )
        )
        if mode != "discard":
            bench.influx.create_database(self.database)
        self.counter = (
            TopicCounter(bench.broker, bench.workdir / f"{tag}.mqtt")
            if mode == "influx+mqtt" and count_mqtt
            else None
        )
        environment = {**os.environ, **(env or {})}
        if tree is not None:
            environment["PYTHONPATH"] = str(tree)
        self.service = Service(
            config,
            bench.workdir / f"{tag}.log",
            "--workers",
            str(workers),
            cwd=tree or REPO,
            env=environment,
            cli=[sys.executable, "-m", "benchmarks.discard"] if mode == "discard" else None,
        )
        self.processes = ServiceProcesses(self.service)
        self.closed = False
        try:
            self.service.wait_running(60)
        except BaseException:
            self.close()
            raise

    def counters(self) -> dict[str, int]:
        return self.service.counters() if "counters: " in self.service.log else {}

    def mqtt_count(self) -> int:
        return self.counter.count() if self.counter is not None else 0

    def influx_count(self, since_ns: int = 0, condition: str = "") -> int:
        return influx_count(
            self.bench.influx, self.database, f"WHERE time >= {since_ns} {condition}"
        )

    def caught_up(self, counters: dict[str, int]) -> bool:
        events = counters.get("events", 0)
        # Accounted for: delivered, failed, or given up by the bounded spool (overload).
        written = [
            counters.get(f"written.{d}", 0)
            + counters.get(f"failed.{d}", 0)
            + counters.get(f"dropped.destination_full.{d}", 0)
            for d in destinations(self.mode)
        ]
        # ... and the subscriber has every message the broker acknowledged
        delivered = self.counter is None or self.counter.count() >= counters.get("written.mqtt", 0)
        return all(w >= events for w in written) and delivered

    def settle(self, timeout: float | None = None) -> dict[str, int]:
        """Wait until two consecutive counters lines (1 s apart), both logged after this
        call plus one report interval (so that they hold the children's latest reports),
        are equal and every destination has caught up; returns those counters."""
        fresh_after = time.time() + REPORT_INTERVAL + 0.1
        deadline = time.monotonic() + (timeout or self.bench.settle_timeout)
        while True:
            lines = [
                (logged_at(line), parse_counters(line))
                for line in self.service.log.splitlines()[-400:]
                if "counters: " in line
            ][-2:]
            fresh = len(lines) == 2 and lines[0][0] >= fresh_after
            if fresh and lines[0][1] == lines[1][1] and self.caught_up(lines[1][1]):
                return lines[1][1]
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.mode} service did not settle: {lines[-1][1] if lines else {}}"
                )
            time.sleep(0.25)

    def close(self) -> dict[str, int]:
        """SIGTERM (drain), then the final counters."""
        if self.closed:
            return {}
        self.closed = True
        try:
            self.service.terminate(120)
            return self.counters()
        except Exception:
            return {}
        finally:
            self.service.stop()
            if self.counter is not None:
                self.counter.stop()
            if self.mode != "discard":
                self.bench.influx.query(f'DROP DATABASE "{self.database}"')


@contextmanager
def bench_servers(
    workdir: Path, log: Callable[[str], None]
) -> Iterator[tuple[InfluxServer, MosquittoServer]]:
    """The run's own influxd and mosquitto, stopped at the end."""
    with (
        InfluxServer(workdir / "influxdb") as influx,
        MosquittoServer(workdir / "mosquitto") as broker,
    ):
        log(
            f"influxd pid {influx.pid} port {influx.port}, "
            f"mosquitto pid {broker.pid} port {broker.port}"
        )
        yield influx, broker


@contextmanager
def running(bench: Bench, mode: str, workers: int, **kwargs: Any) -> Iterator[RunningService]:
    service = RunningService(bench, mode, workers, **kwargs)
    try:
        yield service
    finally:
        service.close()


# -- trials -----------------------------------------------------------------------------------


@dataclass
class Trial:
    mode: str
    workers: int
    rate: float
    sent: int = 0
    achieved_rate: float = 0.0
    influx: int = 0
    mqtt: int | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    written: dict[str, int] = field(default_factory=dict)
    """What the service counted as acknowledged, per destination (marker included)."""
    drain_seconds: float | None = None
    drain_limit: float = 0.0
    arrived_at_limit: dict[str, Any] = field(default_factory=dict)
    """What InfluxDB / the subscriber held when the drain limit passed (if it did)."""
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    machine: dict[str, float] = field(default_factory=dict)

    @property
    def zero_loss(self) -> bool:
        """Every event stored in InfluxDB, acknowledged by the broker and delivered to the
        subscriber (QoS 1 is at-least-once: a duplicate is not a loss, it is counted)."""
        return (
            self.sent > 0
            and self.influx == self.sent
            and (self.mqtt is None or self.mqtt >= self.sent)
            and all(value == self.sent + 1 for value in self.written.values())
            and not any(self.dropped.values())
        )

    @property
    def mqtt_duplicates(self) -> int:
        return max(0, self.mqtt - self.sent) if self.mqtt is not None else 0

    @property
    def steady(self) -> bool:
        return (
            self.drain_seconds is not None
            and self.drain_seconds <= self.drain_limit
            and self.achieved_rate >= self.rate * 0.97
        )

    @property
    def cpu_us_per_event(self) -> float:
        return sum(self.cpu_seconds.values()) / self.sent * 1e6 if self.sent else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "zero_loss": self.zero_loss,
            "steady": self.steady,
            "passed": self.zero_loss and self.steady,
            "cpu_us_per_event": round(self.cpu_us_per_event, 2),
            "mqtt_duplicates": self.mqtt_duplicates,
        }

    def describe(self) -> str:
        mqtt = f" mqtt {self.mqtt:,}" if self.mqtt is not None else ""
        drain = (
            f"{self.drain_seconds:.2f}s"
            if self.drain_seconds is not None
            else f"> {drain_deadline(self.drain_limit):g} s"
        )
        if self.arrived_at_limit:
            drain += f" (at {self.drain_limit:g} s: {self.arrived_at_limit})"
        if self.mqtt_duplicates:
            mqtt += f" ({self.mqtt_duplicates:,} duplicates)"
        verdict = (
            "OK" if self.zero_loss and self.steady else "LOSS" if not self.zero_loss else "BEHIND"
        )
        return (
            f"{self.mode} workers={self.workers} rate={self.rate:,.0f}/s "
            f"(sent {self.achieved_rate:,.0f}/s): influx {self.influx:,}{mqtt} of {self.sent:,}, "
            f"drain {drain}, cpu {self.cpu_us_per_event:.1f} µs/event: {verdict}"
        )


def run_trial(service: RunningService, rate: float, duration: float) -> Trial:
    """Send `rate` x `duration` datagrams and a marker; count what arrived; time the drain."""
    bench = service.bench
    trial = Trial(service.mode, service.workers, rate)
    before = service.settle()
    mqtt_before = service.mqtt_count()
    cpu_before = service.processes.cpu()
    busy = MachineLoad()
    since = time.time_ns()
    count = max(1, int(rate * duration))
    report = send(("127.0.0.1", service.port), bench.pool, rate, count=count, sources=SOURCES)
    marker = send_marker(service.port)
    sent_at = time.monotonic()
    trial.sent, trial.achieved_rate = report.sent, round(report.rate, 1)
    trial.drain_seconds, trial.arrived_at_limit = wait_delivered(
        service, trial.sent + 1, since, marker, mqtt_before, sent_at
    )
    trial.drain_limit = bench.drain_limit
    trial.cpu_seconds = cpu_delta(cpu_before, service.processes.cpu())
    trial.machine = busy.take()
    trial.peak_rss_mb = {k: round(v, 1) for k, v in service.processes.peak_rss().items()}
    try:
        after = service.settle()
    except TimeoutError:
        after = service.counters()
    trial.dropped = {
        k: after.get(k, 0) - before.get(k, 0) for k in after if k.startswith("dropped")
    }
    trial.written = {
        d: after.get(f"written.{d}", 0) - before.get(f"written.{d}", 0)
        for d in destinations(service.mode)
    }
    markers = service.influx_count(since, f"AND userId = '{marker}'")
    trial.influx = service.influx_count(since) - markers
    if service.counter is not None:
        trial.mqtt = service.mqtt_count() - mqtt_before - markers
    return trial


def send_marker(port: int) -> str:
    """One more valid event, with a user id of its own, right after the load. The InfluxDB
    sink writes in order, so once the marker is stored, (nearly) everything before it is:
    a cheap query on a tag tells when to count, instead of counting again and again."""
    marker = f"marker-{time.monotonic_ns()}"
    datagram = (
        f"/qseow-proxy-connection/;sense1;Open connection;BENCH;{marker};AppAccess;/hub/;"
        f"Open connection for user 'BENCH\\{marker}'"
    ).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(datagram, ("127.0.0.1", port))
    return marker


def drain_deadline(limit: float) -> float:
    """Seconds after the last datagram when a trial stops waiting for its events: by then
    it has failed (not steady) anyway, and counting what arrived waits for the service to
    settle; a long wait here only made failed trials cost half a minute each."""
    return max(8.0, limit * 4)


def wait_delivered(
    service: RunningService,
    expected: int,
    since: int,
    marker: str,
    mqtt_before: int,
    sent_at: float,
    patience: float | None = None,
) -> tuple[float | None, dict[str, Any]]:
    """Seconds from the last datagram sent until the marker is in InfluxDB, InfluxDB holds
    all `expected` events and MQTT delivered them (None: not within `patience` s, by default
    `drain_deadline`); and,
    if that took longer than the drain limit, what had arrived when the limit passed.
    The marker is a cheap query; the full count, slow on a large trial, runs only once it
    is in."""
    limit = service.bench.drain_limit
    deadline = sent_at + (patience or drain_deadline(limit))
    where = f"AND userId = '{marker}'"
    at_limit: dict[str, Any] = {}
    while True:
        waited = time.monotonic() - sent_at
        mqtt = service.mqtt_count() - mqtt_before if service.counter is not None else None
        stored = bool(service.influx_count(since, where))
        if stored and (mqtt is None or mqtt >= expected):
            if service.influx_count(since) >= expected:  # workers may finish out of order
                return round(waited, 3), at_limit
        elif waited > limit and not at_limit:
            at_limit = {
                "influxdb": service.influx_count(since),
                "mqtt": mqtt,
                "marker_stored": stored,
            }
        if time.monotonic() > deadline:
            return None, at_limit
        time.sleep(0.05)


# -- latency steps ----------------------------------------------------------------------------


@dataclass
class Step:
    rate: float
    sent: int = 0
    achieved_rate: float = 0.0
    influx_latency_ms: dict[str, float] = field(default_factory=dict)
    mqtt_latency_ms: dict[str, float] = field(default_factory=dict)
    influx_delivered: int = 0
    mqtt_delivered: int = 0
    influx_write_ms: dict[str, float] = field(default_factory=dict)
    """How long InfluxDB took per /write request (as the proxy saw it)."""
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    cpu_us_per_event: dict[str, float] = field(default_factory=dict)
    cpu_us_per_event_total: float = 0.0
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    peak_total_rss_mb: float = 0.0
    pss_mb_total: float = 0.0
    machine: dict[str, float] = field(default_factory=dict)


def cpu_per_event(cpu: dict[str, float], events: int) -> tuple[dict[str, float], float]:
    per = {k: round(v / events * 1e6, 2) for k, v in cpu.items()} if events else {}
    return per, round(sum(cpu.values()) / events * 1e6, 2) if events else 0.0


def run_step(service: RunningService, rate: float, probes: Any, warmup: float) -> Step:
    """Send at `rate` for the bench duration; latency from the probes, CPU and RSS per process."""
    from benchmarks.probes import latencies_ms, percentiles, write_durations_ms
    from benchmarks.procs import pss_mb

    bench = service.bench
    step = Step(rate)
    service.settle()
    seen = {
        name: probe.out.stat().st_size // 16 if probe.out.exists() else 0
        for name, probe in probes.items()
    }
    cpu_before = service.processes.cpu()
    busy = MachineLoad()
    started_ns = time.time_ns()
    with RssSampler(service.processes, 0.5) as sampler:
        report = send(
            ("127.0.0.1", service.port),
            bench.pool,
            rate,
            count=max(1, int(rate * bench.duration)),
            sources=SOURCES,
        )
        ended_ns = time.time_ns()
        step.sent, step.achieved_rate = report.sent, round(report.rate, 1)
        deadline = time.monotonic() + bench.drain_limit + 10
        while time.monotonic() < deadline and any(
            probe.out.stat().st_size // 16 - seen[name] < step.sent
            for name, probe in probes.items()
        ):
            time.sleep(0.1)
    cpu = cpu_delta(cpu_before, service.processes.cpu())
    step.machine = busy.take()
    step.cpu_seconds = cpu
    step.cpu_us_per_event, step.cpu_us_per_event_total = cpu_per_event(cpu, step.sent)
    step.peak_rss_mb = sampler.peak()
    step.peak_total_rss_mb = max((total_mb for _, total_mb in sampler.totals()), default=0.0)
    step.pss_mb_total = round(
        sum(pss_mb(pid) or 0.0 for pid in service.processes.pids().values()), 1
    )
    window = (started_ns + int(warmup * 1e9), ended_ns)
    for name, probe in probes.items():
        values = latencies_ms(probe, *window)
        delivered = probe.out.stat().st_size // 16 - seen[name]
        if name == "influxdb":
            step.influx_latency_ms, step.influx_delivered = percentiles(values), delivered
            step.influx_write_ms = percentiles(write_durations_ms(probe, started_ns, ended_ns))
        else:
            step.mqtt_latency_ms, step.mqtt_delivered = percentiles(values), delivered
    return step


# -- overload ---------------------------------------------------------------------------------


def run_overload(
    service: RunningService, rate: float, duration: float, drain_timeout: float
) -> dict[str, Any]:
    """`rate` for `duration` s: does RSS stay flat while it lasts, do the counters add up?"""
    before = service.settle()
    since = time.time_ns()
    mqtt_before = service.mqtt_count()
    busy = MachineLoad()
    with RssSampler(service.processes, 0.5) as sampler:
        report = send(
            ("127.0.0.1", service.port),
            service.bench.pool,
            rate,
            count=max(1, int(rate * duration)),
            sources=SOURCES,
        )
    machine = busy.take()
    caught_up = True
    try:
        service.settle(drain_timeout)
    except TimeoutError:
        caught_up = False
    stored = {"influxdb": service.influx_count(since)}
    if service.counter is not None:
        stored["mqtt"] = service.mqtt_count() - mqtt_before
    after_drain = {
        name: round(mb, 1)
        for name, pid in service.processes.pids().items()
        if (mb := rss_mb(pid)) is not None
    }
    final = service.close()
    delta = {k: final.get(k, 0) - before.get(k, 0) for k in final}
    summary = overload_summary(
        report, rate, caught_up, delta, sampler.totals(), sampler.peak(), stored
    )
    summary["rss_after_drain_mb"] = after_drain
    summary["machine_while_sending"] = machine
    return summary


def overload_summary(
    report: Any,
    rate: float,
    caught_up: bool,
    delta: dict[str, int],
    samples: list[tuple[float, float]],
    peaks: dict[str, float],
    stored: dict[str, int],
) -> dict[str, Any]:
    return {
        "rate": rate,
        "sent": report.sent,
        "achieved_rate": round(report.rate, 1),
        "send_seconds": round(report.seconds, 2),
        "caught_up_before_stop": caught_up,
        "counters": delta,
        "stored": stored,
        "checks": overload_checks(report.sent, delta, stored),
        "rss_total_mb": samples,
        "peak_rss_mb": peaks,
        **rss_flatness(samples),
    }


def overload_checks(sent: int, delta: dict[str, int], stored: dict[str, int]) -> dict[str, bool]:
    """Do the counters add up? `delta` holds the fields of the supervisor's counters line:
    `invalid` and `dropped` there are the sums that balance `received` (the kernel's drops
    and a destination giving up are not in that `dropped`), then the details by reason."""
    events = delta.get("events", 0)

    def settled(d: str) -> int:
        return (
            delta.get(f"written.{d}", 0)
            + delta.get(f"failed.{d}", 0)
            + delta.get(f"dropped.destination_full.{d}", 0)
        )

    return {
        "sent == received + dropped.kernel": sent
        == delta.get("received", 0) + delta.get("dropped.kernel", 0),
        "received == events + invalid + excluded + dropped": delta.get("received", 0)
        == events + delta.get("invalid", 0) + delta.get("excluded", 0) + delta.get("dropped", 0),
        "events == written + failed + given up, per destination": all(
            settled(d) == events for d in stored
        ),
        "stored == written, per destination": all(
            stored[d] == delta.get(f"written.{d}", 0) for d in stored
        ),
    }


def rss_flatness(samples: list[tuple[float, float]]) -> dict[str, float | bool]:
    """Total RSS while overloaded: peak over the first half vs peak over the second half."""
    if len(samples) < 4:
        return {
            "rss_first_half_peak_mb": 0.0,
            "rss_second_half_peak_mb": 0.0,
            "rss_growth_pct": 0.0,
            "rss_flat": True,
        }
    middle = samples[-1][0] / 2
    first = max(mb for t, mb in samples if t <= middle)
    second = max(mb for t, mb in samples if t > middle)
    growth = (second - first) / first * 100 if first else 0.0
    return {
        "rss_first_half_peak_mb": first,
        "rss_second_half_peak_mb": second,
        "rss_growth_pct": round(growth, 1),
        "rss_flat": growth <= 10.0,
    }
