"""Per-request records, their energy, CSV output and summaries."""

from __future__ import annotations

import csv
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from splitgate.planner import RADIOS, EnergyModel, PlanBundle

__all__ = ["Record", "request_energy_mj", "energy_model", "write_csv", "read_csv", "summarize", "Summary",
           "adaptive_vs_static", "paired_ratio"]


@dataclass
class Record:
    """One request of one policy in one engine.

    Times in ms (``t_s``: trace seconds when it started), bytes per request;
    ``uplink_mbps``/``downlink_mbps``/``rtt_ms``/``label`` are the trace's true
    conditions at the start; ``fallback`` is the Gateway's reason (or "").
    """

    engine: str
    policy: str
    rep: int
    seq: int
    t_s: float
    label: str
    uplink_mbps: float
    downlink_mbps: float
    rtt_ms: float
    outage: bool
    partition: str
    latency_ms: float
    energy_mj: float
    device_ms: float
    network_ms: float
    cloud_ms: float
    bytes_sent: int
    bytes_received: int
    fallback: str


def energy_model(bundle: PlanBundle) -> EnergyModel:
    """The bundle's energy figures (the planner's cost model)."""
    return EnergyModel.from_dict((bundle.profile or {}).get("energy", {}))


def request_energy_mj(
    em: EnergyModel,
    radio: str,
    *,
    device_ms: float,
    latency_ms: float,
    bytes_sent: int,
    bytes_received: int,
    uplink_mbps: float,
    downlink_mbps: float,
) -> float:
    """Device energy of one request (planner cost model, Huang et al. radio power).

    compute power x device time + radio power x transfer time (bytes at the
    true link rate; ``P = αu·tu + αd·td + β``) + idle power x the rest of the
    request (RTT, cloud compute, waiting).
    """
    r = RADIOS.get(radio) if radio else None
    rp = r or em.radio_for(uplink_mbps)
    t_up = bytes_sent * 8 / (uplink_mbps * 1e3) if bytes_sent and uplink_mbps > 0 else 0.0
    t_down = bytes_received * 8 / (downlink_mbps * 1e3) if bytes_received and downlink_mbps > 0 else 0.0
    wait = max(latency_ms - device_ms - t_up - t_down, 0.0)
    uj = (em.compute_mw * device_ms + rp.power_mw(uplink_mbps, 0.0) * t_up
          + rp.power_mw(0.0, downlink_mbps) * t_down + em.idle_mw * wait)
    return uj / 1e3


_FIELDS = [f.name for f in fields(Record)]


def write_csv(records: Iterable[Record], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=_FIELDS)
        w.writeheader()
        for r in records:
            row = asdict(r)
            for k in ("latency_ms", "energy_mj", "device_ms", "network_ms", "cloud_ms"):
                row[k] = round(row[k], 3)
            w.writerow(row)
    return path


def read_csv(path: str | Path) -> list[Record]:
    out = []
    types = {f.name: f.type for f in fields(Record)}
    with Path(path).open(newline="") as fh:
        for row in csv.DictReader(fh):
            kw: dict = {}
            for k, v in row.items():
                t = types[k]
                kw[k] = (int(v) if t == "int" else float(v) if t == "float"
                         else v == "True" if t == "bool" else v)
            out.append(Record(**kw))
    return out


@dataclass
class Summary:
    """Aggregate of one (engine, policy)."""

    engine: str
    policy: str
    n: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    energy_mj: float
    kb_sent: float
    fallbacks: int
    partitions: str


def _pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    i = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[i]


def summarize(records: Iterable[Record]) -> list[Summary]:
    """One :class:`Summary` per (engine, policy), in first-seen order."""
    groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for r in records:
        groups[(r.engine, r.policy)].append(r)
    out = []
    for (engine, policy), rs in groups.items():
        lat = [r.latency_ms for r in rs]
        parts = Counter(r.partition for r in rs)
        top = ", ".join(f"{p} {100 * c / len(rs):.0f}%" for p, c in parts.most_common(3))
        out.append(Summary(
            engine, policy, len(rs), statistics.fmean(lat), statistics.median(lat), _pct(lat, 0.95),
            statistics.fmean(r.energy_mj for r in rs), statistics.fmean(r.bytes_sent for r in rs) / 1024,
            sum(1 for r in rs if r.fallback), top,
        ))
    return out


def adaptive_vs_static(summaries: Sequence[Summary], engine: str) -> tuple[str, float, float] | None:
    """(best static policy, its mean ms, adaptive mean / best static mean) for an engine.

    The static policies are device-only, cloud-only and the DADS plan. When two
    of them ran the very same single partition (the DADS plan for the nominal
    link is often ``cloud``), they are one policy measured twice: their
    requests are pooled (named ``"cloud=dads"``) rather than the luckier run
    taken as the best, which would bias the comparison against adaptive.
    """
    by = {s.policy: s for s in summaries if s.engine == engine}
    statics = [by[p] for p in ("device", "cloud", "dads") if p in by]
    if "adaptive" not in by or not statics:
        return None
    pooled: dict[str, tuple[str, int, float]] = {}  # the one partition run -> (names, n, summed ms)
    for s in statics:
        key = s.partitions if s.partitions.endswith(" 100%") and "," not in s.partitions else s.policy
        name, n, total = pooled.get(key, ("", 0, 0.0))
        pooled[key] = (f"{name}={s.policy}" if name else s.policy, n + s.n, total + s.n * s.mean_ms)
    best, n, total = min(pooled.values(), key=lambda v: v[2] / max(v[1], 1))
    mean = total / max(n, 1)
    return best, mean, by["adaptive"].mean_ms / mean


def paired_ratio(records: Iterable[Record], engine: str, policies: Sequence[str], interval_s: float) -> float | None:
    """Adaptive's latency against ``policies``' on the very same requests.

    Requests start on the spec's grid, but a request still running at a slot
    makes its policy skip that slot, so two policies' means are over
    different request sets: a policy whose requests fit the slot on a slow
    link is sampled there more often than one whose requests overrun it.
    This pairs each request of ``policies`` with adaptive's request of the
    same replay and slot (``t_s`` rounded to ``interval_s``) and returns
    adaptive's summed latency over those pairs / theirs (None: no pairs).
    """
    step = interval_s if interval_s > 0 else 1e-3

    def slot(r: Record) -> tuple[int, int]:
        return r.rep, round(r.t_s / step)

    records = [r for r in records if r.engine == engine]
    adaptive = {slot(r): r.latency_ms for r in records if r.policy == "adaptive"}
    ours = theirs = 0.0
    for r in records:
        if r.policy in policies and slot(r) in adaptive:
            ours += adaptive[slot(r)]
            theirs += r.latency_ms
    return ours / theirs if theirs > 0 else None
