"""Cost growth: CPU per event and memory as the work grows (issue 15, "Also measure").

Two series, each on a `senseflow run` of its own (InfluxDB 1.x only, the default
--workers 2, live sessions on as by default):

- rates: the corpus of `senseflow send` (300 users) at 100, 1,000, 10,000 and 30,000/s;
- users: 10,000/s from 10, 1,000 and 100,000 distinct users (`senseflow send --sessions`
  traffic, senseflow/commands/sessionsim.py: users `user<i>` picked uniformly, sessions
  started, apps opened and closed). Before the steps of a user count, every user starts a
  session and opens an app once, so the session state and the caches hold them all; the
  counts go up, so each state is at least as large as the one before.

Each step, repeated and the median kept: CPU per event delivered (utime + stime of every
process of the service, whole and per role), total RSS (sum over the processes at the end
of the step, and the peak of the sum) and total PSS (/proc/PID/smaps_rollup: shared pages
counted once over the processes). Run in `benchmarks.suite --full` (and, smaller, in
`--quick`), or alone with its own influxd and mosquitto:

    .venv/bin/python -m benchmarks.growth [--quick] [--hog N] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from benchmarks import endtoend
from benchmarks.endtoend import SOURCES, Bench, RunningService, bench_servers
from benchmarks.growthreport import markdown, plot
from benchmarks.hog import Hogs
from benchmarks.procs import MachineLoad, RssSampler, cpu_delta, pss_mb, rss_mb
from senseflow.commands.corpus import HOSTS, USER_AGENTS, make_corpus
from senseflow.commands.send import send
from senseflow.commands.sessionsim import APPS, Simulation, datagram
from tests.e2e.harness import REPO

MODE = "influx"
WORKERS = 2
FILL_RATE = 20_000.0
"""Events/s at which the session state is filled before the steps of a user count."""
DRAIN_PATIENCE = 20.0
"""Seconds a step waits after its last datagram for every event to be stored: CPU per
event counts all the work, even when the service fell behind (the table says so)."""


@dataclass(frozen=True)
class GrowthScale:
    rates: tuple[float, ...]
    users: tuple[int, ...]
    users_rate: float
    duration: float
    repeats: int


FULL = GrowthScale((100.0, 1_000.0, 10_000.0, 30_000.0), (10, 1_000, 100_000), 10_000.0, 15.0, 2)
QUICK = GrowthScale((100.0, 1_000.0, 10_000.0), (10, 1_000, 10_000), 10_000.0, 2.0, 1)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def fill_datagrams(users: int) -> list[bytes]:
    """A session start and an app opened for each of `users` users, hosts in turn."""
    out = []
    for index in range(users):
        host, user = HOSTS[index % len(HOSTS)], f"user{index}"
        agent = USER_AGENTS[index % len(USER_AGENTS)]
        out.append(datagram("Start session", host, user, "", agent))
        out.append(datagram("Open connection", host, user, APPS[index % len(APPS)], agent))
    return out


def user_traffic(users: int, count: int, seed: int = 1) -> list[bytes]:
    """`count` datagrams of `senseflow send --sessions users` traffic."""
    return [data for _, data in Simulation(users, seed).datagrams(count)]


def measure_step(
    service: RunningService, pool: list[bytes], rate: float, duration: float
) -> dict[str, Any]:
    """Send `rate`/s for `duration` s and a marker; CPU from before the first datagram
    until everything is in InfluxDB (`drain_seconds` after the last datagram, None: not
    within DRAIN_PATIENCE); memory at the end."""
    try:
        service.settle(DRAIN_PATIENCE + 10)
        settled = True
    except TimeoutError:  # still behind the step before: measured all the same, and said
        settled = False
    since = time.time_ns()
    busy = MachineLoad()
    cpu_before = service.processes.cpu()
    with RssSampler(service.processes, 0.5) as sampler:
        report = send(
            ("127.0.0.1", service.port),
            pool,
            rate,
            count=max(1, int(rate * duration)),
            sources=SOURCES,
        )
        marker = endtoend.send_marker(service.port)
        drain, _ = endtoend.wait_delivered(
            service, report.sent + 1, since, marker, 0, time.monotonic(), DRAIN_PATIENCE
        )
        cpu = cpu_delta(cpu_before, service.processes.cpu())
    pids = service.processes.pids()
    rss = {name: round(mb, 1) for name, pid in pids.items() if (mb := rss_mb(pid)) is not None}
    pss = {name: round(mb, 1) for name, pid in pids.items() if (mb := pss_mb(pid)) is not None}
    per_process = {k: round(v / report.sent * 1e6, 2) for k, v in cpu.items()}
    return {
        "rate": rate,
        "sent": report.sent,
        "achieved_rate": round(report.rate, 1),
        "drain_seconds": drain,
        "settled_before": settled,
        "cpu_seconds": cpu,
        "cpu_us_per_event": per_process,
        "cpu_us_per_event_total": round(sum(cpu.values()) / report.sent * 1e6, 2),
        "rss_mb": rss,
        "rss_total_mb": round(sum(rss.values()), 1),
        "peak_total_rss_mb": max((mb for _, mb in sampler.totals()), default=0.0),
        "pss_mb": pss,
        "pss_total_mb": round(sum(pss.values()), 1),
        "machine": busy.take(),
    }


def summarize(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats of one step; per role (reader, workers, writer, ...)."""
    roles = [by_role(s["cpu_us_per_event"]) for s in steps]
    names = sorted({name for r in roles for name in r})
    return {
        "repeats": len(steps),
        "cpu_us_per_event_total": _median([s["cpu_us_per_event_total"] for s in steps]),
        "cpu_us_per_event_by_role": {n: _median([r.get(n, 0.0) for r in roles]) for n in names},
        "rss_total_mb": _median([s["rss_total_mb"] for s in steps]),
        "peak_total_rss_mb": _median([s["peak_total_rss_mb"] for s in steps]),
        "pss_total_mb": _median([s["pss_total_mb"] for s in steps]),
        "drained": all(s["drain_seconds"] is not None for s in steps),
        "drain_seconds_max": max(
            (s["drain_seconds"] for s in steps if s["drain_seconds"] is not None), default=None
        ),
    }


def by_role(per_process: dict[str, float]) -> dict[str, float]:
    """Per-process figures summed by role: `worker-0` and `worker-1` are `workers`."""
    out: dict[str, float] = {}
    for name, value in per_process.items():
        role = name.rsplit("-", 1)[0] if name[-1:].isdigit() else name
        role = {"worker": "workers", "reader": "readers"}.get(role, role)
        out[role] = round(out.get(role, 0.0) + value, 2)
    return out


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2) if values else 0.0


def measure_growth(
    bench: Bench, scale: GrowthScale, say: Callable[[str], None] = log
) -> dict[str, Any]:
    """Both series; the raw steps and one summary row per rate / user count."""
    rows: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    with endtoend.running(bench, MODE, WORKERS) as service:
        for rate in scale.rates:
            steps = [
                measure_step(service, bench.pool, rate, scale.duration)
                for _ in range(scale.repeats)
            ]
            raw += [{"series": "rates", "users": 300, **s} for s in steps]
            rows.append({"series": "rates", "rate": rate, "users": 300, **summarize(steps)})
            say(_describe(rows[-1]))
    with endtoend.running(bench, MODE, WORKERS) as service:
        for users in scale.users:
            fill = fill_datagrams(users)
            send(("127.0.0.1", service.port), fill, FILL_RATE, count=len(fill), sources=SOURCES)
            pool = user_traffic(users, max(1, int(scale.users_rate * scale.duration)))
            steps = [
                measure_step(service, pool, scale.users_rate, scale.duration)
                for _ in range(scale.repeats)
            ]
            raw += [{"series": "users", "users": users, **s} for s in steps]
            row = {"series": "users", "rate": scale.users_rate, "users": users}
            rows.append({**row, **summarize(steps)})
            say(_describe(rows[-1]))
    return {
        "mode": MODE,
        "workers": WORKERS,
        "scale": scale.__dict__,
        "rows": rows,
        "steps": raw,
    }


def _describe(row: dict[str, Any]) -> str:
    return (
        f"growth {row['series']}: {row['rate']:,.0f}/s, {row['users']:,} users: "
        f"{row['cpu_us_per_event_total']} µs/event {row['cpu_us_per_event_by_role']}, "
        f"RSS {row['rss_total_mb']:.0f} MB, PSS {row['pss_total_mb']:.0f} MB"
    )


@contextmanager
def standalone_bench(workdir: Path, duration: float) -> Iterator[Bench]:
    with bench_servers(workdir, log) as (influx, broker):
        yield Bench(workdir, influx, broker, make_corpus(50_000, seed=1), duration, 2.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.growth",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a few seconds per step")
    parser.add_argument("--hog", type=int, default=0, help="CPU-burning processes beside it")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FULL
    name = "growth-quick" if args.quick else "growth"
    args.out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="senseflow-growth-")))
        bench = stack.enter_context(standalone_bench(workdir, scale.duration))
        stack.enter_context(Hogs(args.hog))
        started = time.monotonic()
        growth = measure_growth(bench, scale)
    growth["hog"] = args.hog
    growth["elapsed_s"] = round(time.monotonic() - started, 1)
    growth["plot"] = plot(growth, args.out / f"{name}.png")
    (args.out / f"{name}.json").write_bytes(orjson.dumps(growth, option=orjson.OPT_INDENT_2))
    text = markdown(growth)
    (args.out / f"{name}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
