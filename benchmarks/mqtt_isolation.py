"""Does a stalled InfluxDB hold back MQTT in the writer's shared event loop?

    python -m benchmarks.mqtt_isolation              # ~25 s per scenario, 2 scenarios
    python -m benchmarks.mqtt_isolation --rate 8000 --seconds 10

Runs `senseflow run` with InfluxDB and MQTT (QoS 1) on, sends at `--rate` for `--seconds`,
and reads the MQTT receive -> acknowledgement latency histogram from /metrics. Scenario
`influx stalled` SIGSTOPs influxd for the middle third of the sending (every InfluxDB write
waits), scenario `steady` does not. If MQTT shares the loop badly, its p99 moves with the
stall. Percentiles are bucket upper bounds. Indicative on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from pathlib import Path

from benchmarks.procs import Sender
from shared.delivery import LATENCY_BUCKETS
from tests.e2e.harness import EVERYTHING_TOPIC_ONLY, Service, udp_port, write_config
from tests.e2e.observe import metrics_flags, scrape
from tests.localservers import InfluxServer, MosquittoServer


def quantile(port: int, destination: str, q: float) -> float:
    samples = scrape(port)
    name = "senseflow_delivery_latency_seconds_bucket"
    cumulative = [
        samples.get((name, frozenset({("destination", destination), ("le", f"{b:g}")})), 0.0)
        for b in LATENCY_BUCKETS
    ]
    total = samples.get(
        ("senseflow_delivery_latency_seconds_count", frozenset({("destination", destination)})),
        0.0,
    )
    for bound, count in zip(LATENCY_BUCKETS, cumulative, strict=True):
        if total and count >= q * total:
            return bound
    return float("inf")


def scenario(rate: int, seconds: float, stall: bool) -> dict[str, float]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        InfluxServer(Path(tmp) / "influxd") as influx,
        MosquittoServer(Path(tmp) / "mosquitto") as broker,
    ):
        influx.create_database("iso")
        metrics_port, metrics = metrics_flags()
        port = udp_port()
        config = write_config(
            Path(tmp) / "iso.yaml",
            port,
            influx,
            "iso",
            broker,
            butler_overrides=EVERYTHING_TOPIC_ONLY,
            **metrics,
        )
        service = Service(config, Path(tmp) / "service.log")
        try:
            service.wait_running(60)
            sender = Sender(port, rate, int(rate * seconds))
            if stall:
                assert influx.pid is not None
                time.sleep(seconds / 3)
                os.kill(influx.pid, signal.SIGSTOP)
                time.sleep(seconds / 3)
                os.kill(influx.pid, signal.SIGCONT)
            sender.wait(seconds + 60)
            time.sleep(3.0)
            return {
                "mqtt_p50_s": quantile(metrics_port, "mqtt", 0.5),
                "mqtt_p99_s": quantile(metrics_port, "mqtt", 0.99),
                "influxdb_p99_s": quantile(metrics_port, "influxdb", 0.99),
            }
        finally:
            service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=9.0)
    args = parser.parse_args()
    for stall in (False, True):
        figures = scenario(args.rate, args.seconds, stall)
        print("influx stalled" if stall else "steady        ", figures)


if __name__ == "__main__":
    main()
