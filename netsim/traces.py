"""Network traces: link conditions over time, generators and loaders.

A :class:`Trace` is a step function: each :class:`TracePoint` holds from its
time until the next one (the last holds to the end, ``duration_s``). Both
experiment engines read the same trace: the live engine plays it into
:class:`ShapingProxy` objects with :class:`splitgate.netsim.ScheduleDriver`; the
analytic engine integrates transfers over it (:meth:`Trace.transfer_end`).

Generators: :func:`constant`, :func:`steps`, :func:`random_walk`,
:func:`with_outages`. Files: :func:`load_csv` / :func:`save_csv` (this
package's own format) and loaders for two public throughput-log formats,
:func:`load_riiser` and :func:`load_ghent`; :func:`load` picks by content.

Public log formats (one line per ~1 s sample, whitespace-separated):

* **Riiser et al. HSDPA logs** ("Commute Path Bandwidth Traces from 3G
  Networks", MMSys'13; Telenor 3G/HSDPA around Oslo, bus/metro/tram/train/ferry):
  1 Unix time (s); 2 monotonic time (ms since an unspecified start);
  3 GPS latitude; 4 GPS longitude (decimal degrees); 5 bytes received since
  the previous line; 6 ms elapsed since the previous line (= diff of column 2).
* **Ghent 4G/LTE logs** (van der Hooft et al., "HTTP/2-Based Adaptive
  Streaming of HEVC Video over 4G/LTE Networks", IEEE Comm. Letters 2016;
  Ghent, Belgium, by foot/bicycle/bus/tram/train/car): 1 ms since the epoch;
  2 ms since the start of the experiment; 3 GPS latitude; 4 GPS longitude;
  5 bytes received since the previous line; 6 ms since the previous line.

Both logs measure *download* throughput (a file fetched over HTTP). The
loaders use ``bytes * 8 / ms`` as the link's rate: as the downlink, and as the
uplink scaled by ``uplink_ratio`` (default: the 4G profile's up/down ratio
for Ghent, the 3G profile's for Riiser). Samples with no bytes (a tunnel)
become outages if ``zero_is_outage``. The repository ships small *synthetic*
samples in these formats under ``netsim/traces/`` (never the real datasets).
"""

from __future__ import annotations

import bisect
import csv
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from splitgate.netsim._proxy import LinkConditions
from splitgate.netsim.profiles import NetworkProfile, profile

__all__ = [
    "TracePoint",
    "Trace",
    "constant",
    "steps",
    "random_walk",
    "with_outages",
    "load",
    "load_csv",
    "save_csv",
    "load_riiser",
    "load_ghent",
    "SAMPLES",
]

#: The synthetic sample traces shipped with the package.
SAMPLES = Path(__file__).resolve().parent / "traces"


@dataclass(frozen=True)
class TracePoint:
    """Link conditions from time ``t_s`` on (until the next point).

    Attributes:
        t_s: seconds from the start of the trace.
        uplink_mbps, downlink_mbps: bandwidths.
        rtt_ms, jitter_ms: delay.
        loss: packet loss probability (see :class:`LinkConditions`).
        outage: nothing passes.
        radio: radio power model for energy (``lte``, ``3g``, ``wifi``), or ``""``.
        label: a name to show on plots (``"3g"``, ``"tunnel"``), or ``""``.
    """

    t_s: float
    uplink_mbps: float
    downlink_mbps: float
    rtt_ms: float
    jitter_ms: float = 0.0
    loss: float = 0.0
    outage: bool = False
    radio: str = ""
    label: str = ""

    def conditions(self) -> LinkConditions:
        """These conditions for a :class:`ShapingProxy`."""
        return LinkConditions(
            uplink_mbps=self.uplink_mbps, downlink_mbps=self.downlink_mbps, rtt_ms=self.rtt_ms,
            jitter_ms=self.jitter_ms, outage=self.outage, loss=self.loss,
        )

    def rate(self, direction: str) -> float:
        """Bytes per second in ``"up"`` or ``"down"`` direction (0 during an outage)."""
        if self.outage:
            return 0.0
        mbps = self.uplink_mbps if direction == "up" else self.downlink_mbps
        return mbps * 1e6 / 8.0


@dataclass(frozen=True)
class Trace:
    """A step function of :class:`TracePoint`, sorted by time, starting at 0.

    Attributes:
        points: the steps.
        duration_s: length of the trace (the last point holds until then).
        name: a label for reports.
    """

    points: tuple[TracePoint, ...]
    duration_s: float
    name: str = "trace"

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a trace needs at least one point")
        times = [p.t_s for p in self.points]
        if times != sorted(times) or times[0] != 0.0:
            raise ValueError("trace points must be sorted by time and start at t=0")
        if self.duration_s <= times[-1] and len(times) > 1:
            raise ValueError(f"duration_s {self.duration_s} must exceed the last point's time {times[-1]}")
        object.__setattr__(self, "_times", times)

    def index(self, t: float) -> int:
        """Index of the point in force at time ``t``."""
        return max(0, bisect.bisect_right(self._times, t) - 1)  # type: ignore[attr-defined]

    def at(self, t: float) -> TracePoint:
        """The conditions in force at ``t`` seconds (the last point after the end)."""
        return self.points[self.index(t)]

    def end_of(self, i: int) -> float:
        """When point ``i`` stops holding (infinity for the last one: it persists)."""
        return self.points[i + 1].t_s if i + 1 < len(self.points) else math.inf

    def transfer_end(self, t0: float, nbytes: float, direction: str) -> float:
        """When ``nbytes`` started at ``t0`` have left the link, integrating the
        step-wise rate (zero in outages); infinity if an outage never ends."""
        remaining = float(nbytes)
        t = t0
        i = self.index(t0)
        while True:
            rate = self.points[i].rate(direction)
            end = self.end_of(i)
            if rate > 0:
                need = remaining / rate
                if t + need <= end:
                    return t + need
                remaining -= rate * (end - t)
            if math.isinf(end):
                return math.inf
            t = end
            i += 1

    def outage_end(self, t: float) -> float:
        """The first time >= ``t`` when the link is up (``t`` if it is up now)."""
        i = self.index(t)
        while self.points[i].outage:
            end = self.end_of(i)
            if math.isinf(end):
                return math.inf
            t, i = end, i + 1
        return t

    def scaled(self, time_scale: float) -> Trace:
        """The same trace played ``time_scale`` times slower (0.5 = twice as fast)."""
        pts = tuple(replace(p, t_s=p.t_s * time_scale) for p in self.points)
        return Trace(pts, self.duration_s * time_scale, self.name)

    def clipped(self, duration_s: float) -> Trace:
        """The first ``duration_s`` seconds."""
        pts = tuple(p for p in self.points if p.t_s < duration_s)
        return Trace(pts, duration_s, self.name)

    def radio_changes(self) -> list[float]:
        """Times at which the radio technology changes (``wifi`` -> ``lte``):
        the network changes a device's OS reports to apps. Points without a
        radio (loaded logs) never count."""
        return [b.t_s for a, b in zip(self.points, self.points[1:]) if a.radio and b.radio and a.radio != b.radio]

    def uplinks(self) -> list[float]:
        return [p.uplink_mbps for p in self.points]


# -- generators ------------------------------------------------------------------


def _point(t: float, prof: NetworkProfile, **changes: object) -> TracePoint:
    base = TracePoint(t, prof.uplink_mbps, prof.downlink_mbps, prof.rtt_ms, prof.jitter_ms,
                      radio=prof.radio, label=prof.name)
    return replace(base, **changes)  # type: ignore[arg-type]


def constant(prof: str | NetworkProfile, duration_s: float, **changes: object) -> Trace:
    """One profile for the whole trace (``changes`` override its fields, e.g. ``rtt_ms``)."""
    prof = profile(prof) if isinstance(prof, str) else prof
    return Trace((_point(0.0, prof, **changes),), duration_s, f"constant-{prof.name}")


def steps(segments: Sequence[tuple[str | NetworkProfile, float]] | Sequence[dict], name: str = "steps") -> Trace:
    """Step changes between profiles: ``[("wifi", 10), ("3g", 10), ...]`` (profile, seconds),
    or dicts ``{"profile": "3g", "duration_s": 10, "rtt_ms": 120, "outage": false}``."""
    pts, t = [], 0.0
    for seg in segments:
        if isinstance(seg, dict):
            seg = dict(seg)
            prof = seg.pop("profile", None)
            dur = float(seg.pop("duration_s"))
            base = profile(prof) if isinstance(prof, str) else prof
            if base is None:
                pts.append(TracePoint(t_s=t, **seg))
            else:
                pts.append(_point(t, base, **seg))
        else:
            prof, dur = seg
            pts.append(_point(t, profile(prof) if isinstance(prof, str) else prof))
        t += dur
    return Trace(tuple(pts), t, name)


def random_walk(
    prof: str | NetworkProfile,
    duration_s: float,
    *,
    step_s: float = 1.0,
    sigma: float = 0.35,
    low: float | None = None,
    high: float | None = None,
    seed: int = 0,
) -> Trace:
    """A log-space random walk of the bandwidth around a profile (both directions move together).

    Each ``step_s`` the log of the bandwidth moves by a normal step of ``sigma``
    and is pulled back towards the profile's value (mean reversion 0.1), clipped
    to [low, high] (default: profile / 20 .. profile x 4). RTT stays the profile's.
    """
    prof = profile(prof) if isinstance(prof, str) else prof
    rng = random.Random(seed)
    lo = low if low is not None else prof.uplink_mbps / 20
    hi = high if high is not None else prof.uplink_mbps * 4
    ratio = prof.downlink_mbps / prof.uplink_mbps
    x = 0.0
    pts = []
    n = max(1, int(math.ceil(duration_s / step_s)))
    for i in range(n):
        up = min(hi, max(lo, prof.uplink_mbps * math.exp(x)))
        pts.append(_point(i * step_s, prof, uplink_mbps=round(up, 4), downlink_mbps=round(up * ratio, 4)))
        x += rng.gauss(0.0, sigma) - 0.1 * x
    return Trace(tuple(pts), duration_s, f"walk-{prof.name}")


def with_outages(trace: Trace, outages: Iterable[tuple[float, float]], name: str | None = None) -> Trace:
    """The trace with full outages ``[(start_s, duration_s), ...]`` cut into it (tunnels)."""
    pts = list(trace.points)
    for start, dur in outages:
        start, end = float(start), float(start) + float(dur)
        current = Trace(tuple(pts), trace.duration_s, trace.name)
        at_start, at_end = current.at(start), current.at(end)
        pts = [p for p in pts if not (start <= p.t_s < end)]
        pts.append(replace(at_start, t_s=start, outage=True, label="outage"))
        if end < trace.duration_s and not any(p.t_s == end for p in pts):
            pts.append(replace(at_end, t_s=end))
        pts.sort(key=lambda p: p.t_s)
    return Trace(tuple(pts), trace.duration_s, name or f"{trace.name}+outages")


# -- files -------------------------------------------------------------------------

_CSV_FIELDS = [f.name for f in fields(TracePoint)]


def save_csv(trace: Trace, path: str | Path) -> Path:
    """Write this package's CSV format: a header of :class:`TracePoint` fields,
    one row per step, and a final row ``t_s=duration`` with ``label=end``."""
    path = Path(path)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=_CSV_FIELDS)
        w.writeheader()
        for p in trace.points:
            w.writerow(asdict(p))
        w.writerow({**asdict(trace.points[-1]), "t_s": trace.duration_s, "label": "end"})
    return path


def load_csv(path: str | Path) -> Trace:
    """Read the CSV format of :func:`save_csv`. Columns: ``t_s, uplink_mbps,
    downlink_mbps, rtt_ms`` (required) and ``jitter_ms, loss, outage, radio,
    label`` (optional). A last row labelled ``end`` gives the duration
    (otherwise the last step lasts as long as the one before it)."""
    path = Path(path)
    pts: list[TracePoint] = []
    end: float | None = None
    with path.open(newline="") as fh:
        for row in csv.DictReader(line for line in fh if not line.startswith("#")):
            if row.get("label") == "end":
                end = float(row["t_s"])
                continue
            pts.append(TracePoint(
                t_s=float(row["t_s"]), uplink_mbps=float(row["uplink_mbps"]),
                downlink_mbps=float(row.get("downlink_mbps") or row["uplink_mbps"]),
                rtt_ms=float(row["rtt_ms"]), jitter_ms=float(row.get("jitter_ms") or 0.0),
                loss=float(row.get("loss") or 0.0),
                outage=str(row.get("outage", "")).strip().lower() in ("1", "true", "yes"),
                radio=row.get("radio") or "", label=row.get("label") or "",
            ))
    if end is None:
        end = pts[-1].t_s + (pts[-1].t_s - pts[-2].t_s if len(pts) > 1 else 1.0)
    return Trace(tuple(pts), end, path.stem)


def _load_log(
    path: str | Path, prof: NetworkProfile, *, time_col_ms: bool, uplink_ratio: float | None,
    rtt_ms: float | None, zero_is_outage: bool, max_s: float | None,
) -> Trace:
    ratio = uplink_ratio if uplink_ratio is not None else prof.uplink_mbps / prof.downlink_mbps
    rtt = prof.rtt_ms if rtt_ms is None else rtt_ms
    pts: list[TracePoint] = []
    t = 0.0
    for line in Path(path).read_text().splitlines():
        cols = line.split()
        if len(cols) < 6 or line.lstrip().startswith("#"):
            continue
        nbytes, ms = float(cols[4]), float(cols[5])
        if ms <= 0:
            continue
        mbps = nbytes * 8 / (ms * 1e3)
        out = zero_is_outage and nbytes == 0
        down = max(mbps, 0.001)
        pts.append(TracePoint(round(t, 3), round(down * ratio, 4), round(down, 4), rtt, prof.jitter_ms,
                              outage=out, radio=prof.radio, label="outage" if out else prof.name))
        t += ms / 1e3
        if max_s is not None and t >= max_s:
            break
    if not pts:
        raise ValueError(f"{path}: no samples (expected 6 whitespace-separated columns per line)")
    return Trace(tuple(pts), round(t, 3), Path(path).stem)


def load_riiser(path: str | Path, *, uplink_ratio: float | None = None, rtt_ms: float | None = None,
                zero_is_outage: bool = True, max_s: float | None = None) -> Trace:
    """Load a Riiser et al. HSDPA log (columns in the module docs) as a 3G trace."""
    return _load_log(path, profile("3g"), time_col_ms=False, uplink_ratio=uplink_ratio, rtt_ms=rtt_ms,
                     zero_is_outage=zero_is_outage, max_s=max_s)


def load_ghent(path: str | Path, *, uplink_ratio: float | None = None, rtt_ms: float | None = None,
               zero_is_outage: bool = True, max_s: float | None = None) -> Trace:
    """Load a Ghent 4G/LTE log (columns in the module docs) as a 4G trace."""
    return _load_log(path, profile("4g"), time_col_ms=True, uplink_ratio=uplink_ratio, rtt_ms=rtt_ms,
                     zero_is_outage=zero_is_outage, max_s=max_s)


def load(path: str | Path, fmt: str = "auto", **kwargs: object) -> Trace:
    """Load a trace file: ``csv``, ``riiser``, ``ghent`` or ``auto`` (CSV by a
    header; a log whose first column is in ms since the epoch (> 1e12) is Ghent,
    else Riiser). Relative paths are also looked up in :data:`SAMPLES`."""
    path = Path(path)
    if not path.exists() and (SAMPLES / path).exists():
        path = SAMPLES / path
    if fmt == "auto":
        head = next((ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")), "")
        if "," in head:
            fmt = "csv"
        else:
            fmt = "ghent" if float(head.split()[0]) > 1e12 else "riiser"
    if fmt == "csv":
        return load_csv(path)
    if fmt == "riiser":
        return load_riiser(path, **kwargs)  # type: ignore[arg-type]
    if fmt == "ghent":
        return load_ghent(path, **kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown trace format {fmt!r} (csv, riiser, ghent, auto)")
