"""Drift: how far recent requests have moved from what a model was planned on.

A bundle planned with real calibration inputs carries reference statistics
(``reference.json``, :mod:`splitgate.planner._reference`): binned input
element values, per-request input means and standard deviations, and for
classifiers the top-1 confidence distribution and the class histogram. A
:class:`DriftMonitor` bins each answered request the same way
(:meth:`ReferenceStats.request_counts`: a few hundred sub-sampled elements per
input) and keeps the bin counts of a sliding window of recent requests. The
request's thread only copies those elements (and the classifier outputs); a
worker thread bins them (tens of microseconds a request), off the request path. Its score per signal is the population
stability index of the window against the reference; the model's drift score
is the largest of them, and the report names the signal that drives it.

Why PSI: it compares two binned distributions with nothing but a few numpy
operations on at most ten bins per signal (the edge stays small: no scipy), it
is symmetric, it reads the same for every signal (input values, confidences,
classes), and practitioners share a reading of it: below 0.1 no meaningful
shift, 0.1-0.25 a moderate shift worth watching, above 0.25 a significant
shift (the default threshold, ``GatewayConfig.drift_threshold``). A
two-sample test (Kolmogorov-Smirnov) would answer "is there any difference"
and, over windows of hundreds of requests, says yes to differences too small
to matter; PSI measures how large the difference is.

PSI = sum over bins of (a - e) * ln(a / e), a the window's share of a bin and
e the reference's; both are smoothed (0.5 added to each window count, the
reference floored at 1e-4) so an empty bin gives a large, finite score. With
a finite window the score of an unchanged distribution is not 0 but about
``(bins - 1) * (1 / n_reference + 1 / n_window)``; the reference's bin counts
are chosen so that stays well under 0.1 for a 256-request window and a
reference of a few hundred calibration samples.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from splitgate.planner._reference import ReferenceStats

__all__ = ["DriftHub", "DriftMonitor", "DriftReport", "psi"]

_log = logging.getLogger("splitgate.edge.drift")
#: the model's score as a ``signal`` label value of ``splitgate_drift_score``.
MAX_SIGNAL = "max"
#: the callback re-arms once the score falls below this fraction of the threshold.
REARM_FRACTION = 0.8
#: versions of one model whose windows are kept (the current one, a candidate, the previous).
_VERSIONS_KEPT = 3
#: requests waiting for the drift worker beyond which new ones are left out.
MAX_PENDING = 256


def psi(expected: Any, counts: Any) -> float:
    """Population stability index of window ``counts`` (per bin) against reference shares ``expected``.

    Both are smoothed: the window's counts get 0.5 each, the reference's shares a floor of 1e-4.
    Returns 0.0 for an empty window.
    """
    e = np.maximum(np.asarray(expected, dtype=np.float64), 1e-4)
    e = e / e.sum()
    c = np.asarray(counts, dtype=np.float64)
    if c.sum() <= 0:
        return 0.0
    a = (c + 0.5) / (c.sum() + 0.5 * c.size)
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass(frozen=True)
class DriftReport:
    """A model's drift now.

    Attributes:
        model: the model.
        version: the plan digest (first 12 characters) whose reference is compared against.
        score: the largest signal score (PSI); None until the window holds ``min_requests``.
        signal: the signal with that score (``input:x``, ``confidence:y``, ...).
        scores: every signal's PSI.
        requests: requests in the window.
        threshold: the score at which the model counts as drifted.
        source: where the reference inputs came from (a calibration file, ``--sample``, ``arrays``).
    """

    model: str
    version: str
    score: float | None
    signal: str | None
    scores: dict[str, float] = field(default_factory=dict)
    requests: int = 0
    threshold: float = 0.25
    source: str = ""

    @property
    def drifted(self) -> bool:
        """True when the score is at or over the threshold."""
        return self.score is not None and self.score >= self.threshold


class DriftMonitor:
    """The drift of one model version: reference statistics and a sliding window of requests.

    Parameters:
        reference: the version's reference statistics.
        window: requests kept (the oldest leaves as a new one arrives).
        min_requests: no score before the window holds this many requests.
        threshold: PSI at which the model counts as drifted.
        model, version: for the reports.

    Thread-safe.

    Raises:
        ValueError: a window or ``min_requests`` below 1, or ``min_requests`` above ``window``.
    """

    def __init__(self, reference: ReferenceStats, *, window: int = 256, min_requests: int = 64,
                 threshold: float = 0.25, model: str = "", version: str = "") -> None:
        if window < 1 or not 1 <= min_requests <= window:
            raise ValueError(f"drift window {window} and min_requests {min_requests}: need 1 <= min <= window")
        self.reference = reference
        self.window = window
        self.min_requests = min_requests
        self.threshold = threshold
        self.model = model
        self.version = version
        self._expected = {n: np.asarray(s.freq) for n, s in reference.signals.items()}
        self._sums = {n: np.zeros(s.bins, dtype=np.int64) for n, s in reference.signals.items()}
        self._recent: collections.deque[dict[str, np.ndarray]] = collections.deque()
        self._lock = threading.Lock()

    def observe(self, feeds: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Add one answered request (its validated inputs and its outputs) to the window."""
        counts = self.reference.request_counts(feeds, outputs)
        with self._lock:
            self._recent.append(counts)
            for name, c in counts.items():
                self._sums[name] += c
            if len(self._recent) > self.window:
                for name, c in self._recent.popleft().items():
                    self._sums[name] -= c

    def scores(self) -> dict[str, float]:
        """Every signal's PSI over the window (signals no request of the window fed are left out)."""
        with self._lock:
            sums = {n: s.copy() for n, s in self._sums.items() if s.any()}
        return {n: round(psi(self._expected[n], s), 6) for n, s in sums.items()}

    def report(self) -> DriftReport:
        """The drift now (score None while the window holds fewer than ``min_requests``)."""
        with self._lock:
            n = len(self._recent)
        scores = self.scores() if n >= self.min_requests else {}
        signal = max(scores, key=lambda k: scores[k]) if scores else None
        return DriftReport(self.model, self.version, scores[signal] if signal else None, signal, scores, n,
                           self.threshold, self.reference.source)

    def reset(self) -> None:
        """Forget the window."""
        with self._lock:
            self._recent.clear()
            for s in self._sums.values():
                s[:] = 0


DriftCallback = Callable[[DriftReport], None]


class DriftHub:
    """The Gateway's drift monitors (per model and version), their gauges and the callbacks.

    Parameters:
        registry: the Gateway's Prometheus registry (``splitgate_drift_score{model,signal}``,
            ``splitgate_drift_window_requests{model}``, ``splitgate_drift_alerts_total{model}``).
        threshold, window, min_requests: :class:`DriftMonitor` settings.
        check_every: score (gauges, callbacks) every this many requests of a model.
    """

    def __init__(self, registry: Any, *, threshold: float = 0.25, window: int = 256, min_requests: int = 64,
                 check_every: int = 8) -> None:
        from prometheus_client import Counter, Gauge

        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"drift threshold must be a positive number, got {threshold!r}")
        self.threshold, self.window, self.min_requests = threshold, window, min(min_requests, window)
        self.check_every = max(1, check_every)
        self.score_gauge = Gauge(
            "splitgate_drift_score",
            "Population stability index of recent requests against the plan's reference, per signal "
            "(signal=max: the model's drift score)", ("model", "signal"), registry=registry,
        )
        self.window_gauge = Gauge("splitgate_drift_window_requests", "Requests in the drift window",
                                  ("model",), registry=registry)
        self.alerts = Counter("splitgate_drift_alerts", "Times the drift score crossed the threshold",
                              ("model",), registry=registry)
        self._monitors: dict[tuple[str, str], DriftMonitor | None] = {}
        self._seen: dict[tuple[str, str], int] = {}
        self._armed: dict[str, bool] = {}
        self._callbacks: list[DriftCallback] = []
        self._exported: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition()
        self._pending: collections.deque[tuple] = collections.deque()
        self._busy = False
        self._worker: threading.Thread | None = None
        #: requests left out because the worker was behind (``MAX_PENDING`` waiting).
        self.skipped = 0

    def on_drift(self, callback: DriftCallback) -> None:
        """Call ``callback(report)`` when a model's score crosses the threshold (again after it fell
        below ``0.8 x threshold``). It runs on the drift worker thread: keep it short."""
        with self._lock:
            self._callbacks.append(callback)

    def monitor(self, bundle: Any) -> DriftMonitor | None:
        """The monitor of a bundle version (None when the bundle has no usable reference)."""
        key = (bundle.model_name, bundle.plan_digest)
        with self._lock:
            if key in self._monitors:
                return self._monitors[key]
        try:
            ref = bundle.reference
        except Exception as exc:  # noqa: BLE001 - a bad reference disables drift, never a request
            _log.warning("drift unavailable for '%s': %s", bundle.model_name, exc)
            ref = None
        mon = None if ref is None else DriftMonitor(
            ref, window=self.window, min_requests=self.min_requests, threshold=self.threshold,
            model=bundle.model_name, version=bundle.plan_digest[:12])
        with self._lock:
            mon = self._monitors.setdefault(key, mon)
            versions = [k for k in self._monitors if k[0] == key[0]]
            for old in versions[:-_VERSIONS_KEPT]:
                self._monitors.pop(old, None)
                self._seen.pop(old, None)
        return mon

    def observe(self, bundle: Any, feeds: Mapping[str, Any], outputs: Mapping[str, Any], *,
                current: bool = True) -> None:
        """Add one answered request of ``bundle``. On the request's thread this only copies what
        the reference reads (:meth:`ReferenceStats.sample`: a few microseconds); a worker thread
        bins it and, every ``check_every`` requests of the model's ``current`` version, updates
        the gauges and fires the callbacks on a threshold crossing. While more than
        :data:`MAX_PENDING` requests wait for the worker, new ones are left out (a sub-sample)."""
        mon = self.monitor(bundle)
        if mon is None:
            return
        ins, outs = mon.reference.sample(feeds, outputs)
        with self._idle:
            if len(self._pending) >= MAX_PENDING:
                self.skipped += 1
                return
            self._pending.append((mon, (bundle.model_name, bundle.plan_digest), ins, outs, current))
            self._idle.notify_all()
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="splitgate-drift", daemon=True)
                self._worker.start()

    def _work(self) -> None:
        """Bin waiting requests; exit after a second with nothing to do (started again on demand)."""
        while True:
            with self._idle:
                if not self._pending:
                    self._idle.wait(timeout=1.0)
                if not self._pending:
                    self._worker = None
                    self._idle.notify_all()
                    return
                mon, key, ins, outs, current = self._pending.popleft()
                self._busy = True
            try:
                mon.observe(ins, outs)
                with self._lock:
                    seen = self._seen[key] = self._seen.get(key, 0) + 1
                if current and seen % self.check_every == 0:
                    self.check(mon)
            except Exception:  # noqa: BLE001 - drift must never take the Gateway down
                _log.exception("drift observation failed")
            finally:
                with self._idle:
                    self._busy = False
                    self._idle.notify_all()

    def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until the worker has binned every waiting request (at most ``timeout_s``)."""
        with self._idle:
            self._idle.wait_for(lambda: not self._pending and not self._busy, timeout=timeout_s)

    def check(self, mon: DriftMonitor) -> DriftReport:
        """Score ``mon`` now: set its gauges, fire the callbacks on a crossing; return the report."""
        report = mon.report()
        model = mon.model
        self.window_gauge.labels(model).set(report.requests)
        if report.score is None:
            return report
        with self._lock:
            stale = self._exported.get(model, set()) - set(report.scores)
            self._exported[model] = set(report.scores)
            armed = self._armed.get(model, True)
            fire = armed and report.drifted
            if fire:
                self._armed[model] = False
            elif not armed and report.score < REARM_FRACTION * self.threshold:
                self._armed[model] = True
            callbacks = list(self._callbacks) if fire else []
        for signal in stale:
            self.score_gauge.remove(model, signal)
        self.score_gauge.labels(model, MAX_SIGNAL).set(report.score)
        for signal, value in report.scores.items():
            self.score_gauge.labels(model, signal).set(value)
        if fire:
            self.alerts.labels(model).inc()
            _log.warning("model '%s' drifted: PSI %.3f on %s (threshold %.3g, %d requests)",
                         model, report.score, report.signal, self.threshold, report.requests)
        for cb in callbacks:
            try:
                cb(report)
            except Exception:  # noqa: BLE001 - a failing callback must not fail the request
                _log.exception("drift callback failed")
        return report

    def report(self, bundle: Any) -> DriftReport | None:
        """The drift of ``bundle``'s version now, every request answered so far counted
        (None without a reference)."""
        mon = self.monitor(bundle)
        if mon is None:
            return None
        self.flush()
        return self.check(mon)
