"""Ratios, targets, the Markdown table, the plots and `compare` for benchmarks/suite.py.

python -m benchmarks.report compare OLD.json NEW.json   # ratio changes between runs
python -m benchmarks.report markdown RUN.json           # the table again
python -m benchmarks.report plot RUN.json --out DIR     # the plots again
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

RATE_10K = "10000.0"


def _best(e2e: dict[str, Any], mode: str) -> dict[str, float]:
    return {w: r["max_zero_loss_rate"] for w, r in e2e.get(mode, {}).items()}


def _over(e2e: dict[str, Any], mode: str, which: str, fallback: float) -> dict[str, float]:
    """Highest zero-loss rate per workers count / the `which` ceiling measured next to that
    search (the mean of just before and just after it), else the one at the start."""
    out = {}
    for w, result in e2e.get(mode, {}).items():
        ceiling = result.get("adjacent_ceilings", {}).get(which) or fallback
        out[w] = round(result["max_zero_loss_rate"] / ceiling, 3)
    return out


def _workers_ratio(best: dict[str, float]) -> float | None:
    from benchmarks.targets import workers_ratio

    return workers_ratio(best)


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Every machine-dependent figure as a ratio to a ceiling of the same run."""
    ceilings = results["ceilings"]
    sink, broker = ceilings["sink"]["rate"], ceilings["broker"]["rate"]
    e2e = results.get("end_to_end", {})
    return {
        "receiver_over_socket": results["receiver_alone"]["ratio_to_socket"],
        "receiver_over_socket_flood": results["receiver_alone"].get("flood_ratio_to_socket"),
        "e2e_influx_over_sink": _over(e2e, "influx", "sink", sink),
        "e2e_influx_mqtt_over_sink": _over(e2e, "influx+mqtt", "sink", sink),
        "e2e_influx_mqtt_over_broker": _over(e2e, "influx+mqtt", "broker", broker),
        "sink_serial_over_concurrent": round(
            ceilings["sink"]["rates"]["serial"] / ceilings["sink"]["rates"]["concurrent_2"], 3
        ),
        "workers_2_over_1": {
            mode: ratio
            for mode in ("influx", "influx+mqtt")
            if (ratio := _workers_ratio(_best(e2e, mode))) is not None
        },
        "broker_clients_over_senseflow": {
            name: round(rate / broker, 3) for name, rate in ceilings["broker"]["rates"].items()
        },
    }


def _step(results: dict[str, Any], workers: str, rate: float) -> dict[str, Any] | None:
    for step in results.get("latency", {}).get(workers, []):
        if step["rate"] == rate and "error" not in step:
            return dict(step)
    return None


def overload_checks(overload: dict[str, Any]) -> dict[str, bool]:
    """Recomputed from the raw counters, so that a report of an older JSON uses the checks
    as they are defined now."""
    from benchmarks.endtoend import overload_checks as checks

    return checks(overload["sent"], overload["counters"], overload["stored"])


def _cpu_at_max(e2e: dict[str, Any], mode: str) -> dict[str, float]:
    """CPU per event of the passing trial at the highest zero-loss rate, per workers count."""
    out = {}
    for w, result in e2e.get(mode, {}).items():
        best = [
            t for t in result["trials"] if t["passed"] and t["rate"] == result["max_zero_loss_rate"]
        ]
        if best:
            out[w] = best[-1]["cpu_us_per_event"]
    return out


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 15's targets (benchmarks/targets.py): goal, what was measured per workers
    count, and whether it was met; then the overload checks."""
    from benchmarks import targets as issue

    r = ratios(results)
    e2e = results.get("end_to_end", {})
    best = {mode: _best(e2e, mode) for mode in ("influx", "influx+mqtt")}
    steps = {
        w: {int(s["rate"]): s for s in ss if "error" not in s}
        for w, ss in results.get("latency", {}).items()
    }
    found = [
        *issue.cpu_rows(e2e, _cpu_at_max(e2e, "influx")),
        *issue.ratio_rows(r, best),
        *issue.latency_rows(
            steps, results.get("latency_loaded", {}), results["meta"].get("hog", {})
        ),
        *issue.memory_rows(steps),
        *issue.workers_rows(best),
    ]
    overload = results.get("overload")
    if overload:
        found.append(
            issue.verdict(
                "RSS under overload (2x max)",
                "flat (second-half peak <= first-half peak + 10 %)",
                overload["rss_flat"],
                f"{overload['rss_first_half_peak_mb']:.0f} -> "
                f"{overload['rss_second_half_peak_mb']:.0f} MB "
                f"({overload['rss_growth_pct']:+.0f} %)",
            )
        )
        found.append(
            issue.verdict(
                "counters add up under overload",
                "all checks",
                all(overload_checks(overload).values()),
                "; ".join(
                    f"{k}: {'yes' if v else 'NO'}" for k, v in overload_checks(overload).items()
                ),
            )
        )
    return found


# -- Markdown ---------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _n(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    m = meta["machine"]
    c = results["ceilings"]
    r = results.get("ratios") or ratios(results)
    parts = [
        f"- Date: {meta['date']}; {meta['mode']} run, {meta.get('elapsed_s', 0) / 60:.1f} min; "
        f"commit `{meta['commit']}`{' with local changes' if meta['local_changes'] else ''}",
        f"- Command: `{meta['command']}`",
        f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['platform']}, Python {m['python']}",
        f"- Servers: {meta['servers']['influxd']}; {meta['servers']['mosquitto']}",
        "- Packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()),
        "",
        *(
            ["*A quick run: it checks that the harness works; its figures mean nothing.*", ""]
            if meta["mode"] == "quick"
            else []
        ),
        "**Ceilings** (median of repeats)",
        "",
        _table(
            ["ceiling", "rate", "notes"],
            [
                [
                    "socket: bare uvloop loop, counting",
                    f"{_n(c['socket']['rate'])} datagrams/s",
                    "draining a socket pre-filled by `senseflow send`; while flooded by it: "
                    f"{_n(c['socket']['flood_rate'])}/s"
                    + (
                        " (sender-bound: no kernel drops)"
                        if all(x["flood"]["sender_bound"] for x in c["socket"]["runs"])
                        else ""
                    ),
                ],
                [
                    "sink: InfluxDB, line protocol, batches of 5,000",
                    f"{_n(c['sink']['rate'])} points/s",
                    f"1 request at a time {_n(c['sink']['rates']['serial'])}, "
                    f"2 at a time {_n(c['sink']['rates']['concurrent_2'])}",
                ],
                [
                    "broker: Mosquitto, QoS 1, our MqttSink",
                    f"{_n(c['broker']['rate'])} messages/s",
                    "one subscriber on the topic",
                ],
            ],
        ),
        "",
        "**MQTT publishers** (same payloads, QoS 1, one subscriber; client CPU per message "
        "in the publishing process)",
        "",
        _table(
            ["client", "messages/s", "× ours", "client CPU µs/message"],
            [
                [
                    name,
                    _n(rate),
                    f"{r['broker_clients_over_senseflow'][name]:.2f}",
                    c["broker"]["client_cpu_us_per_message"][name],
                ]
                for name, rate in c["broker"]["rates"].items()
            ],
        ),
        "",
        "**Receiver alone** (socket -> queue, 1 reader, workers discard)",
        "",
        _receiver_table(results, c),
        "",
        "**End to end**: highest steady zero-loss rate (bounded search), and CPU at 10,000/s",
        "",
        _e2e_table(results, r),
        "",
        "**Latency steps** (InfluxDB + MQTT everything topic; receive -> InfluxDB ack, "
        "receive -> MQTT delivery)",
        "",
        _latency_table(results),
    ]
    if results.get("latency_loaded"):
        parts += ["", _loaded_text(results)]
    if results.get("overload"):
        parts += ["", _overload_text(results["overload"])]
    if results.get("growth"):
        from benchmarks.growthreport import markdown as growth_markdown

        parts += ["", growth_markdown(results["growth"])]
    parts += [
        "",
        "**Targets** (issue 15; met: at the default --workers 2, or at every workers count "
        "measured when 2 was not; each count is listed)",
        "",
        _table(
            ["target", "goal", "measured", "met"],
            [
                [
                    t["target"],
                    t["goal"],
                    t["measured"],
                    {True: "yes", False: "**no**", None: "—"}[t["met"]],
                ]
                for t in targets(results)
            ],
        ),
    ]
    if results.get("errors"):
        parts += ["", "**Errors** (phases that failed; the rest ran):", ""]
        parts += [f"- {e['phase']}: `{e['error']}`" for e in results["errors"]]
    if meta.get("plots"):
        parts += [
            "",
            "Plots: " + ", ".join(f"[{Path(p).name}]({Path(p).name})" for p in meta["plots"]),
        ]
    return "\n".join(parts) + "\n"


def _loaded_text(results: dict[str, Any]) -> str:
    hog = results["meta"].get("hog", {})
    rows = []
    for w, s in results["latency_loaded"].items():
        i, q = s["influx_latency_ms"], s["mqtt_latency_ms"]
        machine = s.get("machine", {})
        rows.append(
            [
                w,
                _n(s["rate"]),
                f"{i.get('p50', '—')} / {i.get('p99', '—')} / {i.get('p99.9', '—')}",
                f"{q.get('p50', '—')} / {q.get('p99', '—')} / {q.get('p99.9', '—')}",
                s["cpu_us_per_event_total"],
                f"{machine.get('busy_pct', '—')} % / {machine.get('loadavg_1m', '—')}",
            ]
        )
    return (
        f"**On a loaded machine**: the 10,000/s latency step again, with "
        f"{hog.get('processes', 0)} CPU hog(s) (busy-loop processes) running beside it\n\n"
        + _table(
            [
                "workers",
                "rate/s",
                "InfluxDB ack p50 / p99 / p99.9 ms",
                "MQTT p50 / p99 / p99.9 ms",
                "CPU µs/event",
                "machine busy / load",
            ],
            rows,
        )
    )


def _search_text(result: dict[str, Any]) -> str:
    """`lo-hi/s (precision)` of a search, or what is known when it did not close."""
    search = result.get("search")
    if not search:
        return "—"
    lo, hi = search["lo"], search["hi"]
    if hi is None:
        return f">= {_n(lo)}/s ({search['stopped']})"
    if not lo:
        return f"< {_n(hi)}/s ({search['stopped']})"
    mark = "" if search["within_target"] else " **wide**"
    return f"{_n(lo)}-{_n(hi)}/s ({(hi - lo) / lo:.1%}{mark})"


def _receiver_table(results: dict[str, Any], c: dict[str, Any]) -> str:
    alone = results["receiver_alone"]
    rows = []
    for method, rate_key, ratio_key in (
        ("drain (pre-filled socket)", "rate", "ratio_to_socket"),
        ("flood (while sending)", "flood_rate", "flood_ratio_to_socket"),
    ):
        key = "drain" if method.startswith("drain") else "flood"
        rows.append(
            [
                method,
                f"{_n(c['socket'][rate_key])}/s",
                f"{_n(alone[rate_key])}/s",
                f"{alone[ratio_key]:.2f}",
                ", ".join(f"{x[key]['kernel_drops']:,}" for x in alone["runs"]),
                ", ".join(f"{x[key]['dropped_queue_full']:,}" for x in alone["runs"]),
            ]
        )
    return _table(
        [
            "method",
            "socket ceiling",
            "senseflow reader",
            "ratio (median of repeats)",
            "kernel drops",
            "queue-full drops",
        ],
        rows,
    )


def _e2e_table(results: dict[str, Any], r: dict[str, Any]) -> str:
    e2e = results.get("end_to_end", {})
    rows = []
    for w in e2e.get("influx", {}):
        influx, both = e2e["influx"][w], e2e.get("influx+mqtt", {}).get(w, {})
        rows.append(
            [
                w,
                f"{_n(influx['max_zero_loss_rate'])}/s",
                _n(influx.get("adjacent_ceilings", {}).get("sink")),
                f"{r['e2e_influx_over_sink'].get(w, 0):.2f}",
                f"{_n(both.get('max_zero_loss_rate'))}/s",
                " / ".join(
                    _n(both.get("adjacent_ceilings", {}).get(k)) for k in ("sink", "broker")
                ),
                f"{r['e2e_influx_mqtt_over_sink'].get(w, 0):.2f}",
                f"{r['e2e_influx_mqtt_over_broker'].get(w, 0):.2f}",
                influx["at_10k"]["cpu_us_per_event"],
                both.get("at_10k", {}).get("cpu_us_per_event", "—"),
                f"{_search_text(influx)}; {_search_text(both)}",
                len(influx["trials"]) + len(both.get("trials", [])),
            ]
        )
    return _table(
        [
            "workers",
            "InfluxDB only",
            "sink ceiling then",
            "/ sink",
            "InfluxDB + MQTT",
            "sink / broker ceilings then",
            "/ sink",
            "/ broker",
            "CPU µs/event, InfluxDB only",
            "CPU µs/event, + MQTT",
            "max known within (pass-fail): InfluxDB only; + MQTT",
            "trials",
        ],
        rows,
    )


def _latency_table(results: dict[str, Any]) -> str:
    rows = []
    for w, steps in results.get("latency", {}).items():
        for s in steps:
            if "error" in s:
                rows.append(
                    [w, _n(s["rate"]), "—", f"failed: {s['error']}", "", "", "", "", "", ""]
                )
                continue
            i, q, d = s["influx_latency_ms"], s["mqtt_latency_ms"], s.get("influx_write_ms", {})
            machine = s.get("machine", {})
            rows.append(
                [
                    w,
                    _n(s["rate"]),
                    _n(s["achieved_rate"]),
                    f"{i.get('p50', '—')} / {i.get('p99', '—')} / {i.get('p99.9', '—')}",
                    f"{d.get('p50', '—')} / {d.get('p99', '—')}",
                    f"{q.get('p50', '—')} / {q.get('p99', '—')} / {q.get('p99.9', '—')}",
                    f"{s['influx_delivered']:,} / {s['mqtt_delivered']:,} of {s['sent']:,}",
                    s["cpu_us_per_event_total"],
                    f"{s['peak_total_rss_mb']:.0f} ({s['pss_mb_total']:.0f})",
                    f"{machine.get('busy_pct', '—')} % / {machine.get('loadavg_1m', '—')}",
                ]
            )
    return _table(
        [
            "workers",
            "rate/s",
            "sent/s",
            "InfluxDB ack p50 / p99 / p99.9 ms",
            "of which InfluxDB /write p50 / p99 ms",
            "MQTT p50 / p99 / p99.9 ms",
            "acked / delivered",
            "CPU µs/event",
            "total RSS MB (PSS)",
            "machine busy / load",
        ],
        rows,
    )


def _overload_text(o: dict[str, Any]) -> str:
    counters = o["counters"]
    keys = (
        "received",
        "events",
        "dropped.kernel",
        "dropped.queue_full",
        "written.influxdb",
        "written.mqtt",
    )
    return (
        f"**Overload**: {_n(o['rate'])}/s (2x the max) for {o['send_seconds']} s "
        f"with {o['workers']} workers, "
        f"sent {o['sent']:,} at {_n(o['achieved_rate'])}/s; "
        + ", ".join(f"{k} {counters.get(k, 0):,}" for k in keys)
        + f"; stored: {o['stored']}. "
        f"Total RSS peak {o['rss_first_half_peak_mb']:.0f} MB in the first half, "
        f"{o['rss_second_half_peak_mb']:.0f} MB in the second ({o['rss_growth_pct']:+.0f} %); "
        "checks: "
        + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in overload_checks(o).items())
        + "."
    )


# -- plots ------------------------------------------------------------------------------------


def plot(results: dict[str, Any], directory: Path, prefix: str = "") -> list[str]:
    """Throughput vs workers, latency vs rate and (if measured) RSS under overload, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    figure, axes = plt.subplots(figsize=(10, 4.5))
    _plot_throughput(axes, results)
    written.append(_save(figure, directory / f"{prefix}throughput-vs-workers.png", plt))
    figure, axes_pair = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    _plot_latency(axes_pair, results)
    written.append(_save(figure, directory / f"{prefix}latency-vs-rate.png", plt))
    if results.get("overload"):
        figure, axes = plt.subplots(figsize=(7, 4))
        _plot_overload(axes, results["overload"])
        written.append(_save(figure, directory / f"{prefix}overload-rss.png", plt))
    if results.get("growth"):
        from benchmarks.growthreport import plot as growth_plot

        written.append(Path(growth_plot(results["growth"], directory / f"{prefix}growth.png")))
    return [str(p) for p in written]


def _save(figure: Any, path: Path, plt: Any) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_throughput(axes: Any, results: dict[str, Any]) -> None:
    e2e = results.get("end_to_end", {})
    c = results["ceilings"]
    for mode, label, color in (
        ("influx", "end to end, InfluxDB only", "tab:blue"),
        ("influx+mqtt", "end to end, InfluxDB + MQTT QoS 1", "tab:orange"),
    ):
        best = _best(e2e, mode)
        axes.plot([int(w) for w in best], list(best.values()), marker="o", color=color, label=label)
        brackets = [
            (int(w), r["search"]["lo"], r["search"]["hi"])
            for w, r in e2e.get(mode, {}).items()
            if r.get("search", {}).get("hi")
        ]
        if brackets:  # from the highest rate that passed to the lowest that failed
            axes.vlines(
                [w for w, _, _ in brackets],
                [lo for _, lo, _ in brackets],
                [hi for _, _, hi in brackets],
                color=color,
                linewidth=3,
                alpha=0.4,
                label=f"{label}: up to the lowest rate that failed",
            )
    adjacent = {
        int(w): r["adjacent_ceilings"]["sink"]
        for w, r in e2e.get("influx", {}).items()
        if r.get("adjacent_ceilings")
    }
    if adjacent:
        axes.plot(
            list(adjacent),
            list(adjacent.values()),
            marker="x",
            linestyle="--",
            color="tab:green",
            label="sink ceiling next to each InfluxDB-only search",
        )
        axes.plot(
            list(adjacent),
            [0.6 * v for v in adjacent.values()],
            linestyle=":",
            color="tab:green",
            label="target: 60 % of it",
        )
    axes.axhline(
        c["sink"]["rate"],
        linestyle="--",
        color="tab:green",
        linewidth=0.7,
        alpha=0.5,
        label="sink ceiling at the start of the run",
    )
    axes.axhline(
        c["broker"]["rate"],
        linestyle=":",
        color="tab:purple",
        linewidth=0.8,
        label="broker ceiling at the start of the run",
    )
    axes.axhline(
        0.8 * c["broker"]["rate"],
        linestyle="-.",
        color="grey",
        linewidth=0.8,
        label="target with MQTT: 80 % of the broker ceiling",
    )
    axes.set_xlabel("--workers")
    axes.set_ylabel("highest steady zero-loss rate (events/s)")
    axes.set_xticks(sorted({int(w) for m in e2e.values() for w in m}))
    axes.set_ylim(bottom=0)
    axes.set_title(
        f"Throughput vs workers ({results['meta']['date'][:10]}, {results['meta']['mode']} run)"
    )
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes.grid(alpha=0.3)


def _plot_latency(axes_pair: Any, results: dict[str, Any]) -> None:
    for axes, key, title, limit in zip(
        axes_pair,
        ("influx_latency_ms", "mqtt_latency_ms"),
        ("receive -> InfluxDB ack", "receive -> MQTT delivery"),
        (250, 50),
        strict=True,
    ):
        for index, (w, steps) in enumerate(results.get("latency", {}).items()):
            rates = [s["rate"] for s in steps]
            for point, style in (("p50", ":"), ("p99", "-"), ("p99.9", "--")):
                values = [s[key].get(point) for s in steps]
                axes.plot(
                    rates,
                    values,
                    linestyle=style,
                    marker="o",
                    color=f"C{index}",
                    label=f"{w} worker(s) {point}",
                )
        axes.axhline(limit, color="red", linewidth=0.8, label=f"p99 target {limit} ms at 10k/s")
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("rate (events/s)")
        axes.set_title(title)
        axes.grid(alpha=0.3, which="both")
        axes.legend(fontsize=7)
    axes_pair[0].set_ylabel("latency (ms)")


def _plot_overload(axes: Any, overload: dict[str, Any]) -> None:
    times = [t for t, _ in overload["rss_total_mb"]]
    axes.plot(
        times,
        [mb for _, mb in overload["rss_total_mb"]],
        label="total RSS, all senseflow processes",
    )
    axes.set_xlabel("seconds since the overload started")
    axes.set_ylabel("MB")
    axes.set_ylim(bottom=0)
    axes.set_title(f"RSS at {overload['rate']:,.0f}/s (2x max), {overload['workers']} workers")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)


# -- compare ----------------------------------------------------------------------------------


def flatten(value: Any, prefix: str = "") -> dict[str, float]:
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return (
        {prefix: float(value)}
        if isinstance(value, int | float) and not isinstance(value, bool)
        else {}
    )


def headline(results: dict[str, Any]) -> dict[str, float]:
    """Absolute figures worth a look next to the ratios (machine-dependent)."""
    c = results["ceilings"]
    out = {
        "ceiling.socket": c["socket"]["rate"],
        "ceiling.sink": c["sink"]["rate"],
        "ceiling.broker": c["broker"]["rate"],
        "receiver_alone": results["receiver_alone"]["rate"],
    }
    for mode, per in results.get("end_to_end", {}).items():
        for w, r in per.items():
            out[f"e2e.{mode}.w{w}.max_rate"] = r["max_zero_loss_rate"]
            out[f"e2e.{mode}.w{w}.cpu_us_per_event_10k"] = r["at_10k"]["cpu_us_per_event"]
    for w in results.get("latency", {}):
        step = _step(results, w, 10_000.0)
        if step:
            out[f"latency.w{w}.10k.influx_p99_ms"] = step["influx_latency_ms"].get("p99", 0)
            out[f"latency.w{w}.10k.mqtt_p99_ms"] = step["mqtt_latency_ms"].get("p99", 0)
            out[f"latency.w{w}.10k.total_rss_mb"] = step["peak_total_rss_mb"]
    for row in results.get("growth", {}).get("rows", []):
        name = f"growth.{row['series']}.{row['rate']:.0f}_per_s.{row['users']}_users"
        out[f"{name}.cpu_us_per_event"] = row["cpu_us_per_event_total"]
        out[f"{name}.total_rss_mb"] = row["rss_total_mb"]
        out[f"{name}.total_pss_mb"] = row["pss_total_mb"]
    return out


def compare(old: dict[str, Any], new: dict[str, Any]) -> str:
    lines = [
        f"old: {old['meta']['date']} {old['meta']['mode']} (commit {old['meta']['commit']})",
        f"new: {new['meta']['date']} {new['meta']['mode']} (commit {new['meta']['commit']})",
        "",
    ]
    for title, a, b in (
        (
            "ratios (same-run, comparable across machines)",
            flatten(old.get("ratios") or ratios(old)),
            flatten(new.get("ratios") or ratios(new)),
        ),
        ("absolute figures (depend on the machine and its noise)", headline(old), headline(new)),
    ):
        lines.append(title)
        width = max((len(k) for k in a.keys() | b.keys()), default=10)
        for key in sorted(a.keys() | b.keys()):
            was, now = a.get(key), b.get(key)
            change = f"{(now / was - 1) * 100:+7.1f} %" if was and now is not None else "       —"
            lines.append(f"  {key:<{width}}  {_fmt(was):>12} -> {_fmt(now):>12}  {change}")
        lines.append("")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    comparing = commands.add_parser(
        "compare", help="print ratio changes between two suite JSON files"
    )
    comparing.add_argument("old", type=Path)
    comparing.add_argument("new", type=Path)
    table = commands.add_parser("markdown", help="print the Markdown table of a suite JSON file")
    table.add_argument("run", type=Path)
    plots = commands.add_parser("plot", help="draw the plots of a suite JSON file")
    plots.add_argument("run", type=Path)
    plots.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = parser.parse_args(argv)
    if args.command == "compare":
        print(compare(orjson.loads(args.old.read_bytes()), orjson.loads(args.new.read_bytes())))
    elif args.command == "markdown":
        print(markdown(orjson.loads(args.run.read_bytes())))
    else:
        print("\n".join(plot(orjson.loads(args.run.read_bytes()), args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
