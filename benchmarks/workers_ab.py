"""Workers A/B: the same high rate into services with different `--workers`, alternated.

    python -m benchmarks.workers_ab --workers 1 2 --rates 30000 --repeats 3 [--hog]

One influxd, one `senseflow run` per worker count (InfluxDB only, both up for the whole
run), trials alternating between them (1, 2, 2, 1, ...) after an uncounted warm-up each.
A trial is `benchmarks.endtoend.run_trial` (send `rate` x `duration`, wait until InfluxDB
holds every event): zero loss, the drain time after the last datagram, CPU per event per
process. `--hog` runs a busy loop (`python -c 'while 1: pass'`) beside the run, started and
stopped by its pid: the "loaded machine" of the issue. `--nice-workers N` adds a service
with the most workers whose workers run at niceness N (reader and writer at 0). Figures
are indicative on a shared machine; compare the counts only within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import orjson

from benchmarks.endtoend import Bench, RunningService, bench_servers, run_trial
from senseflow.commands.corpus import make_corpus

MODE = "influx"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def cpu_hog(enabled: bool) -> Iterator[None]:
    """A process that spins on one core while the trials run (none if not enabled)."""
    hog = subprocess.Popen([sys.executable, "-c", "while 1: pass"]) if enabled else None
    try:
        yield
    finally:
        if hog is not None:
            hog.kill()
            hog.wait(10)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        influx, broker = stack.enter_context(bench_servers(workdir, log))
        bench = Bench(workdir, influx, broker, make_corpus(50_000, seed=15), args.duration, 2.0)
        services = {
            str(n): stack.enter_context(closing(RunningService(bench, MODE, n)))
            for n in args.workers
        }
        if args.nice_workers:
            most = max(args.workers)
            niced = stack.enter_context(closing(RunningService(bench, MODE, most)))
            renice_workers(niced, args.nice_workers)
            services[f"{most} nice {args.nice_workers}"] = niced
        with cpu_hog(args.hog):
            for rate in args.rates:
                for service in services.values():
                    run_trial(service, rate, args.warmup)
                for repeat in range(args.repeats):
                    order = list(services) if repeat % 2 == 0 else list(services)[::-1]
                    for label in order:
                        trial = run_trial(services[label], rate, args.duration)
                        log(f"[{label}] {trial.describe()}")
                        records.append(
                            {**trial.as_dict(), "label": label, "repeat": repeat, "hog": args.hog}
                        )
    return records


def renice_workers(service: RunningService, niceness: int) -> None:
    """Lower the workers' CPU priority (the reader and writer keep theirs)."""
    for index in range(service.workers):
        for pid in service.service.child_pids(f"worker-{index}"):
            os.setpriority(os.PRIO_PROCESS, pid, niceness)


@contextmanager
def closing(service: RunningService) -> Iterator[RunningService]:
    try:
        yield service
    finally:
        service.close()


def summary(records: list[dict[str, Any]]) -> list[str]:
    lines = []
    for rate in sorted({r["rate"] for r in records}):
        for label in sorted({r["label"] for r in records}):
            at = [r for r in records if r["rate"] == rate and r["label"] == label]
            drains = [r["drain_seconds"] for r in at if r["drain_seconds"] is not None]
            lines.append(
                f"rate {rate:,.0f} workers {label}: passed {sum(r['passed'] for r in at)}"
                f"/{len(at)}, zero loss {sum(r['zero_loss'] for r in at)}/{len(at)}, "
                f"drain median {statistics.median(drains) if drains else float('nan'):.2f} s, "
                f"cpu median {statistics.median(r['cpu_us_per_event'] for r in at):.1f} µs/event"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rates", type=float, nargs="+", default=[30_000.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of sending")
    parser.add_argument("--warmup", type=float, default=1.0, help="uncounted first trial, s")
    parser.add_argument("--hog", action="store_true", help="a busy loop beside the run")
    parser.add_argument(
        "--nice-workers", type=int, default=0, help="also the most workers, reniced +N"
    )
    parser.add_argument("--json", type=Path, help="write every trial here")
    args = parser.parse_args()
    records = run(args)
    if args.json:
        args.json.write_bytes(orjson.dumps(records, option=orjson.OPT_INDENT_2))
    print("\n".join(summary(records)))


if __name__ == "__main__":
    main()
