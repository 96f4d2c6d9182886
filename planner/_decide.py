"""Candidate search over the condition space and the run-time decision table.

Following Edgent (Li et al., 2018: map the current bandwidth state to a
precomputed best configuration), choosing a partition at run time is a table
lookup. The table is built at plan time over a grid of conditions — uplink
0.05-1000 Mbps (log grid), RTT 1-500 ms, battery 0-100 % — from the measured
estimates of a few candidate partitions. The candidates come from the DADS
min-cut (:mod:`splitgate.planner._mincut`) solved over the same space on the per-node
estimates; only those that win somewhere are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from splitgate.planner._cost import Conditions, EnergyModel, Estimate, linear_costs, log_grid, objective
from splitgate.planner._mincut import CutProblem, DagCut, min_cut
from splitgate.errors import BundleError

__all__ = [
    "Grid",
    "DecisionTable",
    "pick",
    "search_candidates",
    "build_table",
    "explain",
]


@dataclass(frozen=True)
class Grid:
    """The condition space a decision table covers.

    Attributes:
        uplink_mbps: uplink bandwidths (ascending; log-spaced by default).
        rtt_ms: round-trip times (ascending).
        battery_pct: battery levels (ascending).
    """

    uplink_mbps: tuple[float, ...] = tuple(log_grid(0.05, 1000.0, 29))
    rtt_ms: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0)
    battery_pct: tuple[float, ...] = (0.0, 25.0, 50.0, 75.0, 100.0)

    def cells(self) -> int:
        """Number of grid cells."""
        return len(self.uplink_mbps) * len(self.rtt_ms) * len(self.battery_pct)


def _nearest_log(values: Sequence[float], x: float) -> int:
    lx = math.log(max(x, 1e-9))
    return min(range(len(values)), key=lambda i: abs(math.log(max(values[i], 1e-9)) - lx))


def _bracket(values: Sequence[float], x: float) -> tuple[int, ...]:
    """Indices of the grid values just below and above ``x`` (one if ``x`` is on or beyond an end)."""
    hi = next((i for i, v in enumerate(values) if v >= x), len(values) - 1)
    if values[hi] == x or hi == 0 or x > values[-1]:
        return (hi,)
    return (hi - 1, hi)


def _nearest(values: Sequence[float], x: float) -> int:
    return min(range(len(values)), key=lambda i: abs(values[i] - x))


def pick(
    estimates: Mapping[str, Estimate],
    c: Conditions,
    ref: Estimate,
    *,
    slo_ms: float | None = None,
    excluded: frozenset[str] = frozenset(),
) -> str:
    """The partition to run under ``c``: argmin of the battery-weighted objective.

    Args:
        estimates: partition id -> its estimate under ``c`` (order breaks ties).
        c: the conditions.
        ref: the device-only estimate (objective normaliser).
        slo_ms: latency SLO; when some partitions meet it only those compete,
            otherwise the fastest partition is returned.
        excluded: ids never to return (privacy floor, memory).

    Returns:
        A partition id.

    Raises:
        BundleError: no partition is allowed.
    """
    allowed = {k: v for k, v in estimates.items() if k not in excluded}
    if not allowed:
        raise BundleError("no partition satisfies the constraints")
    if slo_ms is not None:
        meeting = {k: v for k, v in allowed.items() if v.latency_ms <= slo_ms}
        if not meeting:
            return min(allowed, key=lambda k: allowed[k].latency_ms)
        allowed = meeting
    return min(allowed, key=lambda k: (objective(allowed[k], c, ref), allowed[k].latency_ms))


@dataclass
class DecisionTable:
    """Grid of conditions -> partition id; a run-time choice looks up the cells around
    the conditions (:meth:`around`, weighed by :meth:`splitgate.planner.PlanBundle.choose`).

    Attributes:
        grid: the condition grid.
        candidates: partition ids the table may answer.
        choice: ``choice[b][r][u]`` = index into ``candidates`` for battery
            ``grid.battery_pct[b]``, RTT ``grid.rtt_ms[r]``, uplink ``grid.uplink_mbps[u]``.
        meta: free-form notes (objective, constraints).
    """

    grid: Grid
    candidates: list[str]
    choice: list[list[list[int]]]
    meta: dict[str, Any] = field(default_factory=dict)

    def around(self, c: Conditions) -> list[str]:
        """The partitions of the grid cells bracketing ``c`` (at most 2 x 2 x 2:
        uplink, RTT, battery), in candidate order. Between cells the best is
        almost always one of them (regions are contiguous; a partition winning
        only a sliver between grid points is missed), while the nearest cell
        alone can be far off on a coarse axis (RTT 200 -> 500 ms)."""
        u = _bracket(self.grid.uplink_mbps, c.uplink_mbps)
        r = _bracket(self.grid.rtt_ms, c.rtt_ms)
        b = _bracket(self.grid.battery_pct, c.battery_pct)
        picked = {self.choice[bi][ri][ui] for bi in b for ri in r for ui in u}
        return [self.candidates[i] for i in sorted(picked)]

    def wins(self) -> dict[str, int]:
        """Cells won per candidate."""
        out = {k: 0 for k in self.candidates}
        for plane in self.choice:
            for row in plane:
                for i in row:
                    out[self.candidates[i]] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``decision_table.json``)."""
        return {
            "version": 1,
            "axes": {
                "uplink_mbps": list(self.grid.uplink_mbps),
                "rtt_ms": list(self.grid.rtt_ms),
                "battery_pct": list(self.grid.battery_pct),
            },
            "order": ["battery_pct", "rtt_ms", "uplink_mbps"],
            "candidates": list(self.candidates),
            "choice": self.choice,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DecisionTable:
        """Inverse of :meth:`to_dict`.

        Raises:
            BundleError: malformed or inconsistent table.
        """
        try:
            axes = d["axes"]
            grid = Grid(
                tuple(float(x) for x in axes["uplink_mbps"]),
                tuple(float(x) for x in axes["rtt_ms"]),
                tuple(float(x) for x in axes["battery_pct"]),
            )
            cands = [str(x) for x in d["candidates"]]
            choice = [[[int(i) for i in row] for row in plane] for plane in d["choice"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"malformed decision table ({exc!r})") from exc
        shape_ok = len(choice) == len(grid.battery_pct) and all(
            len(plane) == len(grid.rtt_ms) and all(len(row) == len(grid.uplink_mbps) for row in plane)
            for plane in choice
        )
        if not shape_ok or any(not 0 <= i < len(cands) for p in choice for r in p for i in r):
            raise BundleError("decision table does not match its axes or candidates")
        return cls(grid, cands, choice, dict(d.get("meta", {})))


def build_table(
    estimate: Callable[[str, Conditions], Estimate],
    candidates: Sequence[str],
    grid: Grid,
    *,
    ref: Callable[[Conditions], Estimate],
    slo_ms: float | None = None,
    excluded: frozenset[str] = frozenset(),
    always: Sequence[str] = (),
) -> DecisionTable:
    """Evaluate every candidate in every grid cell and record the winner.

    Args:
        estimate: ``(partition id, conditions) -> Estimate``.
        candidates: ids to consider (order breaks ties).
        grid: the condition grid.
        ref: conditions -> device-only estimate (the objective's normaliser).
        slo_ms, excluded: as in :func:`pick`.
        always: ids listed as candidates even if they win nowhere (so the
            run-time fallback can still pick them, e.g. under cloud load).

    Returns:
        A table whose ``candidates`` are the ids that win somewhere plus
        ``always``, in the given order.
    """
    raw: list[list[list[str]]] = []
    for b in grid.battery_pct:
        plane = []
        for r in grid.rtt_ms:
            row = []
            for u in grid.uplink_mbps:
                c = Conditions(uplink_mbps=u, rtt_ms=r, battery_pct=b)
                ests = {k: estimate(k, c) for k in candidates}
                row.append(pick(ests, c, ref(c), slo_ms=slo_ms, excluded=excluded))
            plane.append(row)
        raw.append(plane)
    used = {k for plane in raw for row in plane for k in row}
    keep = [k for k in candidates if k in used or (k in always and k not in excluded)]
    index = {k: i for i, k in enumerate(keep)}
    choice = [[[index[k] for k in row] for row in plane] for plane in raw]
    return DecisionTable(grid, keep, choice, {"slo_ms": slo_ms, "excluded": sorted(excluded)})


def search_candidates(
    problem: CutProblem,
    device_ms: Mapping[str, float],
    cloud_ms: Mapping[str, float],
    energy: EnergyModel,
    ref_ms: float,
    *,
    uplink_mbps: Sequence[float] = Grid.uplink_mbps,
    battery_pct: Sequence[float] = (100.0, 0.0),
) -> dict[frozenset[str], tuple[DagCut, int]]:
    """Min-cut partitions that are optimal somewhere in the (uplink, battery) space.

    For each battery level, solves the DADS min-cut at both ends of the uplink
    grid and bisects only between grid points whose optimal device sets
    differ: with cost-only-by-bandwidth changes the optimal device sets are
    nested (parametric min-cut, Gallo-Grigoriadis-Tarjan), so equal ends mean
    an equal interval. RTT and downlink add the same to every offloading
    partition and do not change the min-cut.

    Args:
        problem: the model's cut problem.
        device_ms: per-unit device time estimates.
        cloud_ms: per-unit cloud time estimates.
        energy: device power figures.
        ref_ms: device-only latency (normaliser; its energy is derived).
        uplink_mbps: the uplink grid.
        battery_pct: battery levels to solve at (the objective's two extremes,
            pure latency and pure energy, by default; the table then mixes
            them over the measured candidates at every battery level).

    Returns:
        device set -> (the cut, number of grid points where it was optimal).
        Includes the empty set (cloud-only) and the full set when they win.
    """
    ref = Estimate(ref_ms, energy.compute_mw * ref_ms / 1e3, ref_ms, 0.0, 0.0)
    found: dict[frozenset[str], tuple[DagCut, int]] = {}
    grid = list(uplink_mbps)

    for b in battery_pct:
        memo: dict[int, DagCut] = {}

        def solve(i: int) -> DagCut:
            if i not in memo:
                lc = linear_costs(Conditions(uplink_mbps=grid[i], battery_pct=b), energy, ref)
                dc = {u: lc.device_per_ms * device_ms.get(u, 0.0) for u in problem.units}
                cc = {u: lc.cloud_per_ms * cloud_ms.get(u, 0.0) for u in problem.units}
                tc = {t: lc.per_byte * problem.nbytes[t] for t in problem.tensors}
                memo[i] = min_cut(problem, dc, cc, tc)
            return memo[i]

        stack = [(0, len(grid) - 1)]
        while stack:
            lo, hi = stack.pop()
            a, z = solve(lo), solve(hi)
            if hi - lo <= 1 or a.device_set == z.device_set:
                continue
            mid = (lo + hi) // 2
            stack += [(lo, mid), (mid, hi)]
        # fill the grid from the solved points (an unsolved point shares its solved neighbours' set)
        solved = sorted(memo)
        for k in range(len(grid)):
            j = max(s for s in solved if s <= k)
            cut = memo[j]
            prev = found.get(cut.device_set)
            found[cut.device_set] = (cut, (prev[1] if prev else 0) + 1)
    return found


def explain(
    table: DecisionTable,
    estimate: Callable[[str, Conditions], Estimate],
    *,
    rtt_ms: float = 20.0,
    battery_pct: float = 100.0,
) -> list[dict[str, Any]]:
    """Why each candidate wins where it does.

    For each candidate: the share of grid cells it wins, the uplink interval
    where it wins at the given RTT and battery, and its cost breakdown at the
    middle of that interval (device, transfer, cloud ms and energy).

    Returns:
        One dict per candidate: ``id``, ``cells``, ``share``, ``uplink_range``
        (``[lo, hi]`` Mbps or None), ``at`` (the conditions of the breakdown)
        and ``estimate`` (an :class:`Estimate` as dict) and ``reason`` (text).
    """
    wins = table.wins()
    total = max(1, sum(wins.values()))
    r = _nearest_log(table.grid.rtt_ms, rtt_ms)
    b = _nearest(table.grid.battery_pct, battery_pct)
    row = table.choice[b][r]
    out = []
    for i, pid in enumerate(table.candidates):
        ups = [table.grid.uplink_mbps[j] for j, k in enumerate(row) if k == i]
        info: dict[str, Any] = {"id": pid, "cells": wins[pid], "share": wins[pid] / total}
        if ups:
            mid = math.sqrt(ups[0] * ups[-1])
            c = Conditions(uplink_mbps=mid, rtt_ms=table.grid.rtt_ms[r], battery_pct=table.grid.battery_pct[b])
            e = estimate(pid, c)
            info.update(uplink_range=[ups[0], ups[-1]], at=c.__dict__, estimate=e.__dict__)
            info["reason"] = (
                f"fastest/cheapest for uplink {ups[0]:g}-{ups[-1]:g} Mbps at RTT {c.rtt_ms:g} ms, "
                f"battery {c.battery_pct:g}%: at {mid:.3g} Mbps device {e.device_ms:.2f} + network "
                f"{e.transfer_ms:.2f} + cloud {e.cloud_ms:.2f} = {e.latency_ms:.2f} ms, {e.energy_mj:.1f} mJ"
            )
        else:
            info.update(uplink_range=None, at=None, estimate=None)
            info["reason"] = (
                f"wins {wins[pid]} of {total} cells, none at RTT {table.grid.rtt_ms[r]:g} ms and "
                f"battery {table.grid.battery_pct[b]:g}% (it wins at other RTTs/battery levels)"
            )
        out.append(info)
    return out
