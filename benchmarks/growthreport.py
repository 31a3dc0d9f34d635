"""The table and the plot of benchmarks/growth.py (cost vs rate, cost vs users)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROLES = ("readers", "workers", "writer", "supervisor")


def table_rows(growth: dict[str, Any]) -> list[list[str]]:
    """One row per step of both series: rate, users, CPU per event (all, by role), memory."""
    rows = []
    for row in growth["rows"]:
        roles = row["cpu_us_per_event_by_role"]
        others = sum(v for k, v in roles.items() if k not in ROLES)
        rows.append(
            [
                row["series"],
                f"{row['rate']:,.0f}",
                f"{row['users']:,}",
                f"{row['cpu_us_per_event_total']:.1f}",
                *(f"{roles.get(role, 0.0):.1f}" for role in ROLES),
                f"{others:.1f}",
                f"{row['rss_total_mb']:.0f} / {row['peak_total_rss_mb']:.0f}",
                f"{row['pss_total_mb']:.0f}",
                _drain(row),
            ]
        )
    return rows


HEADER = [
    "series",
    "rate/s",
    "distinct users",
    "CPU µs/event, all",
    *ROLES,
    "other",
    "total RSS MB (end / peak)",
    "total PSS MB",
    "all stored within (s after the last send)",
]


def _drain(row: dict[str, Any]) -> str:
    longest = row.get("drain_seconds_max")
    if not row["drained"]:
        return "**not all** (a repeat waited 20 s)"
    return "—" if longest is None else f"{longest:.1f}"


def markdown(growth: dict[str, Any]) -> str:
    rows = table_rows(growth)
    lines = [
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(HEADER))) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    scale = growth["scale"]
    hog = growth.get("hog", 0)
    return (
        f"**Cost growth** ({growth['mode']}, --workers {growth['workers']}; "
        f"{scale['duration']:g} s per step, median of {scale['repeats']}"
        + (f"; {hog} CPU hog(s) running" if hog else "")
        + "; CPU per event delivered, every process of the service; "
        "the rates series sends the corpus's 300 users)\n\n" + "\n".join(lines)
    )


def plot(growth: dict[str, Any], path: Path) -> str:
    """CPU per event and total RSS / PSS, against the rate and against the user count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes_pair = plt.subplots(1, 2, figsize=(12, 4.5))
    for axes, series, key, label in (
        (axes_pair[0], "rates", "rate", "rate (events/s)"),
        (axes_pair[1], "users", "users", "distinct users (at 10,000 events/s)"),
    ):
        rows = [r for r in growth["rows"] if r["series"] == series]
        xs = [r[key] for r in rows]
        axes.plot(xs, [r["cpu_us_per_event_total"] for r in rows], marker="o", label="CPU µs/event")
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel(label)
        axes.set_ylabel("CPU µs per event, all processes")
        axes.grid(alpha=0.3, which="both")
        memory = axes.twinx()
        memory.plot(
            xs, [r["rss_total_mb"] for r in rows], marker="s", color="tab:red", label="RSS MB"
        )
        memory.plot(
            xs,
            [r["pss_total_mb"] for r in rows],
            marker="^",
            linestyle="--",
            color="tab:purple",
            label="PSS MB",
        )
        memory.set_ylabel("total MB, all processes")
        memory.set_ylim(bottom=0)
        handles = axes.get_legend_handles_labels()
        more = memory.get_legend_handles_labels()
        axes.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="best")
        axes.set_title(f"cost vs {key}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return str(path)
