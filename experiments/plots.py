"""PNG plots of an experiment (matplotlib, Agg backend)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

from splitgate.experiments._records import Record
from splitgate.experiments.spec import ExperimentSpec

__all__ = ["plot_all"]

_COLORS = {"device": "#7f7f7f", "cloud": "#1f77b4", "neurosurgeon": "#ff7f0e", "dads": "#2ca02c",
           "adaptive": "#d62728", "mincut": "#9467bd"}


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _engines(records: list[Record]) -> list[str]:
    return list(dict.fromkeys(r.engine for r in records))


def _bins(values: list[float]) -> list[float]:
    distinct = sorted(set(values))
    if len(distinct) <= 12:
        return distinct
    lo, hi = math.log(min(distinct)), math.log(max(distinct))
    return [math.exp(lo + (hi - lo) * i / 9) for i in range(10)]


def _nearest(x: float, centers: list[float]) -> float:
    return min(centers, key=lambda c: abs(math.log(c) - math.log(x)))


def latency_vs_bandwidth(records: list[Record], spec: ExperimentSpec, path: Path) -> Path:
    plt = _plt()
    engines = _engines(records)
    fig, axes = plt.subplots(1, len(engines), figsize=(6 * len(engines), 4.2), squeeze=False, sharey=True)
    for ax, engine in zip(axes[0], engines):
        rs = [r for r in records if r.engine == engine and not r.outage]
        if not rs:
            continue
        centers = _bins([r.uplink_mbps for r in rs])
        for policy in spec.policies:
            groups: dict[float, list[float]] = defaultdict(list)
            for r in rs:
                if r.policy == policy:
                    groups[_nearest(r.uplink_mbps, centers)].append(r.latency_ms)
            xs = sorted(groups)
            ax.plot(xs, [statistics.fmean(groups[x]) for x in xs], marker="o", label=policy,
                    color=_COLORS.get(policy))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("uplink bandwidth at request start (Mbps)")
        ax.set_title(f"{engine}: mean latency vs bandwidth")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("latency (ms)")
    axes[0][0].legend()
    fig.suptitle(f"{spec.name}: {spec.model_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def partitions_over_time(records: list[Record], spec: ExperimentSpec, path: Path) -> Path:
    plt = _plt()
    engines = _engines(records)
    order = {pid: i for i, pid in enumerate(dict.fromkeys(
        sorted({r.partition for r in records}, key=lambda p: (p != "cloud", p == "device", _cut_index(p)))))}
    fig, axes = plt.subplots(1 + len(engines), 1, figsize=(10, 2.6 + 2.6 * len(engines)), sharex=True,
                             gridspec_kw={"height_ratios": [1.0] + [1.4] * len(engines)})
    trace = spec.trace
    ax = axes[0]
    xs, ys = [], []
    for i, p in enumerate(trace.points):
        end = trace.points[i + 1].t_s if i + 1 < len(trace.points) else trace.duration_s
        xs += [p.t_s, end]
        ys += [p.uplink_mbps, p.uplink_mbps]
        if p.outage:
            for a in axes:
                a.axvspan(p.t_s, end, color="black", alpha=0.12, lw=0)
    ax.plot(xs, ys, color="black")
    ax.set_yscale("log")
    ax.set_ylabel("uplink Mbps")
    ax.set_title(f"{spec.name}: trace '{trace.name}' (shaded: outage) and partition chosen")
    dynamic = [p for p in spec.policies if p not in ("device", "cloud", "cloud-raw")]
    for ax, engine in zip(axes[1:], engines):
        for k, policy in enumerate(dynamic):
            rs = [r for r in records if r.engine == engine and r.policy == policy and r.rep == 0]
            off = (k - (len(dynamic) - 1) / 2) * 0.12
            ax.scatter([r.t_s for r in rs], [order[r.partition] + off for r in rs], s=10, label=policy,
                       color=_COLORS.get(policy))
            fb = [r for r in rs if r.fallback]
            if fb:
                ax.scatter([r.t_s for r in fb], [order[r.partition] + off for r in fb], s=40, marker="x",
                           color="black")
        ax.set_yticks(list(order.values()), list(order.keys()))
        ax.set_ylabel(f"{engine}\npartition")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(loc="upper right", fontsize=8, ncol=len(dynamic))
    axes[-1].set_xlabel("time (s)   (x: fallback)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cut_index(pid: str) -> int:
    try:
        return int(pid.split("-")[1])
    except (IndexError, ValueError):
        return 0


def energy_vs_latency(records: list[Record], spec: ExperimentSpec, path: Path) -> Path:
    plt = _plt()
    engines = _engines(records)
    fig, axes = plt.subplots(1, len(engines), figsize=(6 * len(engines), 4.2), squeeze=False)
    for ax, engine in zip(axes[0], engines):
        for policy in spec.policies:
            rs = [r for r in records if r.engine == engine and r.policy == policy]
            if not rs:
                continue
            sample = [r for r in rs if r.rep == 0]
            ax.scatter([r.latency_ms for r in sample], [r.energy_mj for r in sample], s=6, alpha=0.25,
                       color=_COLORS.get(policy))
            ax.scatter([statistics.fmean(r.latency_ms for r in rs)], [statistics.fmean(r.energy_mj for r in rs)],
                       s=120, marker="*", edgecolor="black", color=_COLORS.get(policy), label=f"{policy} (mean)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("device energy (mJ)")
        ax.set_title(f"{engine}: energy vs latency per request")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{spec.name}: radio + compute energy (Huang et al. radio power)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(records: list[Record], spec: ExperimentSpec, out_dir: Path) -> list[Path]:
    """Write the three plots; return their paths."""
    if not records:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        latency_vs_bandwidth(records, spec, out_dir / "latency_vs_bandwidth.png"),
        partitions_over_time(records, spec, out_dir / "partitions_over_time.png"),
        energy_vs_latency(records, spec, out_dir / "energy_vs_latency.png"),
    ]
