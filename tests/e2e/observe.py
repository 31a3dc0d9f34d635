"""Helpers for tests of what the running service exposes: /metrics, /healthz, its stats."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from tests.localservers import InfluxServer, free_ports

T = TypeVar("T")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_flags() -> tuple[int, dict[str, Any]]:
    """A free port and the `senseflow:` keys that serve /metrics on it (loopback only)."""
    port = free_ports(1)[0]
    return port, {"metricsPort": port, "metricsHost": "127.0.0.1"}


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode("utf-8")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def health(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `check` until it returns something truthy; fail with `what` and its last value."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s (last: {result!r})")
        time.sleep(0.1)


def series_sum(influx: InfluxServer, database: str, query: str) -> float:
    """Sum of the first value column of every series a query returns (0 if none)."""
    result = influx.query(query, db=database)["results"][0]
    return sum(row[1] or 0 for series in result.get("series", []) for row in series["values"])
