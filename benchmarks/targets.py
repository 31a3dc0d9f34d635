"""The targets of issue 15 (performance, round two): goal, measured, met, per run.

`met` is judged at the default `--workers` (2) when the run measured it, else over every
workers count it measured (a quick run has only 1); every count is listed in `measured`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

DEFAULT_WORKERS = "2"
WORKERS_RATIO_GOAL = 0.95


def judge(values: dict[str, float | None], ok: Callable[[float], bool]) -> bool | None:
    """Met at the default workers count, or at every count when it was not measured;
    None when nothing was measured."""
    if not values:
        return None
    chosen = [values[DEFAULT_WORKERS]] if DEFAULT_WORKERS in values else list(values.values())
    return all(v is not None and ok(v) for v in chosen)


def at_most(limit: float) -> Callable[[float], bool]:
    return lambda value: value <= limit


def at_least(goal: float) -> Callable[[float], bool]:
    return lambda value: value >= goal


def per_workers(values: dict[str, float | None], unit: str, digits: int = 1) -> str:
    return ", ".join(
        f"w{w}: {'—' if v is None else f'{v:,.{digits}f}'}{unit}" for w, v in values.items()
    )


def verdict(name: str, goal: str, met: bool | None, measured: str) -> dict[str, Any]:
    return {"target": name, "goal": goal, "met": met, "measured": measured or "not measured"}


def workers_ratio(best: dict[str, float]) -> float | None:
    """Highest zero-loss rate with 2 workers / with 1 (None unless both were measured)."""
    one, two = best.get("1"), best.get("2")
    return round(two / one, 3) if one and two is not None else None


def cpu_rows(e2e: dict[str, Any], cpu_at_max: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    influx: dict[str, float | None] = {
        w: m["at_10k"]["cpu_us_per_event"] for w, m in e2e.get("influx", {}).items()
    }
    rows.append(
        verdict(
            "CPU per event, all senseflow processes, InfluxDB only, at 10,000/s",
            "<= 10 µs",
            judge(influx, lambda v: v <= 10.0),
            per_workers(influx, " µs"),
        )
    )
    at_max: dict[str, float | None] = dict(cpu_at_max)
    rows.append(
        verdict(
            "the same at the highest zero-loss rate",
            "<= 6 µs",
            judge(at_max, lambda v: v <= 6.0),
            per_workers(at_max, " µs"),
        )
    )
    both: dict[str, float | None] = {
        w: m["at_10k"]["cpu_us_per_event"] for w, m in e2e.get("influx+mqtt", {}).items()
    }
    rows.append(
        verdict(
            "CPU per event with MQTT QoS 1 too, at 10,000/s",
            "<= 20 µs",
            judge(both, lambda v: v <= 20.0),
            per_workers(both, " µs"),
        )
    )
    return rows


def ratio_rows(ratios: dict[str, Any], best: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    rows = []
    for key, mode, name, goal in (
        (
            "e2e_influx_over_sink",
            "influx",
            "e2e zero loss into InfluxDB / InfluxDB's ceiling",
            0.60,
        ),
        (
            "e2e_influx_mqtt_over_broker",
            "influx+mqtt",
            "e2e zero loss with MQTT / the broker's ceiling",
            0.80,
        ),
    ):
        values: dict[str, float | None] = dict(ratios.get(key, {}))
        rates = best.get(mode, {})
        rows.append(
            verdict(
                name,
                f">= {goal:.2f}",
                judge(values, at_least(goal)),
                ", ".join(
                    f"w{w}: {v:.2f} ({rates.get(w, 0):,.0f}/s)"
                    for w, v in values.items()
                    if v is not None
                ),
            )
        )
    reader = ratios.get("receiver_over_socket")
    rows.append(
        verdict(
            "reader alone / bare uvloop loop (drain)",
            ">= 0.90",
            None if reader is None else reader >= 0.90,
            "" if reader is None else f"{reader:.2f}",
        )
    )
    return rows


def latency_rows(
    steps: dict[str, dict[int, dict[str, Any]]], loaded: dict[str, Any], hog: dict[str, Any]
) -> list[dict[str, Any]]:
    """`steps`: workers -> rate -> latency step; `loaded`: workers -> the 10,000/s step
    taken with `hog['processes']` CPU hogs running (`--hog N`)."""
    rows = []
    on_loaded = hog.get("scope") == "all" and hog.get("processes")
    for key, name, rate, limit in (
        ("influx_latency_ms", "p99 receive -> InfluxDB ack at 10,000/s", 10_000, 250.0),
        ("influx_latency_ms", "p99 receive -> InfluxDB ack at 1,000/s", 1_000, 100.0),
        ("mqtt_latency_ms", "p99 receive -> MQTT at 10,000/s", 10_000, 50.0),
    ):
        p99: dict[str, float | None] = {
            w: s[rate][key].get("p99") for w, s in steps.items() if rate in s
        }
        label = f"{name} (every step with {hog['processes']} CPU hogs)" if on_loaded else name
        rows.append(
            verdict(
                label,
                f"<= {limit:g} ms",
                judge(p99, at_most(limit)),
                per_workers(p99, " ms"),
            )
        )
    mqtt_loaded: dict[str, float | None] = {
        w: s["mqtt_latency_ms"].get("p99") for w, s in loaded.items()
    }
    rows.append(
        verdict(
            "p99 receive -> MQTT at 10,000/s on a loaded machine "
            f"({hog.get('processes', 0)} CPU hogs)",
            "<= 50 ms",
            judge(mqtt_loaded, lambda v: v <= 50.0),
            per_workers(mqtt_loaded, " ms")
            if mqtt_loaded
            else "every step already loaded (see above)"
            if on_loaded
            else "run with --hog N",
        )
    )
    return rows


def memory_rows(steps: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    at_10k = {w: s[10_000] for w, s in steps.items() if 10_000 in s}
    rss: dict[str, float | None] = {w: s["peak_total_rss_mb"] for w, s in at_10k.items()}
    pss: dict[str, float | None] = {w: s.get("pss_mb_total") for w, s in at_10k.items()}
    return [
        verdict(
            "total RSS at 10,000/s, default workers: sum of RSS (peak)",
            "<= 200 MB",
            judge(rss, lambda v: v <= 200.0),
            per_workers(rss, " MB", 0),
        ),
        verdict(
            "total RSS at 10,000/s, default workers: sum of PSS",
            "<= 200 MB",
            judge(pss, lambda v: v <= 200.0),
            per_workers(pss, " MB", 0),
        ),
    ]


def workers_rows(best: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    ratios = {mode: workers_ratio(rates) for mode, rates in best.items()}
    measured = {mode: r for mode, r in ratios.items() if r is not None}
    return [
        verdict(
            "more workers never a trap: max rate with 2 workers / with 1",
            f">= {WORKERS_RATIO_GOAL:.2f} in every run",
            all(r >= WORKERS_RATIO_GOAL for r in measured.values()) if measured else None,
            ", ".join(
                f"{mode}: {r:.2f} ({best[mode]['2']:,.0f} / {best[mode]['1']:,.0f}/s)"
                for mode, r in measured.items()
            ),
        )
    ]
