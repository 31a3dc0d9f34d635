"""The benchmark suite: senseflow against real InfluxDB and Mosquitto, in one run.

Starts its own influxd and mosquitto (tests/localservers.py) and measures, in order:

1. ceilings: socket (a bare uvloop loop that only counts, flooded by `senseflow send`),
   sink (InfluxDB taking pre-encoded line protocol in batches of 5,000) and broker (the
   same MQTT payloads at QoS 1 by our MqttSink; aiomqtt and paho-mqtt for comparison);
2. receiver alone: the same flood into `senseflow run` whose workers discard
   (benchmarks/discard.py), alternating with the socket ceiling, repeat by repeat;
3. end to end, for each --workers: the highest steady zero-loss rate (InfluxDB only, then
   InfluxDB + MQTT QoS 1 on the everything topic) by a bounded search
   (benchmarks/ratesearch.py: bracket, then bisect until (hi - lo) / lo <= 5 %, 8 trials
   at most; lo, hi and the precision reached are in the JSON and the table; a workers
   count after the first starts from the one before), a trial at 10,000/s for CPU per
   event, then latency steps at 1k, 10k and 50 % of the max (receive -> InfluxDB ack,
   receive -> MQTT delivery; CPU and RSS per process); with `--hog N`, the 10k step once
   more beside N CPU-burning processes (benchmarks/hog.py): the loaded-machine figure;
4. overload: 2x the max rate: RSS over time, and whether the counters add up;
5. cost growth (benchmarks/growth.py): CPU per event and total RSS / PSS at 100 to
   30,000 events/s and with 10 to 100,000 distinct users (~5 min of a full run).

Every figure that depends on the machine is also a ratio to a ceiling measured in the
same run. Results: a JSON of raw figures, a Markdown table with issue 15's targets (goal,
measured, met), PNG plots.

    .venv/bin/python -m benchmarks.suite --quick            # ~2-3 minutes, checks the harness
    .venv/bin/python -m benchmarks.suite --full --hog 1     # the real thing, ~30-35 minutes
    .venv/bin/python -m benchmarks.suite --growth-only      # cost growth alone (--quick too)
    .venv/bin/python -m benchmarks.report compare OLD.json NEW.json

`--hog-scope all` keeps the hogs running for the whole run instead (every figure loaded);
`--skip-growth` leaves out phase 5.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from benchmarks import ceilings, endtoend, report
from benchmarks.endtoend import Bench, RunningService, Trial, bench_servers
from benchmarks.growth import FULL as GROWTH_FULL
from benchmarks.growth import QUICK as GROWTH_QUICK
from benchmarks.growth import GrowthScale, measure_growth
from benchmarks.growthreport import markdown as growth_markdown
from benchmarks.growthreport import plot as growth_plot
from benchmarks.hog import Hogs
from benchmarks.micro import machine
from benchmarks.probes import influx_proxy, mqtt_subscriber
from benchmarks.procs import flood_and_time, prefill_and_time
from benchmarks.ratesearch import round_rate, search
from senseflow.commands.corpus import make_corpus
from shared.config import load_config
from tests.e2e.harness import REPO
from tests.localservers import free_ports


@dataclass(frozen=True)
class Scale:
    """How much of everything: --quick checks the harness, --full measures."""

    workers: tuple[int, ...]
    repeats: int
    duration: float
    drain_limit: float
    flood: int
    prefill: int
    sink_points: int
    broker_messages: int
    aiomqtt_awaited: int
    aiomqtt_inflight: int
    max_trials: int
    precision: float
    overload_seconds: float
    warmup: float
    pool: int
    growth: GrowthScale | None


QUICK = Scale(
    workers=(1,),
    repeats=1,
    duration=2.0,
    drain_limit=1.5,
    flood=30_000,
    prefill=20_000,
    sink_points=20_000,
    broker_messages=10_000,
    aiomqtt_awaited=1_000,
    aiomqtt_inflight=3_000,
    max_trials=3,
    precision=0.05,
    overload_seconds=3.0,
    warmup=0.2,
    pool=10_000,
    growth=GROWTH_QUICK,
)
FULL = Scale(
    workers=(1, 2, 4),
    repeats=3,
    duration=15.0,
    drain_limit=2.0,
    flood=1_500_000,
    prefill=300_000,
    sink_points=300_000,
    broker_messages=200_000,
    aiomqtt_awaited=5_000,
    aiomqtt_inflight=20_000,
    max_trials=8,
    precision=0.05,
    overload_seconds=30.0,
    warmup=1.0,
    pool=50_000,
    growth=GROWTH_FULL,
)
FIXED_RATES = (1_000.0, 10_000.0)
CPU_RATE = 10_000.0
DEFAULT_WORKERS = 2


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def median(values: list[float]) -> float:
    return round(statistics.median(values), 1) if values else 0.0


# -- phases -----------------------------------------------------------------------------------


@dataclass
class Material:
    """The same events, pre-encoded once by the workers' pipeline, for every ceiling."""

    config: Any
    batches: list[Any]
    bodies: list[bytes]

    @classmethod
    def build(cls, bench: Bench, events: int) -> Material:
        path = bench.workdir / "ceiling.yaml"
        path.write_text(
            orjson.dumps(endtoend.config_document("influx+mqtt", 9, bench, "x")).decode()
        )
        config = load_config(path)
        batches = ceilings.encode_events(config, bench.pool, events)
        return cls(config, batches, ceilings.influx_bodies(batches))


def measure_ceilings(bench: Bench, scale: Scale, material: Material) -> dict[str, Any]:
    bodies = material.bodies
    sink: dict[str, list[dict[str, Any]]] = {"serial": [], "concurrent_2": []}
    ceilings.sink_ceiling(bench.influx, bodies[:4], 2)  # warm-up: influxd's first writes are slower
    for _ in range(scale.repeats):
        sink["serial"].append(ceilings.sink_ceiling(bench.influx, bodies, 1))
        sink["concurrent_2"].append(ceilings.sink_ceiling(bench.influx, bodies, 2))
    sink_rates = {name: median([r["rate"] for r in runs]) for name, runs in sink.items()}
    log(f"sink ceiling (points/s, median): {sink_rates}")
    broker = measure_broker(bench, scale, material.config)
    return {
        "sink": {
            "runs": sink,
            "rates": sink_rates,
            "rate": max(sink_rates.values()),
            "batch": ceilings.INFLUX_BATCH,
        },
        "broker": broker,
    }


def adjacent_ceilings(bench: Bench, mode: str, material: Material) -> dict[str, float]:
    """Short sink (and broker) ceilings taken right next to a search: the machine is shared
    and its load drifts, so each search is compared with the ceilings of its own minutes."""
    half = material.bodies[: max(1, len(material.bodies) // 2)]
    measured = {"sink": ceilings.sink_ceiling(bench.influx, half, 2)["rate"]}
    if mode == "influx+mqtt":
        batches = material.batches[: max(1, len(material.batches) // 2)]
        run = ceilings.with_subscriber(
            bench.broker, bench.workdir, lambda: ceilings.publish_ours(material.config, batches)
        )
        measured["broker"] = run["rate"]
    return measured


def measure_broker(bench: Bench, scale: Scale, config: Any) -> dict[str, Any]:
    batches = ceilings.encode_events(config, bench.pool, scale.broker_messages)
    payloads = [p for batch in batches for p in batch.mqtt_payloads]
    clients: dict[str, Callable[[], dict[str, Any]]] = {
        "senseflow": lambda: ceilings.publish_ours(config, batches),
        "aiomqtt_awaited": lambda: ceilings.publish_aiomqtt(
            bench.broker, payloads[: scale.aiomqtt_awaited], 1
        ),
        "aiomqtt_100_in_flight": lambda: ceilings.publish_aiomqtt(
            bench.broker, payloads[: scale.aiomqtt_inflight], 100
        ),
        "paho_window_2000": lambda: ceilings.publish_paho(
            bench.broker, payloads[: scale.aiomqtt_inflight], 2000
        ),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in clients}
    for _ in range(scale.repeats):
        for name, client in clients.items():
            runs[name].append(ceilings.with_subscriber(bench.broker, bench.workdir, client))
    rates = {name: median([r["rate"] for r in rs]) for name, rs in runs.items()}
    cpu = {name: median([r["cpu_us_per_message"] for r in rs]) for name, rs in runs.items()}
    log(f"broker ceiling (messages/s, median): {rates}; client CPU µs/message: {cpu}")
    return {
        "runs": runs,
        "rates": rates,
        "client_cpu_us_per_message": cpu,
        "rate": rates["senseflow"],
    }


RECEIVE_BUFFER = 256 * 1024 * 1024
"""Socket buffer of both receivers here: room for the whole pre-filled backlog."""


def measure_receiver(bench: Bench, scale: Scale) -> dict[str, Any]:
    """Socket ceiling and receiver alone, side by side, alternating which goes first.

    Two methods, both on the same two receivers:
    - drain (the figure used): the receiver is stopped, its socket filled by `senseflow
      send`, then it is resumed and timed until its queue is empty: its own pace, with the
      sender not competing for the two cores;
    - flood: `senseflow send --rate 0` while the receiver reads; a receiver faster than
      the sender is only measured at the sender's pace ("sender_bound": no kernel drops).
    """
    counter = ceilings.UdpCounter(RECEIVE_BUFFER)
    runs: dict[str, list[dict[str, Any]]] = {"socket": [], "receiver": []}
    ratios: dict[str, list[float]] = {"drain": [], "flood": []}
    try:
        with endtoend.running(
            bench,
            "discard",
            1,
            pipeline={"receiveBuffer": RECEIVE_BUFFER},
        ) as service:
            reader = service.processes.pids()["reader-0"]
            for repeat in range(scale.repeats):
                order = ("socket", "receiver") if repeat % 2 == 0 else ("receiver", "socket")
                result: dict[str, dict[str, Any]] = {}
                for which in order:
                    if which == "socket":
                        result[which] = {
                            "drain": prefill_and_time(
                                counter.port, counter.process.pid, scale.prefill
                            ).as_dict(),
                            "flood": flood_and_time(counter.port, scale.flood).as_dict(),
                        }
                    else:
                        result[which] = {
                            "drain": receiver_window(
                                service, prefill_and_time, service.port, reader, scale.prefill
                            ),
                            "flood": receiver_window(
                                service, flood_and_time, service.port, scale.flood
                            ),
                        }
                    runs[which].append(result[which])
                for method, values in ratios.items():
                    values.append(
                        result["receiver"][method]["queued_rate"] / result["socket"][method]["rate"]
                    )
                for method, values in ratios.items():
                    log(
                        f"{method}: socket ceiling {result['socket'][method]['rate']:,.0f}/s, "
                        f"receiver alone {result['receiver'][method]['queued_rate']:,.0f}/s "
                        f"(ratio {values[-1]:.2f})"
                    )
    finally:
        counted = counter.stop()
    return {
        "socket": {
            "runs": runs["socket"],
            "rate": median([r["drain"]["rate"] for r in runs["socket"]]),
            "flood_rate": median([r["flood"]["rate"] for r in runs["socket"]]),
            "counted_by_loop": counted,
            "receive_buffer": RECEIVE_BUFFER,
        },
        "receiver": {
            "runs": runs["receiver"],
            "rate": median([r["drain"]["queued_rate"] for r in runs["receiver"]]),
            "flood_rate": median([r["flood"]["queued_rate"] for r in runs["receiver"]]),
            "workers": 1,
            "ratio_to_socket": round(statistics.median(ratios["drain"]), 3),
            "flood_ratio_to_socket": round(statistics.median(ratios["flood"]), 3),
        },
    }


def receiver_window(
    service: RunningService, method: Callable[..., Any], *args: Any
) -> dict[str, Any]:
    """A drain or flood into senseflow, with what its counters say about it."""
    before = service.settle()
    window = method(*args)
    after = service.settle()
    queue_full = after.get("dropped.queue_full", 0) - before.get("dropped.queue_full", 0)
    result: dict[str, Any] = window.as_dict()
    result.update(
        {
            "received": after.get("received", 0) - before.get("received", 0),
            "discarded_by_workers": after.get("events", 0) - before.get("events", 0),
            "dropped_queue_full": queue_full,
            "queued_rate": round((window.read - queue_full) / window.seconds, 1),
        }
    )
    return result


class TrialRunner:
    """Trials on one service of a mode; a service stuck behind its backlog is replaced."""

    def __init__(self, bench: Bench, mode: str, workers: int) -> None:
        self.bench, self.mode, self.workers = bench, mode, workers
        self.service = RunningService(bench, mode, workers)

    def trial(self, rate: float) -> Trial:
        try:
            return endtoend.run_trial(self.service, rate, self.bench.duration)
        except TimeoutError:
            self.service.close()
            self.service = RunningService(self.bench, self.mode, self.workers)
            return endtoend.run_trial(self.service, rate, self.bench.duration)

    def close(self) -> None:
        self.service.close()


def measure_mode(
    bench: Bench,
    scale: Scale,
    mode: str,
    workers: int,
    material: Material,
    quick: bool,
    overload: bool,
    hint: float = 0.0,
) -> dict[str, Any]:
    """The search, then CPU at 10,000/s (and the overload). `hint`: the highest rate found
    with another workers count; the search starts there in small steps."""
    before = adjacent_ceilings(bench, mode, material)
    ceiling = min(before.values())
    log(f"{mode}, workers={workers}: ceilings just before the search {before}")
    runner = TrialRunner(bench, mode, workers)
    try:
        start, step = search_start(quick, ceiling, hint, scale.precision)
        found = search(
            runner.trial, start, ceiling * 1.2, scale.precision, scale.max_trials, log, step
        )
        best, trials = found.lo, found.trials
        log(
            f"== {mode}, workers={workers}: highest steady zero-loss rate {best:,.0f}/s "
            f"(failed at {found.hi}; precision {found.precision}, stopped: {found.stopped})"
        )
        after = adjacent_ceilings(bench, mode, material)
        log(f"{mode}, workers={workers}: ceilings just after the search {after}")
        at_10k = runner.trial(CPU_RATE)
        log(f"   at {CPU_RATE:,.0f}/s: {at_10k.describe()}")
        result: dict[str, Any] = {
            "max_zero_loss_rate": best,
            "search": found.as_dict(),
            "trials": [t.as_dict() for t in trials],
            "at_10k": at_10k.as_dict(),
            "adjacent_ceilings": {
                "before": before,
                "after": after,
                **{k: round((before[k] + after[k]) / 2, 1) for k in before},
            },
        }
        if overload and best:
            seconds = scale.overload_seconds
            log(f"overload: {2 * best:,.0f}/s for {seconds:g} s, {mode}, workers={workers}")
            result["overload"] = endtoend.run_overload(
                runner.service, 2 * best, seconds, drain_timeout=60 if quick else 300
            )
            result["overload"]["workers"] = workers
            log(
                f"overload checks: {result['overload']['checks']}, RSS growth "
                f"{result['overload']['rss_growth_pct']} %"
            )
        return result
    finally:
        runner.close()


def search_start(quick: bool, ceiling: float, hint: float, precision: float) -> tuple[float, float]:
    """(first rate, step factor) of a search: from another workers count's result in steps
    of 2x the precision (a bracket in two trials when it is close), else from half the
    ceiling in steps of 25 % (the end-to-end rates were 0.4-0.6 of it)."""
    if hint:
        return hint, 1 + 2 * precision
    return (5_000.0, 2.0) if quick else (ceiling * 0.5, 1.25)


def measure_latency(
    bench: Bench, scale: Scale, workers: int, max_rate: float, hogs: int = 0
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The latency steps; with `hogs`, the 10,000/s step once more with that many CPU hogs
    running (the loaded-machine figure)."""
    rates = sorted({*FIXED_RATES, round_rate(max_rate / 2)} if max_rate else set(FIXED_RATES))
    proxy_port = free_ports(1)[0]
    steps = []
    with ExitStack() as stack:
        proxy = influx_proxy(
            proxy_port, bench.influx.url, bench.workdir / f"influx-acks-w{workers}.bin"
        )
        stack.callback(proxy.stop)
        sub = mqtt_subscriber(
            bench.broker.port,
            endtoend.EVERYTHING_TOPIC,
            bench.workdir / f"mqtt-arrivals-w{workers}.bin",
        )
        stack.callback(sub.stop)
        service = stack.enter_context(
            endtoend.running(
                bench, "influx+mqtt", workers, influx_port=proxy_port, count_mqtt=False
            )
        )
        for rate in rates:
            try:
                step = endtoend.run_step(
                    service, rate, {"influxdb": proxy, "mqtt": sub}, scale.warmup
                )
            except TimeoutError as exc:  # the service never caught up: no use going on
                log(f"latency workers={workers} {rate:,.0f}/s: {exc}")
                steps.append({"rate": rate, "workers": workers, "error": str(exc)})
                break
            log(
                f"latency workers={workers} {rate:,.0f}/s: influx {step.influx_latency_ms}, "
                f"mqtt {step.mqtt_latency_ms}, cpu {step.cpu_us_per_event_total} µs/event, "
                f"rss {step.peak_total_rss_mb} MB"
            )
            steps.append({**step.__dict__, "workers": workers})
        loaded = None
        if hogs and all("error" not in s for s in steps):
            with Hogs(hogs):
                step = endtoend.run_step(
                    service, CPU_RATE, {"influxdb": proxy, "mqtt": sub}, scale.warmup
                )
            log(
                f"latency workers={workers} {CPU_RATE:,.0f}/s with {hogs} CPU hogs: influx "
                f"{step.influx_latency_ms}, mqtt {step.mqtt_latency_ms}"
            )
            loaded = {**step.__dict__, "workers": workers, "hogs": hogs}
    return steps, loaded


# -- the run ----------------------------------------------------------------------------------


def run_suite(
    args: argparse.Namespace, scale: Scale, save: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """Every phase in order; `save` gets the results so far after each one. A phase that
    fails is logged and recorded under `errors`, and the others still run."""
    started = time.monotonic()
    results: dict[str, Any] = {"meta": meta(args, scale), "errors": []}
    with tempfile.TemporaryDirectory(prefix="senseflow-suite-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        influx, broker = stack.enter_context(bench_servers(workdir, log))
        pool = make_corpus(scale.pool, seed=1)
        bench = Bench(workdir, influx, broker, pool, scale.duration, scale.drain_limit)
        if args.hog and args.hog_scope == "all":
            hogs = stack.enter_context(Hogs(args.hog))
            log(f"{args.hog} CPU hogs running for the whole run: pids {hogs.pids}")
        if not args.growth_only:
            run_main_phases(args, scale, bench, results, save)
        growth_scale = scale.growth
        if growth_scale is not None and not args.skip_growth:
            growth = phase(
                results, save, "growth", lambda: measure_growth(bench, growth_scale, log)
            )
            if growth is not None:
                results["growth"] = growth
    results["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    if "ceilings" in results:
        results["ratios"] = report.ratios(results)
        results["targets"] = report.targets(results)
    results["meta"]["complete"] = not results["errors"]
    return results


def run_main_phases(
    args: argparse.Namespace,
    scale: Scale,
    bench: Bench,
    results: dict[str, Any],
    save: Callable[[dict[str, Any]], None],
) -> None:
    """Ceilings, the receiver alone, then end to end and latency for each workers count."""
    material = Material.build(bench, scale.sink_points)
    results["ceilings"] = measure_ceilings(bench, scale, material)
    receiver = measure_receiver(bench, scale)
    results["ceilings"]["socket"] = receiver["socket"]
    results["receiver_alone"] = receiver["receiver"]
    save(results)
    results["end_to_end"] = {"influx": {}, "influx+mqtt": {}}
    results["latency"] = {}
    if args.hog and args.hog_scope == "latency":
        results["latency_loaded"] = {}
    for workers in scale.workers:
        run_workers(bench, scale, args, workers, material, results, save)


def phase(
    results: dict[str, Any],
    save: Callable[[dict[str, Any]], None],
    name: str,
    run: Callable[[], Any],
) -> Any:
    """`run()`, or None when it raised: logged, recorded under `errors`; saved either way."""
    try:
        return run()
    except Exception as exc:  # recorded, and the suite goes on with the next phase
        log(f"{name} failed: {traceback.format_exc()}")
        results["errors"].append({"phase": name, "error": repr(exc)})
        return None
    finally:
        save(results)


def run_workers(
    bench: Bench,
    scale: Scale,
    args: argparse.Namespace,
    workers: int,
    material: Material,
    results: dict[str, Any],
    save: Callable[[dict[str, Any]], None],
) -> None:
    """The end-to-end phases for one --workers value (and the overload, for the default)."""
    overload = workers == (
        DEFAULT_WORKERS if DEFAULT_WORKERS in scale.workers else scale.workers[-1]
    )
    e2e, key = results["end_to_end"], str(workers)

    def hint(mode: str) -> float:
        """The highest rate of the workers count measured just before, if any."""
        found = [r["max_zero_loss_rate"] for r in e2e[mode].values()]
        return found[-1] if found else 0.0

    influx = phase(
        results,
        save,
        f"influx w{workers}",
        lambda: measure_mode(
            bench, scale, "influx", workers, material, args.quick, False, hint("influx")
        ),
    )
    if influx is not None:
        e2e["influx"][key] = influx
    combined = phase(
        results,
        save,
        f"influx+mqtt w{workers}",
        lambda: measure_mode(
            bench,
            scale,
            "influx+mqtt",
            workers,
            material,
            args.quick,
            overload,
            hint("influx+mqtt"),
        ),
    )
    if combined is not None:
        if "overload" in combined:
            results["overload"] = combined.pop("overload")
        e2e["influx+mqtt"][key] = combined
    best = combined["max_zero_loss_rate"] if combined else 0.0
    hogs = args.hog if args.hog_scope == "latency" else 0
    latency = phase(
        results,
        save,
        f"latency w{workers}",
        lambda: measure_latency(bench, scale, workers, best, hogs),
    )
    if latency is not None:
        steps, loaded = latency
        results["latency"][key] = steps
        if loaded is not None:
            results["latency_loaded"][key] = loaded


def meta(args: argparse.Namespace, scale: Scale) -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.orig_argv),
        "mode": "quick" if args.quick else "full",
        "scale": scale.__dict__,
        "hog": {"processes": args.hog, "scope": args.hog_scope if args.hog else None},
        "machine": machine(),
        "servers": server_versions(),
        "commit": git(["rev-parse", "--short", "HEAD"]),
        "local_changes": bool(git(["status", "--porcelain", "--untracked-files=no"])),
    }


def server_versions() -> dict[str, str]:
    def first_line(command: list[str]) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=10)
        except OSError:
            return "not found"
        return (
            (done.stdout or done.stderr).strip().splitlines()[0]
            if (done.stdout or done.stderr)
            else ""
        )

    return {
        "influxd": first_line(["influxd", "version"]),
        "mosquitto": first_line(["mosquitto", "-h"]),
    }


def git(arguments: list[str]) -> str:
    try:
        return subprocess.run(
            ["git", *arguments], capture_output=True, text=True, cwd=REPO, timeout=10
        ).stdout.strip()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.suite",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="seconds-scale run that checks the harness"
    )
    size.add_argument("--full", action="store_true", help="the full measurement (default)")
    parser.add_argument(
        "--workers", type=int, nargs="+", help="worker counts (quick: 1; full: 1 2 4)"
    )
    parser.add_argument("--duration", type=float, help="seconds of sending per trial and step")
    parser.add_argument("--repeats", type=int, help="repeats of each ceiling")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "out",
        help="where the JSON and the Markdown table go (default benchmarks/out)",
    )
    parser.add_argument(
        "--plots",
        type=Path,
        help="where the PNG plots go (default: benchmarks/ for --full, --out for --quick)",
    )
    parser.add_argument("--name", help="file name stem (default suite-quick / suite-full)")
    parser.add_argument(
        "--hog",
        type=int,
        default=0,
        metavar="N",
        help="N CPU-burning processes (busy loops) for a loaded machine; see --hog-scope",
    )
    parser.add_argument(
        "--hog-scope",
        choices=("latency", "all"),
        default="latency",
        help="latency (default): an extra 10,000/s latency step per workers count with the "
        "hogs running; all: the hogs run for the whole suite",
    )
    growth_choice = parser.add_mutually_exclusive_group()
    growth_choice.add_argument(
        "--skip-growth", action="store_true", help="leave out the cost-growth phase"
    )
    growth_choice.add_argument(
        "--growth-only",
        action="store_true",
        help="only the cost-growth phase (benchmarks/growth.py) with the suite's servers",
    )
    args = parser.parse_args(argv)
    if args.hog < 0:
        parser.error("--hog must be >= 0")
    scale = QUICK if args.quick else FULL
    overrides = {
        k: v
        for k, v in (
            ("workers", tuple(args.workers or ())),
            ("duration", args.duration),
            ("repeats", args.repeats),
        )
        if v
    }
    scale = Scale(**{**scale.__dict__, **overrides})
    stem = "growth" if args.growth_only else "suite"
    name = args.name or (f"{stem}-quick" if args.quick else f"{stem}-full")
    plots = args.plots or (args.out if args.quick else REPO / "benchmarks")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{name}.json"

    def save(partial: dict[str, Any]) -> None:
        json_path.write_bytes(orjson.dumps(partial, option=orjson.OPT_INDENT_2))

    # SIGTERM (a test's timeout, a CI job cancelled) unwinds like Ctrl-C: every server and
    # service the suite started is stopped on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results = run_suite(args, scale, save)
    save(results)
    prefix = "" if plots != args.out else f"{name}-"
    if args.growth_only:
        results["meta"]["plots"] = (
            [growth_plot(results["growth"], plots / (f"{name}.png" if prefix else "growth.png"))]
            if "growth" in results
            else []
        )
        markdown = growth_markdown(results["growth"]) + "\n" if "growth" in results else ""
    else:
        results["meta"]["plots"] = report.plot(results, plots, prefix=prefix)
        markdown = report.markdown(results)
    save(results)
    (args.out / f"{name}.md").write_text(markdown)
    print(markdown)
    log(f"wrote {json_path}, {args.out / f'{name}.md'} and {', '.join(results['meta']['plots'])}")
    return 0 if results["meta"]["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
