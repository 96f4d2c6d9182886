"""The confident-on-device cascade at run time.

A bundle planned with ``--cascade`` (:mod:`splitgate.planner._cascade`) carries a
small device model and a calibrated confidence threshold. Per request the
Gateway asks the decision core (:meth:`splitgate.edge.DecisionCore.cascade_choice`)
whether running the small model first pays at the current conditions::

    expected = small-model time + (1 - exit rate) x the path's predicted time
    run the cascade when expected < the path's predicted time

where the path is the partition the policy chose (a split, ``cloud``, or
``device`` when offline: no cloud, an open breaker). When it pays, the small
model runs; a confident answer (every row's top-1 confidence at least the
threshold) is the response (``Trace.cascade = "exit"``), otherwise the request
takes the path as usual (``"through"``, the small model's time added to its
device time). The exit rate starts at the planned one and follows what the
requests show (:class:`ExitRates`, a running rate).

The arithmetic and the rate are I/O-free (used by the core, and so by the
analytic engine); :func:`cascade_first` is the Gateway's driver.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from splitgate.planner._cascade import CascadeSpec, confidence

if TYPE_CHECKING:
    from splitgate.planner import Partition, PlanBundle

__all__ = ["CascadeChoice", "ExitRates", "cascade_expected_ms", "is_confident", "cascade_first", "PRIOR_REQUESTS",
           "CASCADE_PARTITION"]

#: the planned exit rate counts as this many requests in the running rate
PRIOR_REQUESTS = 20.0
#: ``Trace.partition`` of a request the small model answered
CASCADE_PARTITION = "cascade"
_log = logging.getLogger("splitgate.edge")


def cascade_expected_ms(small_ms: float, exit_rate: float, path_ms: float) -> float:
    """Expected latency with the cascade in front of a path: the small model always
    runs, the path only for the inputs it does not answer.

    Args:
        small_ms: the small model's device time.
        exit_rate: fraction of requests it answers (0..1).
        path_ms: the path's predicted latency.

    Returns:
        ``small_ms + (1 - exit_rate) * path_ms``.
    """
    return small_ms + (1.0 - min(max(exit_rate, 0.0), 1.0)) * path_ms


@dataclass(frozen=True)
class CascadeChoice:
    """Whether to run a bundle's cascade first (:meth:`DecisionCore.cascade_choice`).

    Attributes:
        run: run the small model first.
        why: ``"pays"``, ``"does not pay"``, ``"never exits"`` (no calibration
            sample could exit within the guard) or ``"no profile"`` (no times to
            weigh: the small model runs).
        exit_rate: the exit rate used (running, from the planned one).
        small_ms: the small model's predicted device time (device factor applied), None without times.
        planned_small_ms: the same as planned for this request's shapes (no device factor).
        path_ms: the path's predicted latency, None without a profile.
        expected_ms: :func:`cascade_expected_ms`, None without times.
    """

    run: bool
    why: str
    exit_rate: float
    small_ms: float | None = None
    planned_small_ms: float | None = None
    path_ms: float | None = None
    expected_ms: float | None = None


class ExitRates:
    """The live exit rate of each bundle's cascade: a running rate that starts at the
    planned one, weighted as :data:`PRIOR_REQUESTS` requests. Thread-safe."""

    def __init__(self, prior_requests: float = PRIOR_REQUESTS) -> None:
        self.prior = prior_requests
        self._counts: dict[tuple[str, str], tuple[int, int]] = {}  # (model, digest) -> (runs, exits)
        self._lock = threading.Lock()

    def rate(self, model: str, digest: str, planned: float) -> float:
        """The exit rate now (``planned`` before any request)."""
        runs, exits = self._counts.get((model, digest), (0, 0))
        return (self.prior * planned + exits) / (self.prior + runs)

    def observe(self, model: str, digest: str, exited: bool) -> None:
        """One run of the small model: it answered (``exited``) or not."""
        with self._lock:
            runs, exits = self._counts.get((model, digest), (0, 0))
            self._counts[(model, digest)] = (runs + 1, exits + int(exited))

    def runs(self, model: str, digest: str) -> tuple[int, int]:
        """(runs, exits) seen so far."""
        return self._counts.get((model, digest), (0, 0))

    def forget(self, model: str) -> None:
        """Drop a model's counts (its plan changed)."""
        with self._lock:
            for key in [k for k in self._counts if k[0] == model]:
                del self._counts[key]


def is_confident(outputs: Mapping[str, np.ndarray], spec: CascadeSpec) -> bool:
    """Does the small model answer: is every row's top-1 confidence at least the threshold?"""
    out = outputs.get(spec.output)
    if out is None or np.size(out) == 0:
        return False
    conf = confidence(np.asarray(out), spec.confidence)
    return bool(np.all(np.isfinite(conf)) and np.all(conf >= spec.threshold))


def _intact(bundle: PlanBundle) -> bool:
    """Do the cascade's files match their sha256 in the manifest? Checked once per loaded
    bundle: the Gateway also loads bundles whose partition files are corrupt (refusing
    those partitions), and a tampered small model or threshold must not answer requests."""
    cached = bundle.__dict__.get("_cascade_intact")
    if cached is None:
        from splitgate.planner._bundle import sha256_file
        from splitgate.planner._cascade import CASCADE_FILE

        files = bundle.manifest.get("files", {})
        spec = bundle.cascade
        cached = True
        for rel in (CASCADE_FILE, spec.model if spec is not None else None):
            path = bundle.root / rel if rel else None
            if rel is None or rel not in files or path is None or not path.is_file() or sha256_file(path) != files[rel]:
                cached = False
                _log.warning("model '%s': the cascade's %s fails its sha256 check; the cascade is off", bundle.model_name, rel)
                break
        bundle.__dict__["_cascade_intact"] = cached
    return bool(cached)


@dataclass
class CascadeRun:
    """What running the small model in front of a request gave.

    Attributes:
        outputs: the small model's outputs when it answered, else None.
        ms: its device time.
    """

    outputs: dict[str, np.ndarray] | None
    ms: float


def cascade_first(core: Any, bundle: PlanBundle, part: Partition, feeds: dict[str, np.ndarray], trace: Any,
                  costs: Any, *, private: bool = False) -> CascadeRun | None:
    """The Gateway's cascade step, before it runs the chosen partition ``part``.

    Asks the decision core whether the cascade pays; if so runs the small
    model on the device (padded to its planned time when the Gateway emulates
    the device) and sets ``trace.cascade``; counts the outcome
    (``splitgate_cascade_total{model,outcome}``: exit, through, skipped, error).

    Args:
        core: the Gateway's core (its ``decisions``, ``metrics``, ``battery``, ``config``, ``_device``).
        bundle: the version answering.
        part: the partition the policy chose (the path).
        feeds: the validated inputs.
        trace: the request's trace.
        costs: the request's cost entries.
        private: the request is private (the path is chosen accordingly).

    Returns:
        None when the cascade did not run; else the :class:`CascadeRun`
        (``outputs`` None: take the path).
    """
    spec = bundle.cascade
    if spec is None:
        return None
    model = bundle.model_name
    if not _intact(bundle):
        core.metrics.cascade.labels(model, "error").inc()
        return None
    choice = core.decisions.cascade_choice(bundle, part.id, costs, private=private,
                                           battery_pct=core.battery.level())
    if choice is None or not choice.run:
        core.metrics.cascade.labels(model, "skipped").inc()
        return None
    from splitgate._ort_errors import RunSite
    from splitgate.errors import SplitgateError

    target = choice.planned_small_ms if core.config.device_time_from_profile else None
    try:
        outputs, ms = core._device(bundle.cascade_path, feeds, target,  # noqa: SLF001 - the Gateway's device leg
                                   RunSite(model, CASCADE_PARTITION, "full model", "device"))
    except SplitgateError as exc:  # the small model failing is no reason to fail the request: take the path
        _log.warning("model '%s': the cascade model failed, taking the path: %s", model, exc)
        core.metrics.cascade.labels(model, "error").inc()
        return None
    exited = is_confident(outputs, spec)
    core.decisions.cascade_done(bundle, exited, ms, choice.planned_small_ms)
    trace.cascade = "exit" if exited else "through"
    return CascadeRun({k: outputs[k] for k in (o.name for o in bundle.outputs)} if exited else None, ms)
