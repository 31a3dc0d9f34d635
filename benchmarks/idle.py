"""Idle cost and memory of a running service: CPU over a quiet window, RSS and PSS per process.

    python -m benchmarks.idle                 # 20 s idle window, InfluxDB as destination
    python -m benchmarks.idle --seconds 10 --workers 4 --rss
    python -m benchmarks.idle --seconds 10 --rate 10000    # CPU per event at a steady rate

Starts a local influxd and `senseflow run` (this tree), waits until it runs and has settled,
then reads utime+stime of every process in the service's group (/proc/<pid>/stat) before and
after a window with no traffic. `--rss` adds VmRSS and Pss (/proc/<pid>/smaps_rollup) per
process: Pss splits pages shared between processes (copy-on-write after a fork), so the sum
of Pss is what the service really takes. Figures are indicative on a shared machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from benchmarks.procs import Sender, ServiceProcesses, cpu_delta
from tests.e2e.harness import Service, udp_port, write_config
from tests.localservers import InfluxServer

SETTLE_SECONDS = 3.0
DRAIN_SECONDS = 2.0


def status_kb(pid: int, path: str, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def memory(processes: ServiceProcesses) -> dict[str, dict[str, float]]:
    """name -> {rss_mb, pss_mb, private_mb} of every process of the service."""
    table: dict[str, dict[str, float]] = {}
    for name, pid in processes.pids().items():
        rss = status_kb(pid, "status", "VmRSS:")
        pss = status_kb(pid, "smaps_rollup", "Pss:")
        private = sum(
            status_kb(pid, "smaps_rollup", key) or 0 for key in ("Private_Clean:", "Private_Dirty:")
        )
        if rss is not None:
            table[name] = {
                "rss_mb": round(rss / 1024, 1),
                "pss_mb": round((pss or 0) / 1024, 1),
                "private_mb": round(private / 1024, 1),  # what this process alone costs
            }
    return table


def measure(
    seconds: float, flags: list[str], with_memory: bool, start_method: str | None, rate: int = 0
) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp, InfluxServer() as influx:
        influx.create_database("idle")
        port = udp_port()
        # Only when asked for (else the tree's default): a tree from before the key would
        # refuse it (A/B runs).
        own: dict[str, Any] = {"startMethod": start_method} if start_method else {}
        config = write_config(Path(tmp) / "idle.yaml", port, influx, "idle", **own)
        service = Service(config, Path(tmp) / "service.log", *flags)
        try:
            service.wait_running(60)
            time.sleep(SETTLE_SECONDS)
            processes = ServiceProcesses(service)
            before = processes.cpu()
            sender = Sender(port, rate, int(rate * seconds)) if rate else None
            sent = 0
            if sender is None:
                time.sleep(seconds)
            else:  # from the start of sending to a little after its end: all of its work
                sent = sender.wait(seconds + 60).sent
                time.sleep(DRAIN_SECONDS)
            per_process = cpu_delta(before, processes.cpu())
            result: dict[str, object] = {
                "seconds": seconds,
                "flags": flags,
                "start_method": start_method or "default",
                "cpu_s": per_process,
                "total_cpu_s": round(sum(per_process.values()), 3),
                "percent_of_a_core": round(100 * sum(per_process.values()) / seconds, 2),
            }
            if sender is not None:
                result["sent"] = sent
                result["cpu_us_per_event"] = round(sum(per_process.values()) / sent * 1e6, 2)
            if with_memory:
                table = memory(processes)
                result["memory"] = table
                result["total_rss_mb"] = round(sum(m["rss_mb"] for m in table.values()), 1)
                result["total_pss_mb"] = round(sum(m["pss_mb"] for m in table.values()), 1)
            return result
        finally:
            service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--readers", type=int, default=None)
    parser.add_argument("--rss", action="store_true", help="RSS and PSS per process too")
    parser.add_argument("--rate", type=int, default=0, help="events/s sent in the window")
    parser.add_argument(
        "--start-method", choices=("spawn", "forkserver"), help="default: the tree's default"
    )
    args = parser.parse_args()
    flags: list[str] = []
    if args.workers is not None:
        flags += ["--workers", str(args.workers)]
    if args.readers is not None:
        flags += ["--readers", str(args.readers)]
    result = measure(args.seconds, flags, args.rss, args.start_method, args.rate)
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
