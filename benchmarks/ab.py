"""A/B: CPU per event of the whole service, two code trees side by side in one run.

    .venv/bin/python -m benchmarks.ab --old /work/ab-old --new /work/main \\
        --rates 1000 10000 --repeats 5 [--duration 8] [--json OUT]

For each rate, one `senseflow run` per tree (InfluxDB 1.x + MQTT QoS 1 on the everything
topic only, `--workers 2`), both started from the same interpreter but with the tree as
working directory and PYTHONPATH, so each imports its own code (checked and logged). Both
stay up while the trials of that rate alternate between them (old, new, new, old, ...),
each after a warm-up trial that is not counted. A trial is `benchmarks.endtoend.run_trial`:
wait until the service has settled, send `rate` x `duration` datagrams from one corpus,
wait until InfluxDB (`SELECT count`) and the MQTT subscriber hold every event, and take
the CPU time (utime + stime from /proc/<pid>/stat) of every process in the service's
process group over that window. One influxd and one mosquitto serve the whole run; events
are counted from the trial's start time (and a marker event) in the service's database.

The machine is shared and noisy: medians over the repeats, and the ratio new/old both of
the medians and as the median of the per-repeat (paired) ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from benchmarks.endtoend import (
    Bench,
    RunningService,
    Trial,
    bench_servers,
    run_trial,
)
from senseflow.commands.corpus import make_corpus
from tests.e2e.harness import Service, cli_of

MODE = "influx+mqtt"
WRITER = "writer"
IMPORT_CHECK = (
    "import importlib, sys; [print(importlib.import_module(m).__file__) for m in sys.argv[1:]]"
)
"""Where the given modules come from (the tree's CLI, writer and config)."""


def log(message: str) -> None:
    print(f"{datetime.now():%H:%M:%S} {message}", file=sys.stderr, flush=True)


# -- a service started from a given code tree ---------------------------------------------------


def tree_environment(tree: Path) -> dict[str, str]:
    """This process's environment with the tree first on the import path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["PYTHONPATH"] = str(tree)
    return env


def imported_files(tree: Path) -> list[str]:
    """Where `python -c 'import ...'` finds the service's modules with the tree's cwd and
    environment (what `senseflow run` started the same way imports); raises if any is
    not inside the tree."""
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK, cli_of(tree)[-1], "workers.writer", "shared.config"],
        cwd=tree,
        env=tree_environment(tree),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    files = done.stdout.split()
    outside = [f for f in files if not Path(f).resolve().is_relative_to(tree.resolve())]
    if outside or not files:
        raise RuntimeError(f"{tree}: modules imported from outside the tree: {files}")
    return files


def check_origin(service: Service, tree: Path) -> None:
    """The running supervisor's working directory and PYTHONPATH are the tree."""
    pid = service.process.pid
    cwd = Path(os.readlink(f"/proc/{pid}/cwd")).resolve()
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pythonpath = next(
        (e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"PYTHONPATH=")), ""
    )
    if cwd != tree.resolve() or pythonpath != str(tree):
        raise RuntimeError(f"pid {pid} runs in {cwd} with PYTHONPATH={pythonpath!r}")


def tree_service(
    bench: Bench,
    tree: Path,
    workers: int,
    mode: str = MODE,
    pipeline: dict[str, Any] | None = None,
) -> RunningService:
    """`benchmarks.endtoend.RunningService` (InfluxDB + MQTT, its own database, spool and
    subscriber; `mode` "influx": InfluxDB only) whose `senseflow run` comes from `tree`;
    `pipeline`: `senseflow:` settings for both trees."""
    running = RunningService(bench, mode, workers, tree=tree, pipeline=pipeline)
    try:
        check_origin(running.service, tree)
    except BaseException:
        running.close()
        raise
    return running


# -- trials -------------------------------------------------------------------------------------


@dataclass
class Tree:
    label: str
    path: Path
    pipeline: dict[str, Any] | None = None
    """`senseflow:` settings of this tree alone, over the shared ones (`--new-pipeline`)."""


def trial_record(tree: Tree, rate: float, repeat: int, order: int, trial: Trial) -> dict[str, Any]:
    sent = trial.sent
    total = sum(trial.cpu_seconds.values())
    writer = trial.cpu_seconds.get(WRITER, 0.0)
    return {
        "tree": tree.label,
        "rate": rate,
        "repeat": repeat,
        "order": order,
        "sent": sent,
        "achieved_rate": trial.achieved_rate,
        "influx": trial.influx,
        "mqtt": trial.mqtt,
        "influx_missing": max(0, sent - trial.influx),
        "mqtt_missing": 0 if trial.mqtt is None else max(0, sent - trial.mqtt),
        "mqtt_duplicates": trial.mqtt_duplicates,
        "written": trial.written,
        "dropped": {k: v for k, v in trial.dropped.items() if v},
        "zero_loss": trial.zero_loss,
        "steady": trial.steady,
        "drain_seconds": trial.drain_seconds,
        "cpu_seconds": trial.cpu_seconds,
        "cpu_us_per_event": round(total / sent * 1e6, 2) if sent else None,
        "writer_us_per_event": round(writer / sent * 1e6, 2) if sent else None,
        "per_process_us_per_event": {
            k: round(v / sent * 1e6, 2) for k, v in trial.cpu_seconds.items()
        }
        if sent
        else {},
        "machine": trial.machine,
    }


def describe(record: dict[str, Any]) -> str:
    loss = (
        ""
        if record["zero_loss"]
        else (
            f" LOSS influx -{record['influx_missing']} mqtt -{record['mqtt_missing']}"
            f" written {record['written']} dropped {record['dropped']}"
        )
    )
    return (
        f"{record['tree']:>3} {record['rate']:>7,.0f}/s #{record['repeat']}: "
        f"sent {record['sent']:,} ({record['achieved_rate']:,.0f}/s), "
        f"influx {record['influx']:,} mqtt {record['mqtt'] or 0:,}, "
        f"drain {record['drain_seconds']} s, "
        f"cpu {record['cpu_us_per_event']} µs/event (writer {record['writer_us_per_event']}), "
        f"machine {record['machine'].get('busy_pct')} % busy{loss}"
    )


def run_rate(
    bench: Bench,
    trees: list[Tree],
    rate: float,
    repeats: int,
    workers: int,
    warmup: float,
    mode: str = MODE,
    pipeline: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Both trees' services up, a warm-up trial each, then `repeats` trials each,
    alternating which tree goes first (ABBA)."""
    records: list[dict[str, Any]] = []
    with ExitStack() as stack:
        services: dict[str, RunningService] = {}
        for tree in trees:
            own = {**(pipeline or {}), **(tree.pipeline or {})} or None
            service = tree_service(bench, tree.path, workers, mode, own)
            stack.callback(service.close)
            services[tree.label] = service
            log(
                f"{tree.label}: senseflow run pid {service.service.process.pid} "
                f"(cwd {tree.path}), UDP port {service.port}, processes {service.processes.pids()}"
            )
        for tree in trees:
            trial = run_trial(services[tree.label], rate, warmup)
            log(f"warm-up {describe(trial_record(tree, rate, 0, 0, trial))}")
        for repeat in range(1, repeats + 1):
            order = trees if repeat % 2 else trees[::-1]
            for position, tree in enumerate(order):
                trial = run_trial(services[tree.label], rate, bench.duration)
                record = trial_record(tree, rate, repeat, position, trial)
                records.append(record)
                log(describe(record))
        for tree in trees:
            final = services[tree.label].close()
            log(f"{tree.label}: stopped; final counters {final}")
    return records


# -- summary ------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2) if values else float("nan")


def summarize(records: list[dict[str, Any]], trees: list[Tree]) -> list[dict[str, Any]]:
    old, new = trees[0].label, trees[1].label
    rows = []
    for rate in sorted({r["rate"] for r in records}):
        at = [r for r in records if r["rate"] == rate]
        by = {t.label: [r for r in at if r["tree"] == t.label] for t in trees}
        row: dict[str, Any] = {"rate": rate, "repeats": min(len(v) for v in by.values())}
        for key, name in (("cpu_us_per_event", "total"), ("writer_us_per_event", "writer")):
            medians = {label: median([r[key] for r in by[label]]) for label in by}
            paired = [
                n[key] / o[key]
                for o, n in zip(
                    sorted(by[old], key=lambda r: r["repeat"]),
                    sorted(by[new], key=lambda r: r["repeat"]),
                    strict=True,
                )
                if o[key]
            ]
            row[name] = {
                **medians,
                "ratio": round(medians[new] / medians[old], 3) if medians[old] else None,
                "paired_ratio": round(statistics.median(paired), 3) if paired else None,
                "range": {
                    label: [min(r[key] for r in by[label]), max(r[key] for r in by[label])]
                    for label in by
                },
            }
        row["loss"] = {
            label: {
                "trials_with_loss": sum(not r["zero_loss"] for r in by[label]),
                "influx_missing": sum(r["influx_missing"] for r in by[label]),
                "mqtt_missing": sum(r["mqtt_missing"] for r in by[label]),
                "mqtt_duplicates": sum(r["mqtt_duplicates"] for r in by[label]),
                "not_steady": sum(not r["steady"] for r in by[label]),
            }
            for label in by
        }
        row["machine_busy_pct"] = {
            label: median([r["machine"].get("busy_pct", 0.0) for r in by[label]]) for label in by
        }
        rows.append(row)
    return rows


def loss_text(loss: dict[str, Any]) -> str:
    parts = []
    for label, value in loss.items():
        if value["trials_with_loss"]:
            parts.append(
                f"{label}: {value['trials_with_loss']} trial(s) with loss "
                f"(influx -{value['influx_missing']}, mqtt -{value['mqtt_missing']})"
            )
    return "; ".join(parts) or "none (every event in InfluxDB and MQTT, both trees)"


def markdown(rows: list[dict[str, Any]], trees: list[Tree]) -> str:
    old, new = trees[0].label, trees[1].label
    lines = [
        f"| rate/s | total µs/event {old} | {new} | {new}/{old} (paired) "
        f"| writer µs/event {old} | {new} | {new}/{old} (paired) | repeats | loss |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        total, writer = row["total"], row["writer"]
        lines.append(
            f"| {row['rate']:,.0f} | {total[old]:.1f} | {total[new]:.1f} "
            f"| {total['ratio']:.2f} ({total['paired_ratio']:.2f}) "
            f"| {writer[old]:.1f} | {writer[new]:.1f} "
            f"| {writer['ratio']:.2f} ({writer['paired_ratio']:.2f}) "
            f"| {row['repeats']} | {loss_text(row['loss'])} |"
        )
    return "\n".join(lines)


# -- the run ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ab",
        description="CPU per event of the whole service, two code trees alternated in one run.",
    )
    parser.add_argument("--old", type=Path, required=True, help="the code tree before")
    parser.add_argument("--new", type=Path, required=True, help="the code tree after")
    parser.add_argument("--rates", type=float, nargs="+", default=[1000.0, 10000.0])
    parser.add_argument("--repeats", type=int, default=5, help="trials per tree and rate")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of sending")
    parser.add_argument("--warmup", type=float, default=2.0, help="uncounted first trial, s")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--drain-limit", type=float, default=5.0, help="steady if drained by")
    parser.add_argument("--pool", type=int, default=50_000, help="corpus size (datagrams)")
    parser.add_argument("--json", type=Path, help="write every trial and the summary here")
    parser.add_argument(
        "--mode", choices=("influx+mqtt", "influx"), default=MODE, help="destinations"
    )
    parser.add_argument(
        "--pipeline",
        type=orjson.loads,
        default=None,
        help='`senseflow:` settings for both trees (JSON): \'{"sessions": {"enable": false}}\'',
    )
    parser.add_argument(
        "--new-pipeline",
        type=orjson.loads,
        default=None,
        help="`senseflow:` settings of the new tree alone, over --pipeline: the same tree as "
        '--old and --new with \'{"sessions": {"enable": true}}\' measures a feature',
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    trees = [
        Tree("old", args.old.resolve()),
        Tree("new", args.new.resolve(), args.new_pipeline),
    ]
    started = time.monotonic()
    meta: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.ab", *sys.argv[1:]]),
        "trees": {t.label: str(t.path) for t in trees},
        "mode": args.mode,
        "pipeline": args.pipeline,
        "new_pipeline": args.new_pipeline,
        "workers": args.workers,
        "duration_s": args.duration,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }
    meta["imports"] = {t.label: imported_files(t.path) for t in trees}
    for label, files in meta["imports"].items():
        log(f"{label} imports {', '.join(files)}")
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="senseflow-ab-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        influx, broker = stack.enter_context(bench_servers(workdir, log))
        pool = make_corpus(args.pool, seed=1)
        bench = Bench(workdir, influx, broker, pool, args.duration, args.drain_limit)
        for rate in args.rates:
            records += run_rate(
                bench, trees, rate, args.repeats, args.workers, args.warmup,
                args.mode, args.pipeline,
            )  # fmt: skip
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    rows = summarize(records, trees)
    table = markdown(rows, trees)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {"meta": meta, "summary": rows, "trials": records, "table": table}
        args.json.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
