"""The benchmark suite's tables: issue 15's targets (benchmarks/targets.py via
benchmarks/report.py) and the cost-growth table (benchmarks/growth.py, growthreport.py),
built from made-up results; and the CPU hogs start and stop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.growth import by_role, summarize
from benchmarks.growthreport import HEADER, markdown, table_rows
from benchmarks.hog import Hogs
from benchmarks.targets import judge, workers_ratio


def trial(rate: float, cpu: float, passed: bool = True) -> dict[str, Any]:
    return {"rate": rate, "passed": passed, "cpu_us_per_event": cpu}


def mode_result(
    best: float, cpu_10k: float, cpu_max: float, ceilings: dict[str, float]
) -> dict[str, Any]:
    return {
        "max_zero_loss_rate": best,
        "trials": [trial(best * 1.05, 9.0, False), trial(best, cpu_max)],
        "at_10k": {"cpu_us_per_event": cpu_10k},
        "adjacent_ceilings": ceilings,
    }


def step(rate: float, influx_p99: float, mqtt_p99: float, rss: float, pss: float) -> dict[str, Any]:
    return {
        "rate": rate,
        "influx_latency_ms": {"p99": influx_p99},
        "mqtt_latency_ms": {"p99": mqtt_p99},
        "peak_total_rss_mb": rss,
        "pss_mb_total": pss,
    }


def results(
    hog: dict[str, Any] | None = None, loaded: dict[str, Any] | None = None
) -> dict[str, Any]:
    sink = {"sink": 100_000.0}
    both = {"sink": 100_000.0, "broker": 40_000.0}
    return {
        "meta": {"hog": hog or {"processes": 0, "scope": None}},
        "ceilings": {
            "sink": {"rate": 100_000.0, "rates": {"serial": 80_000.0, "concurrent_2": 100_000.0}},
            "broker": {"rate": 40_000.0, "rates": {"senseflow": 40_000.0}},
        },
        "receiver_alone": {"ratio_to_socket": 0.93, "flood_ratio_to_socket": 1.0},
        "end_to_end": {
            "influx": {
                "1": mode_result(45_000, 27.0, 16.0, sink),
                "2": mode_result(64_000, 9.5, 5.5, sink),
            },
            "influx+mqtt": {
                "1": mode_result(25_000, 40.0, 30.0, both),
                "2": mode_result(22_000, 19.0, 15.0, both),
            },
        },
        "latency": {
            "1": [
                step(1_000.0, 90.0, 5.0, 190.0, 150.0),
                step(10_000.0, 300.0, 60.0, 190.0, 150.0),
            ],
            "2": [
                step(1_000.0, 120.0, 5.0, 260.0, 190.0),
                step(10_000.0, 240.0, 45.0, 260.0, 190.0),
            ],
        },
        "latency_loaded": loaded or {},
    }


def by_target(found: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["target"]: row for row in found}


def test_every_target_of_issue_15_is_listed_with_its_verdict_at_the_default_workers() -> None:
    rows = by_target(report.targets(results()))
    expected = {
        "CPU per event, all senseflow processes, InfluxDB only, at 10,000/s": True,
        "the same at the highest zero-loss rate": True,
        "CPU per event with MQTT QoS 1 too, at 10,000/s": True,
        "e2e zero loss into InfluxDB / InfluxDB's ceiling": True,  # 0.64 with 2 workers
        "e2e zero loss with MQTT / the broker's ceiling": False,  # 0.55
        "reader alone / bare uvloop loop (drain)": True,
        "p99 receive -> InfluxDB ack at 10,000/s": True,
        "p99 receive -> InfluxDB ack at 1,000/s": False,
        "p99 receive -> MQTT at 10,000/s": True,
        "p99 receive -> MQTT at 10,000/s on a loaded machine (0 CPU hogs)": None,
        "total RSS at 10,000/s, default workers: sum of RSS (peak)": False,
        "total RSS at 10,000/s, default workers: sum of PSS": True,
        "more workers never a trap: max rate with 2 workers / with 1": False,  # MQTT 0.88
    }
    assert {name: row["met"] for name, row in rows.items()} == expected
    assert (
        rows["CPU per event, all senseflow processes, InfluxDB only, at 10,000/s"]["measured"]
        == "w1: 27.0 µs, w2: 9.5 µs"
    )
    trap = rows["more workers never a trap: max rate with 2 workers / with 1"]["measured"]
    assert trap == "influx: 1.42 (64,000 / 45,000/s), influx+mqtt: 0.88 (22,000 / 25,000/s)"
    assert rows["total RSS at 10,000/s, default workers: sum of PSS"]["measured"] == (
        "w1: 150 MB, w2: 190 MB"
    )
    assert (
        "run with --hog N"
        in rows["p99 receive -> MQTT at 10,000/s on a loaded machine (0 CPU hogs)"]["measured"]
    )


def test_the_loaded_step_is_judged_when_hogs_ran() -> None:
    loaded = {"2": step(10_000.0, 400.0, 70.0, 260.0, 190.0)}
    rows = by_target(report.targets(results({"processes": 2, "scope": "latency"}, loaded)))
    row = rows["p99 receive -> MQTT at 10,000/s on a loaded machine (2 CPU hogs)"]
    assert (row["met"], row["measured"]) == (False, "w2: 70.0 ms")


def test_the_workers_ratio_is_among_the_ratios() -> None:
    ratios = report.ratios(results())
    assert ratios["workers_2_over_1"] == {"influx": 1.422, "influx+mqtt": 0.88}


def test_judge_uses_the_default_workers_count_else_every_count() -> None:
    assert judge({"1": 30.0, "2": 9.0, "4": 30.0}, lambda v: v <= 10) is True
    assert judge({"1": 9.0, "4": 30.0}, lambda v: v <= 10) is False
    assert judge({"1": 9.0}, lambda v: v <= 10) is True
    assert judge({"2": None}, lambda v: v <= 10) is False
    assert judge({}, lambda v: v <= 10) is None
    assert workers_ratio({"1": 40_000.0, "2": 38_000.0}) == 0.95
    assert workers_ratio({"1": 40_000.0}) is None


def growth_step(
    cpu: dict[str, float], rss: float, pss: float, drained: bool = True
) -> dict[str, Any]:
    return {
        "cpu_us_per_event": cpu,
        "cpu_us_per_event_total": round(sum(cpu.values()), 2),
        "rss_total_mb": rss,
        "peak_total_rss_mb": rss + 5,
        "pss_total_mb": pss,
        "drain_seconds": 0.5 if drained else None,
    }


def test_per_process_figures_are_summed_by_role() -> None:
    assert by_role(
        {
            "supervisor": 1.0,
            "reader-0": 3.0,
            "worker-0": 4.0,
            "worker-1": 5.5,
            "writer": 6.0,
            "other-77": 0.5,
        }
    ) == {"supervisor": 1.0, "readers": 3.0, "workers": 9.5, "writer": 6.0, "other": 0.5}


def test_growth_rows_are_medians_of_the_repeats() -> None:
    steps = [
        growth_step({"worker-0": 10.0, "writer": 5.0}, 250.0, 180.0),
        growth_step({"worker-0": 14.0, "writer": 7.0}, 260.0, 190.0),
        growth_step({"worker-0": 12.0, "writer": 9.0}, 270.0, 200.0, drained=False),
    ]
    summary = summarize(steps)
    assert summary["cpu_us_per_event_total"] == 21.0
    assert summary["cpu_us_per_event_by_role"] == {"workers": 12.0, "writer": 7.0}
    assert (summary["rss_total_mb"], summary["peak_total_rss_mb"], summary["pss_total_mb"]) == (
        260.0,
        265.0,
        190.0,
    )
    assert summary["repeats"] == 3 and summary["drained"] is False
    assert summary["drain_seconds_max"] == 0.5


def test_the_growth_table_has_a_row_per_step_of_both_series() -> None:
    rows = [
        {
            "series": "rates",
            "rate": 100.0,
            "users": 300,
            **summarize([growth_step({"writer": 170.0, "reader-0": 30.0}, 240.0, 175.0)]),
        },
        {
            "series": "users",
            "rate": 10_000.0,
            "users": 100_000,
            **summarize([growth_step({"supervisor": 9.0, "other-5": 1.0}, 400.0, 330.0)]),
        },
    ]
    growth = {
        "mode": "influx",
        "workers": 2,
        "scale": {"duration": 15.0, "repeats": 2},
        "rows": rows,
        "hog": 1,
    }
    table = table_rows(growth)
    assert len(HEADER) == len(table[0]) == len(table[1])
    assert table[0] == [
        "rates",
        "100",
        "300",
        "200.0",
        "30.0",
        "0.0",
        "170.0",
        "0.0",
        "0.0",
        "240 / 245",
        "175",
        "0.5",
    ]
    assert table[1][:3] == ["users", "10,000", "100,000"] and table[1][7:9] == ["9.0", "1.0"]
    text = markdown(growth)
    assert "1 CPU hog(s) running" in text and text.count("\n| ") == 3


def test_hogs_run_inside_the_block_and_are_gone_after_it() -> None:
    with Hogs(2) as hogs:
        pids = hogs.pids
        assert len(pids) == 2 and all(Path(f"/proc/{pid}").exists() for pid in pids)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    with Hogs(0) as none:
        assert none.pids == []
