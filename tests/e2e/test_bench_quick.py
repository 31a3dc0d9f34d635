"""`benchmarks/suite.py --quick` keeps working: it runs every phase for a few seconds and
produces complete, well-formed results. Nothing here looks at how fast anything was."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from benchmarks import report
from tests.e2e.harness import REPO

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    suite = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.suite", "--quick", "--out", str(out), "--name", "quick"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = suite.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        suite.terminate()  # SIGTERM: the suite stops the servers and services it started
        output, _ = suite.communicate(timeout=180)
        pytest.fail(f"the quick suite took over 10 minutes:\n{output[-4000:]}")
    assert suite.returncode == 0, output[-8000:]
    return out, orjson.loads((out / "quick.json").read_bytes())


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and value > 0


def test_every_section_is_there(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = quick_run
    assert {
        "meta",
        "ceilings",
        "receiver_alone",
        "end_to_end",
        "latency",
        "overload",
        "ratios",
        "targets",
        "growth",
    } <= results.keys()
    assert results["errors"] == []
    meta = results["meta"]
    assert meta["complete"] is True
    assert meta["mode"] == "quick" and "--quick" in meta["command"]
    assert meta["machine"]["nproc"] >= 1 and meta["servers"]["influxd"] and meta["date"]


def test_ceilings_are_measured(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = quick_run
    ceilings = results["ceilings"]
    assert positive(ceilings["socket"]["rate"])
    assert ceilings["socket"]["counted_by_loop"] == sum(
        run[method]["read"] for run in ceilings["socket"]["runs"] for method in ("drain", "flood")
    )
    assert positive(ceilings["sink"]["rate"])
    assert set(ceilings["sink"]["rates"]) == {"serial", "concurrent_2"}
    broker = ceilings["broker"]
    assert set(broker["rates"]) == {
        "senseflow",
        "aiomqtt_awaited",
        "aiomqtt_100_in_flight",
        "paho_window_2000",
    }
    for runs in broker["runs"].values():
        for run in runs:  # every published message reached the subscriber
            assert run["subscriber_received"] == run["messages"] and positive(run["rate"])
    assert positive(results["receiver_alone"]["rate"])
    assert positive(results["receiver_alone"]["ratio_to_socket"])
    assert positive(results["receiver_alone"]["flood_ratio_to_socket"])
    for run in results["receiver_alone"]["runs"]:  # discarding workers (benchmarks/discard.py)
        for method in ("drain", "flood"):
            counted = run[method]
            assert counted["received"] == counted["read"]
            assert (
                counted["discarded_by_workers"] == counted["read"] - counted["dropped_queue_full"]
            )


def test_end_to_end_trials_and_steps(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = quick_run
    for mode in ("influx", "influx+mqtt"):
        per_workers = results["end_to_end"][mode]
        assert per_workers, mode
        for result in per_workers.values():
            assert result["trials"] and result["at_10k"]["sent"] > 0
            for trial in result["trials"]:
                assert (
                    trial["sent"] > 0
                    and {"zero_loss", "steady", "passed", "cpu_us_per_event"} <= trial.keys()
                )
                assert trial["cpu_seconds"] and trial["peak_rss_mb"]
    for steps in results["latency"].values():
        rates = [s["rate"] for s in steps]
        assert {1_000.0, 10_000.0} <= set(rates) and rates == sorted(rates)
        for step in steps:
            assert step["sent"] > 0
            assert {"p50", "p99", "p99.9", "max", "count"} <= step["influx_latency_ms"].keys()
            assert {"p50", "p99", "p99.9", "max", "count"} <= step["mqtt_latency_ms"].keys()
            assert step["influx_latency_ms"]["p50"] <= step["influx_latency_ms"]["p99"]
            assert step["cpu_us_per_event"] and positive(step["peak_total_rss_mb"])
            assert {"supervisor", "reader-0", "worker-0", "writer"} <= step["peak_rss_mb"].keys()


def test_search_and_growth_are_reported(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = quick_run
    for per_workers in results["end_to_end"].values():
        for result in per_workers.values():
            search = result["search"]
            assert search["lo"] == result["max_zero_loss_rate"]
            assert search["trials"] == len(result["trials"]) <= search["budget"]
    growth = results["growth"]
    assert {(r["series"], r["rate"], r["users"]) for r in growth["rows"]} >= {
        ("rates", 100.0, 300),
        ("users", 10_000.0, 10),
    }
    for row in growth["rows"]:
        assert positive(row["cpu_us_per_event_total"]) and positive(row["pss_total_mb"])
    assert results["meta"]["hog"] == {"processes": 0, "scope": None}


def test_overload_is_accounted(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = quick_run
    overload = results["overload"]
    assert overload["sent"] > 0 and overload["rss_total_mb"]
    assert len(overload["checks"]) == 4 and all(
        isinstance(v, bool) for v in overload["checks"].values()
    )
    assert isinstance(overload["rss_flat"], bool)


def test_targets_markdown_plots_and_compare(quick_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = quick_run
    assert len(results["targets"]) == 15  # issue 15's 13 rows, then the 2 overload checks
    assert all(t["met"] in (True, False, None) and t["measured"] for t in results["targets"])
    markdown = (out / "quick.md").read_text()
    for heading in (
        "**Ceilings**",
        "**Receiver alone**",
        "**End to end**",
        "**Latency steps**",
        "**Overload**",
        "**Targets**",
        "**Cost growth**",
        "Plots: ",
    ):
        assert heading in markdown
    plots = [Path(p) for p in results["meta"]["plots"]]
    assert {p.name for p in plots} == {
        "quick-throughput-vs-workers.png",
        "quick-latency-vs-rate.png",
        "quick-overload-rss.png",
        "quick-growth.png",
    }
    assert all(p.parent == out and p.read_bytes().startswith(PNG_MAGIC) for p in plots)
    compared = report.compare(results, results)
    assert "receiver_over_socket" in compared and "+0.0 %" in compared
