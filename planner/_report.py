"""Human-readable views of a planned bundle (rich tables) for ``splitgate plan``."""

from __future__ import annotations

from typing import Any

from splitgate.planner._cost import Conditions
from splitgate.planner._profile import Timing

__all__ = ["plan_table", "explain_table", "best_cloud_only", "NETWORKS"]

#: DADS (INFOCOM'19) uplinks, with RTTs typical of each technology.
NETWORKS: dict[str, Conditions] = {
    "CAT1": Conditions(uplink_mbps=0.13, rtt_ms=150.0),
    "3G": Conditions(uplink_mbps=1.1, rtt_ms=100.0),
    "4G": Conditions(uplink_mbps=5.85, rtt_ms=50.0),
    "WiFi": Conditions(uplink_mbps=18.88, rtt_ms=10.0),
}


def best_cloud_only(bundle: Any, c: Conditions) -> str:
    """The honest "cloud-only" baseline under ``c``: of ``cloud`` and its guarded
    encoded twins (``cloud@uint8``, ``cloud@int8``...), the one the plan's own
    rule picks (the battery-weighted objective over the plan's estimate; at a
    full battery, the fastest).

    Raises:
        BundleError: the bundle has no profile.
    """
    from splitgate.planner._decide import pick

    ests = {pid: bundle.estimate(pid, c) for pid, p in bundle.partitions.items() if p.kind == "cloud"}
    ref = bundle.estimate("device", c) if "device" in bundle.partitions else next(iter(ests.values()))
    return pick(ests, c, ref)


def plan_table(bundle: Any) -> Any:
    """Per partition: cut bytes, measured device/cloud ms (estimate error), and where it is chosen;
    the caption names the cloud-only baseline per network (the best guarded cloud encoding)."""
    from rich.table import Table

    table = Table(title=f"plan: {bundle.model_name} ({len(bundle.partitions)} partitions)")
    for col in ("partition", "cut tensors", "up bytes", "device ms", "cloud ms", "est. err dev/cloud", "chosen on"):
        table.add_column(col, justify="left" if col in ("partition", "cut tensors", "chosen on") else "right")
    prof = bundle.plan_profile
    entries = prof.partitions if prof is not None else {}
    chosen: dict[str, list[str]] = {}
    if bundle.has_profile:
        for net, c in NETWORKS.items():
            chosen.setdefault(bundle.choose(c), []).append(net)
        table.caption = "cloud-only = best guarded cloud encoding: " + ", ".join(
            f"{net} {best_cloud_only(bundle, c)}" for net, c in NETWORKS.items())
    for p in bundle.partitions.values():
        e = entries.get(p.id)
        names = ", ".join(t.name for t in p.cut_tensors) or "-"
        if len(names) > 40:
            names = names[:37] + "..."
        if e is None:
            table.add_row(p.id, names, "-" if p.cut_bytes is None else f"{p.cut_bytes:,}", "-", "-", "-", "-")
            continue
        table.add_row(
            p.id + _label(p, bundle.candidates),
            names,
            f"{e.up_bytes:,}",
            f"{e.device_ms:.2f}{_spread(e.device_timing)}",
            f"{e.cloud_ms:.2f}{_spread(e.cloud_timing)}",
            f"{_error(e.est_device_ms, e.device_timing)} / {_error(e.est_cloud_ms, e.cloud_timing)}",
            ", ".join(chosen.get(p.id, [])) or "-",
        )
    return table


def _label(p: Any, candidates: list[str]) -> str:
    """`` (raw fp32)`` for ``cloud``; `` (ref)`` for a reference cut no table picks,
    `` (baseline)`` for such a cloud twin."""
    if p.id == "cloud" and p.kind == "cloud":
        return " (raw fp32)" + ("" if p.id in candidates else ", not picked")
    if p.id in candidates:
        return ""
    return " (baseline)" if p.kind == "cloud" and p.encoding else " (ref)"


def _error(estimate_ms: float, timing: Timing | None) -> str:
    """The per-node estimate's error against the measured median, as ``+12%``."""
    if timing is None or not timing.median_ms:
        return "-"
    return f"{100 * (estimate_ms - timing.median_ms) / timing.median_ms:+.0f}%"


def _spread(timing: Timing | None) -> str:
    """Half the p10-p90 range, as `` ±0.12``."""
    return f" ±{(timing.p90_ms - timing.p10_ms) / 2:.2f}" if timing else ""


def explain_table(bundle: Any, *, rtt_ms: float = 20.0, battery_pct: float = 100.0) -> Any:
    """Why each candidate wins where it does (see :meth:`splitgate.planner.PlanBundle.explain`)."""
    from rich.table import Table

    table = Table(title=f"why each partition wins (RTT {rtt_ms:g} ms, battery {battery_pct:g}%)")
    for col in ("partition", "grid cells won", "uplink range (Mbps)", "reason"):
        table.add_column(col)
    for row in bundle.explain(rtt_ms=rtt_ms, battery_pct=battery_pct):
        rng = row["uplink_range"]
        table.add_row(
            row["id"],
            f"{row['cells']} ({100 * row['share']:.0f}%)",
            "-" if rng is None else f"{rng[0]:g} - {rng[1]:g}",
            row["reason"],
        )
    return table
