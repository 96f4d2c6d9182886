"""Read locust's CSV output, plot it, and summarise it as rich tables."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

__all__ = ["NameStats", "read_stats", "plot_history", "summary_table", "step_table"]

AGGREGATED = "Aggregated"


@dataclass(frozen=True)
class NameStats:
    """One row of locust's ``*_stats.csv``: a request name (or the aggregate)."""

    name: str
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    avg_ms: float
    max_ms: float
    avg_bytes: float


def _num(row: dict[str, str], key: str) -> float:
    value = row.get(key, "") or ""
    try:
        return float(value)
    except ValueError:  # "N/A" when a name had no successful request
        return math.nan


def read_stats(stats_csv: str | Path) -> list[NameStats]:
    """Parse ``PREFIX_stats.csv``; the ``Aggregated`` row comes last."""
    rows: list[NameStats] = []
    with open(stats_csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            rows.append(
                NameStats(
                    name=row["Name"],
                    requests=int(_num(row, "Request Count")),
                    failures=int(_num(row, "Failure Count")),
                    rps=_num(row, "Requests/s"),
                    p50_ms=_num(row, "50%"),
                    p95_ms=_num(row, "95%"),
                    p99_ms=_num(row, "99%"),
                    avg_ms=_num(row, "Average Response Time"),
                    max_ms=_num(row, "Max Response Time"),
                    avg_bytes=_num(row, "Average Content Size"),
                )
            )
    rows.sort(key=lambda r: (r.name == AGGREGATED, r.name))
    return rows


def plot_history(history_csv: str | Path, png: str | Path, *, title: str = "splitgate cloud tier load test") -> Path:
    """Plot rps (per name and total), latency percentiles and users over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, list[float]]] = {}
    t0: float | None = None
    with open(history_csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            ts = _num(row, "Timestamp")
            t0 = ts if t0 is None else t0
            s = series.setdefault(row["Name"], {k: [] for k in ("t", "users", "rps", "fails", "p50", "p95", "p99")})
            s["t"].append(ts - t0)
            s["users"].append(_num(row, "User Count"))
            s["rps"].append(_num(row, "Requests/s"))
            s["fails"].append(_num(row, "Failures/s"))
            for q in ("50", "95", "99"):  # locust writes 0 / N/A while a window has no request
                value = _num(row, q + "%")
                s["p" + q].append(value if value > 0 else math.nan)
    fig, (ax_rps, ax_lat) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    total = series.get(AGGREGATED)
    for name, s in sorted(series.items()):
        if name != AGGREGATED:
            ax_rps.plot(s["t"], s["rps"], lw=1, alpha=0.8, label=name)
    if total:
        ax_rps.plot(total["t"], total["rps"], lw=2, color="black", label="total rps")
        if any(f > 0 for f in total["fails"] if not math.isnan(f)):
            ax_rps.plot(total["t"], total["fails"], lw=1.5, color="red", label="failures/s")
        ax_users = ax_rps.twinx()
        ax_users.plot(total["t"], total["users"], lw=1, ls="--", color="grey", label="users")
        ax_users.set_ylabel("users")
        ax_users.set_ylim(bottom=0)
        ax_users.legend(loc="upper right", fontsize=8)
        for q, color in (("p50", "tab:green"), ("p95", "tab:orange"), ("p99", "tab:red")):
            ax_lat.plot(total["t"], total[q], lw=1.5, color=color, label=f"{q} (all requests)")
    ax_rps.set_ylabel("requests/s")
    ax_rps.set_ylim(bottom=0)
    ax_rps.legend(loc="upper left", fontsize=8)
    ax_rps.grid(alpha=0.3)
    ax_rps.set_title(title)
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_xlabel("time (s)")
    ax_lat.set_ylim(bottom=0)
    ax_lat.legend(loc="upper left", fontsize=8)
    ax_lat.grid(alpha=0.3)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _ms(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:,.0f}"


def summary_table(rows: list[NameStats], *, title: str = "load test summary") -> Table:
    """rps, latency percentiles and failures per request name."""
    table = Table(title=title, caption="latencies in ms; bytes = mean response size")
    table.add_column("name", no_wrap=True)
    for col in ("reqs", "fails", "rps", "p50", "p95", "p99", "max", "bytes"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        style = "bold" if r.name == AGGREGATED else None
        table.add_row(
            "total" if r.name == AGGREGATED else r.name,
            f"{r.requests:,}",
            f"[red]{r.failures:,}[/]" if r.failures else "0",
            f"{r.rps:,.1f}",
            _ms(r.p50_ms),
            _ms(r.p95_ms),
            _ms(r.p99_ms),
            _ms(r.max_ms),
            _ms(r.avg_bytes),
            style=style,
        )
    return table


def step_table(result: dict[str, Any]) -> Table:
    """The step-load steps, marking which met the p99 target."""
    target = result["p99_target_ms"]
    table = Table(title=f"step load (p99 target {target:.0f} ms)", caption="latencies in ms, per step after warm-up")
    for col in ("step", "users", "reqs", "fails", "rps", "p50", "p95", "p99", "within target"):
        table.add_column(col, justify="right", no_wrap=True)
    for i, s in enumerate(result["steps"], 1):
        table.add_row(
            str(i), str(s["users"]), f"{s['requests']:,}", str(s["failures"]), f"{s['rps']:,.1f}",
            f"{s['p50_ms']:,.1f}", f"{s['p95_ms']:,.1f}", f"{s['p99_ms']:,.1f}",
            "[green]yes[/]" if s["within_target"] else "[red]no[/]",
        )
    return table
