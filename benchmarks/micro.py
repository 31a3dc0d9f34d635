"""Micro-benchmark of a worker's CPU work: parse + enrich + encode, in µs per event.

Runs `EventPipeline.process_batch` on batches of 500 datagrams from `senseflow.commands.corpus`,
with InfluxDB, MQTT and New Relic all enabled, and times:

- `batch warm`: the whole hot path with a warm user-agent cache (the normal case);
- `batch warm, gc on`: the same with the cyclic GC left enabled, as in the real worker;
- `batch UA cache size 1`: `senseflow.uaCacheSize: 1`, the smallest the config accepts;
  an agent that follows itself still hits (the measured miss rate is printed);
- `batch UA cache off`: the parser's cache size forced to 0: every agent is parsed;
- the stages on their own: parse; parse + enrich; and each encoder on enriched events;
- `ua-parser uncached`: one uncached ua-parser call, per agent (not per event).

Method: every repeat runs every variant once, one after the other (round robin), so that
the noise of a shared machine hits them alike; each variant's figure is the median (and
min) over the repeats of total time / number of events. Ratios to `batch warm` are
computed within each repeat, then their median is taken. Unless stated otherwise the
cyclic GC is collected before and disabled during each timing (`timeit` does the same);
the `gc on` variant shows what that leaves out.

    python -m benchmarks.micro            # full run, about a minute
    python -m benchmarks.micro --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from senseflow.commands.corpus import USER_AGENTS, app_names, make_corpus
from shared.config import Config, config_from_document
from shared.events import RawBatch, UserEvent
from workers.parse import parse_datagram
from workers.pipeline import EventPipeline

BATCH_SIZE = 500
PACKAGES = ("msgspec", "orjson", "ua-parser", "ua-parser-rs", "ua-parser-builtins")
TARGET_US = 10.0


def make_config(ua_cache_size: int) -> Config:
    """InfluxDB, MQTT and New Relic all on, two configured tags, as an operator would."""
    document = {
        "Butler-SOS": {
            "userEvents": {
                "enable": True,
                "tags": [{"name": "env", "value": "PROD"}, {"name": "site", "value": "eu west"}],
                "sendToMQTT": {"enable": True},
                "sendToInfluxdb": {"enable": True},
                "sendToNewRelic": {
                    "enable": True,
                    "destinationAccount": ["Account A"],
                    "scramble": True,
                },
            },
            "influxdbConfig": {"enable": True, "version": 2},
            "mqttConfig": {"enable": True},
            "newRelic": {"enable": True},
            "thirdPartyToolsCredentials": {
                "newRelic": [
                    {
                        "accountName": "Account A",
                        "insertApiKey": "not-a-real-key",
                        "accountId": "1234567",
                    }
                ]
            },
        },
        "senseflow": {"uaCacheSize": ua_cache_size},
    }
    return config_from_document(document, {})


def make_batches(datagrams: list[bytes], start_ns: int, step_ns: int) -> list[RawBatch]:
    """Batches of BATCH_SIZE with strictly increasing receive times."""
    stamps = [start_ns + i * step_ns for i in range(len(datagrams))]
    return [
        RawBatch(datagrams[i : i + BATCH_SIZE], stamps[i : i + BATCH_SIZE])
        for i in range(0, len(datagrams), BATCH_SIZE)
    ]


def timed(run: Callable[[], object], gc_off: bool = True) -> tuple[int, int]:
    """(wall, CPU) nanoseconds of one call of `run`.

    Wall time is `perf_counter_ns`; CPU time is this thread's (`thread_time_ns`), which
    leaves out the time other processes held the core, the main noise on a shared machine.
    """
    gc.collect()
    if gc_off:
        gc.disable()
    try:
        cpu_start = time.thread_time_ns()
        start = time.perf_counter_ns()
        run()
        wall = time.perf_counter_ns() - start
        return wall, time.thread_time_ns() - cpu_start
    finally:
        gc.enable()


class Variant:
    def __init__(self, name: str, run: Callable[[], object], units: int, gc_off: bool = True):
        self.name = name
        self.run = run
        self.units = units  # events (or agents) per call of `run`
        self.gc_off = gc_off
        self.samples_us: list[float] = []  # wall time per unit
        self.cpu_samples_us: list[float] = []  # CPU time per unit

    def measure(self) -> None:
        wall, cpu = timed(self.run, self.gc_off)
        self.samples_us.append(wall / self.units / 1000)
        self.cpu_samples_us.append(cpu / self.units / 1000)


def ua_miss_rate(pipeline: EventPipeline, batches: Sequence[RawBatch]) -> tuple[int, int]:
    """(uncached parses, agent lookups) of one pass, counted by wrapping the parser."""
    parser = pipeline.enricher.user_agents
    original = parser.parse_uncached
    lookups = 0
    misses = 0

    def counting_parse(agent: str) -> tuple[str, str, str, str]:
        nonlocal misses
        misses += 1
        return original(agent)

    parser.parse_uncached = counting_parse  # type: ignore[method-assign]
    try:
        for batch in batches:
            for data in batch.datagrams:
                event = parse_datagram(data, 1)
                if not isinstance(event, str) and "UserAgent:" in event.message:
                    lookups += 1
            pipeline.process_batch(batch)
    finally:
        del parser.parse_uncached
    return misses, lookups


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": versions,
    }


def build_variants(events: int, seed: int) -> tuple[list[Variant], dict[str, Any]]:
    datagrams = make_corpus(events, seed=seed)
    names = app_names()
    batches = make_batches(datagrams, time.time_ns(), 20_000)  # 50 000 events/s
    warm = EventPipeline(make_config(4096), names)
    cold = EventPipeline(make_config(1), names)
    # The smallest cache the config accepts is 1, which still hits when one agent follows
    # itself; a cache size of 0 (set behind the config's back) never stores: every miss.
    uncached = EventPipeline(make_config(1), names)
    uncached.enricher.user_agents._cache_size = 0
    no_sessions = EventPipeline(make_config(4096), names)
    no_sessions.to_sessions = False  # what live sessions (senseflow.sessions) add per event

    # Check the setup before timing anything.
    assert warm.to_influx and warm.to_mqtt and warm.to_newrelic, "a destination is off"
    for batch in batches:
        out = warm.process_batch(batch)  # also warms the UA and escape caches
        assert out.counters == {"events": len(batch.datagrams)}, out.counters
        assert out.lines.count(b"\n") == len(out.mqtt_payloads) == len(out.newrelic)
    misses, lookups = ua_miss_rate(cold, batches)
    all_misses, _ = ua_miss_rate(uncached, batches)
    assert all_misses == lookups, (all_misses, lookups)
    warm_misses, _ = ua_miss_rate(warm, batches)

    stamps = [ns for batch in batches for ns in batch.received_ns]
    pairs = list(zip(datagrams, stamps, strict=True))
    enriched: list[UserEvent] = []
    for data, ns in pairs:
        event = warm.event_or_reason(data, ns)
        assert isinstance(event, UserEvent)
        enriched.append(event)
    encoder = warm.encoder
    ua_parser = warm.enricher.user_agents

    def batches_with(pipeline: EventPipeline) -> Callable[[], object]:
        process = pipeline.process_batch
        return lambda: [process(batch) for batch in batches]

    def parse_only() -> object:
        return [parse_datagram(data, ns) for data, ns in pairs]

    def parse_enrich() -> object:
        step = warm.event_or_reason
        return [step(data, ns) for data, ns in pairs]

    def encode_with(method: Callable[[UserEvent], object]) -> Callable[[], object]:
        return lambda: [method(event) for event in enriched]

    def ua_uncached() -> object:
        parse = ua_parser.parse_uncached
        return [parse(agent) for agent in USER_AGENTS]

    variants = [
        Variant("batch warm", batches_with(warm), events),
        Variant("batch warm, gc on", batches_with(warm), events, gc_off=False),
        Variant("batch warm, sessions off", batches_with(no_sessions), events),
        Variant("batch UA cache size 1", batches_with(cold), events),
        Variant("batch UA cache off", batches_with(uncached), events),
        Variant("parse", parse_only, events),
        Variant("parse + enrich (warm)", parse_enrich, events),
        Variant("encode line protocol", encode_with(encoder.line), events),
        Variant("encode MQTT JSON", encode_with(encoder.mqtt), events),
        Variant("encode New Relic JSON", encode_with(encoder.newrelic), events),
        Variant("ua-parser uncached, per agent", ua_uncached, len(USER_AGENTS)),
    ]
    info = {
        "events": events,
        "batches": len(batches),
        "batch_size": BATCH_SIZE,
        "events_with_agent": lookups,
        "no_cache_ua_parses": misses,
        "no_cache_miss_rate": misses / lookups if lookups else 0.0,
        "warm_ua_parses": warm_misses,
    }
    return variants, info


def summarize(variants: list[Variant]) -> list[dict[str, Any]]:
    base = variants[0].samples_us
    cpu_base = variants[0].cpu_samples_us
    rows = []
    for variant in variants:
        samples, cpu = variant.samples_us, variant.cpu_samples_us
        ratios = [s / b for s, b in zip(samples, base, strict=True)]
        cpu_ratios = [s / b for s, b in zip(cpu, cpu_base, strict=True)]
        median = statistics.median(samples)
        rows.append(
            {
                "name": variant.name,
                "median_us": median,
                "min_us": min(samples),
                "max_us": max(samples),
                "cpu_median_us": statistics.median(cpu),
                "cpu_min_us": min(cpu),
                "ratio_to_warm": statistics.median(ratios),
                "cpu_ratio_to_warm": statistics.median(cpu_ratios),
                "events_per_s": 1e6 / median,
                "gc_disabled": variant.gc_off,
                "samples_us": samples,
                "cpu_samples_us": cpu,
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]], info: dict[str, Any], repeats: int) -> None:
    print(
        f"{info['events']} events in {info['batches']} batches of {info['batch_size']}, "
        f"{repeats} repeats (round robin); µs per event unless stated"
    )
    print(
        f"ua-parser calls per pass: {info['events_with_agent']} events carry an agent; "
        f"cache size 1: {info['no_cache_ua_parses']} calls "
        f"(miss rate {info['no_cache_miss_rate']:.1%}); cache off: "
        f"{info['events_with_agent']} (100%); warm: {info['warm_ua_parses']}"
    )
    print()
    print("wall = perf_counter_ns, cpu = thread_time_ns; × warm = median of per-repeat ratios")
    print()
    columns = ("wall med", "wall min", "wall max", "cpu med", "cpu min", "× warm")
    print(f"| {'variant':<31} | " + " | ".join(f"{c:>8}" for c in columns) + " |")
    print("|" + "-" * 33 + "|" + "|".join("-" * 10 for _ in columns) + "|")
    for row in rows:
        values = (
            row["median_us"],
            row["min_us"],
            row["max_us"],
            row["cpu_median_us"],
            row["cpu_min_us"],
            row["ratio_to_warm"],
        )
        print(f"| {row['name']:<31} | " + " | ".join(f"{v:8.2f}" for v in values) + " |")
    warm, cpu = rows[0]["median_us"], rows[0]["cpu_median_us"]
    verdict = "meets" if warm < TARGET_US else "misses"
    print()
    print(
        f"warm cache: {warm:.2f} µs/event wall ({cpu:.2f} µs CPU) = {1e6 / warm:,.0f} events/s "
        f"on one core; {verdict} the {TARGET_US:g} µs target"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Micro-benchmark of parse + enrich + encode (µs per event).",
        epilog="Figures are medians over repeats; all variants run round robin in one process.",
    )
    parser.add_argument("--events", type=int, default=20_000, help="datagrams (default 20000)")
    parser.add_argument("--repeats", type=int, default=21, help="repeats (default 21)")
    parser.add_argument("--quick", action="store_true", help="5000 events, 5 repeats")
    parser.add_argument("--seed", type=int, default=1, help="corpus seed (default 1)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--cpu", type=int, help="pin the process to this CPU")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.repeats = 5_000, 5
    if args.events < BATCH_SIZE or args.repeats < 1:
        parser.error(f"--events must be >= {BATCH_SIZE} and --repeats >= 1")
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})

    started = time.monotonic()
    variants, info = build_variants(args.events, args.seed)
    for _ in range(args.repeats):
        for variant in variants:
            variant.measure()
    rows = summarize(variants)
    elapsed = time.monotonic() - started
    print_table(rows, info, args.repeats)
    print(f"took {elapsed:.1f} s")

    if args.json:
        document = {
            "benchmark": "micro: parse + enrich + encode",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.orig_argv),
            "args": vars(args),
            "method": {
                "timer": "time.perf_counter_ns (wall); time.thread_time_ns (cpu)",
                "gc": "collected before, disabled during each timing, except 'gc on' variants",
                "order": "round robin: each repeat runs every variant once",
                "ratio": "median over repeats of variant / 'batch warm' in the same repeat",
            },
            "machine": machine(),
            "corpus": info,
            "results": rows,
            "elapsed_s": elapsed,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
