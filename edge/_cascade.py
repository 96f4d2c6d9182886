"""The confident-on-device cascade at run time.

A bundle planned with ``--cascade`` (:mod:`splitgate.planner._cascade`) carries a
small device model and a calibrated confidence threshold. Per request the
Gateway asks the decision core (:meth:`splitgate.edge.DecisionCore.cascade_choice`)
whether running the small model first pays at the current conditions::

    expected = small-model time + (1 - exit rate) x the path's predicted time
    run the cascade when expected < the path's predicted time

where the path is the partition the policy chose (a split, ``cloud``, or
``device`` when offline: no cloud, an open breaker) and the exit rate is the
fraction of *rows* the small model answers. When it pays, the small model runs
on the whole request, and each row whose top-1 confidence is at least the
threshold is answered by it:

* every row confident: its outputs are the response (``Trace.cascade = "exit"``);
* none: the request takes the path as usual (``"through"``, the small model's
  time added to its device time);
* some (``"partial"``): only the unsure rows take the path, sliced along the
  batch axis, and the response is reassembled in the request's row order
  (``Trace.cascade_rows_exited`` says how many rows the small model answered).
  Only for a batch-major request (:func:`batch_rows`: every input and output
  has a dynamic first dimension, and every input and every small-model output
  has as many rows as the request); otherwise a batch exits only when every
  row is confident, as a single-row request does.

The exit rate starts at the planned one and follows the rows the requests
show (:class:`ExitRates`, a running rate).

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

__all__ = ["CascadeChoice", "ExitRates", "cascade_expected_ms", "is_confident", "confident_rows", "batch_rows",
           "cascade_first", "cascade_rest", "merge_rows", "CascadeRun", "PartialExit", "PRIOR_REQUESTS", "CASCADE_PARTITION"]

#: the planned exit rate counts as this many rows in the running rate
PRIOR_REQUESTS = 20.0
#: ``Trace.partition`` of a request the small model answered
CASCADE_PARTITION = "cascade"
#: a cascade skipped because its live exit rate is too low still runs on every
#: this-many-th such request, so the rate is measured again (traffic changes);
#: only where it could pay at all (the small model faster than the path)
EXPLORE_EVERY = 16
#: rows of weight the live exit rate keeps (the prior's included): older rows fade
RATE_WINDOW = 100.0
_log = logging.getLogger("splitgate.edge")


def cascade_expected_ms(small_ms: float, exit_rate: float, path_ms: float) -> float:
    """Expected latency with the cascade in front of a path: the small model always
    runs, the path only for the inputs it does not answer.

    Args:
        small_ms: the small model's device time.
        exit_rate: fraction of rows it answers (0..1): the path runs the rest
            (a batch-major request sends on only its unsure rows).
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
            sample could exit within the guard), ``"no profile"`` (no times to
            weigh: the small model runs) or ``"explore"`` (it does not pay at the
            live exit rate but would at a higher one: every :data:`EXPLORE_EVERY`-th
            such request runs it, so the rate can recover).
        exit_rate: the row exit rate used (running, from the planned one).
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
    """The live row exit rate of each bundle's cascade: a running rate that starts at
    the planned one (a per-sample rate), weighted as :data:`PRIOR_REQUESTS` rows, and
    counts the rows the small model answered among the rows it ran on. Past
    :data:`RATE_WINDOW` rows of weight, the prior and the counts are scaled down
    together, so the rate follows the recent rows (inputs drift, and back).
    Thread-safe."""

    def __init__(self, prior_requests: float = PRIOR_REQUESTS, window: float = RATE_WINDOW) -> None:
        self.prior = prior_requests
        self.window = max(window, prior_requests)
        self._counts: dict[tuple[str, str], tuple[int, int]] = {}  # (model, digest) -> (rows, rows exited)
        # (model, digest) -> the rate's weights: (prior, rows, rows exited), scaled to the window
        self._weights: dict[tuple[str, str], tuple[float, float, float]] = {}
        self._skipped: dict[tuple[str, str], int] = {}  # (model, digest) -> skips since the last run
        self._lock = threading.Lock()

    def explore(self, model: str, digest: str, every: int = EXPLORE_EVERY) -> bool:
        """The cascade was skipped for its live exit rate: is this the ``every``-th skip
        since it last ran (then run it: a rate only runs update would never recover)?"""
        if every <= 0:
            return False
        with self._lock:
            n = self._skipped.get((model, digest), 0) + 1
            self._skipped[(model, digest)] = 0 if n >= every else n
            return n >= every

    def rate(self, model: str, digest: str, planned: float) -> float:
        """The exit rate now (``planned`` before any request)."""
        prior, rows, exits = self._weights.get((model, digest), (self.prior, 0.0, 0.0))
        return (prior * planned + exits) / (prior + rows)

    def observe(self, model: str, digest: str, exited: bool, rows: int = 1, rows_exited: int | None = None) -> None:
        """One run of the small model on ``rows`` rows.

        Args:
            model, digest: the version.
            exited: it answered the whole request.
            rows: rows it ran on.
            rows_exited: rows it answered (default: all of them when ``exited``, else none).
        """
        answered = (rows if exited else 0) if rows_exited is None else rows_exited
        n, k = max(1, rows), max(0, min(answered, rows))
        with self._lock:
            key = (model, digest)
            self._skipped.pop(key, None)
            seen, exits = self._counts.get(key, (0, 0))
            self._counts[key] = (seen + n, exits + k)
            prior, w_rows, w_exits = self._weights.get(key, (self.prior, 0.0, 0.0))
            w_rows, w_exits = w_rows + n, w_exits + k
            total = prior + w_rows
            scale = min(1.0, self.window / total)
            self._weights[key] = (prior * scale, w_rows * scale, w_exits * scale)

    def runs(self, model: str, digest: str) -> tuple[int, int]:
        """(rows, rows exited) seen so far."""
        return self._counts.get((model, digest), (0, 0))

    def forget(self, model: str) -> None:
        """Drop a model's counts (its plan changed)."""
        with self._lock:
            for key in [k for k in self._counts if k[0] == model]:
                del self._counts[key]
            for key in [k for k in self._skipped if k[0] == model]:
                del self._skipped[key]
            for key in [k for k in self._weights if k[0] == model]:
                del self._weights[key]


def is_confident(outputs: Mapping[str, np.ndarray], spec: CascadeSpec) -> bool:
    """Does the small model answer: is every row's top-1 confidence at least the threshold?"""
    rows = confident_rows(outputs, spec)
    return rows is not None and bool(rows.all())


def confident_rows(outputs: Mapping[str, np.ndarray], spec: CascadeSpec) -> np.ndarray | None:
    """Which rows of the small model's classifier output it answers.

    Returns:
        bool ``[rows]``: top-1 confidence finite and at least the threshold; None
        when the output is missing or empty.
    """
    out = outputs.get(spec.output)
    if out is None or np.size(out) == 0:
        return None
    conf = confidence(np.asarray(out), spec.confidence)
    return np.isfinite(conf) & (conf >= spec.threshold)


def batch_rows(bundle: PlanBundle, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> int | None:
    """The request's batch size when it can be answered row by row, else None.

    Batch-major: every model input and output is declared with a dynamic first
    dimension, and every input of the request and every one of the small model's
    outputs has the same number of rows (at least 2).

    Args:
        bundle: the version answering (its declared inputs and outputs).
        feeds: the request's validated inputs.
        outputs: the small model's outputs on them.
    """
    specs = [*bundle.inputs, *bundle.outputs]
    if not specs or any(len(s.shape) == 0 or s.shape[0] >= 0 for s in specs):
        return None
    arrays = [feeds.get(s.name) for s in bundle.inputs] + [outputs.get(s.name) for s in bundle.outputs]
    if any(a is None or np.ndim(a) == 0 for a in arrays):
        return None
    n = {int(np.shape(a)[0]) for a in arrays}
    return n.pop() if len(n) == 1 and min(n) >= 2 else None


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
class PartialExit:
    """A batch the small model answered in part (``Trace.cascade = "partial"``).

    Attributes:
        exited: bool ``[rows]``: the rows it answered.
        small: its outputs on every row (the model's outputs only).
        rest: the request's inputs of the other rows, in order (what the path runs).
        feeds: the whole request (run on the path if the path's outputs cannot be merged).
    """

    exited: np.ndarray
    small: dict[str, np.ndarray]
    rest: dict[str, np.ndarray]
    feeds: dict[str, np.ndarray]


@dataclass
class CascadeRun:
    """What running the small model in front of a request gave.

    Attributes:
        outputs: the small model's outputs when it answered every row, else None.
        ms: its device time.
        partial: the rows it answered when it answered some of a batch-major
            request (the path runs the others: :func:`cascade_rest`), else None.
    """

    outputs: dict[str, np.ndarray] | None
    ms: float
    partial: PartialExit | None = None


def cascade_first(core: Any, bundle: PlanBundle, part: Partition, feeds: dict[str, np.ndarray], trace: Any,
                  costs: Any, *, private: bool = False) -> CascadeRun | None:
    """The Gateway's cascade step, before it runs the chosen partition ``part``.

    Asks the decision core whether the cascade pays; if so runs the small
    model on the device (padded to its planned time when the Gateway emulates
    the device), sets ``trace.cascade`` (``exit``, ``partial``, ``through``) and
    ``trace.cascade_rows_exited``, and tells the core how many rows it answered;
    counts the outcomes that do not reach the trace
    (``splitgate_cascade_total{model,outcome}``: skipped, error).

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
        (``outputs`` None and ``partial`` None: take the path; ``partial``: take
        it for the unsure rows, :func:`cascade_rest`).
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
    sure = confident_rows(outputs, spec)
    rows = 1 if sure is None else len(sure)
    answered = 0 if sure is None else int(sure.sum())
    names = [o.name for o in bundle.outputs]
    partial = None
    if 0 < answered < rows:
        if batch_rows(bundle, feeds, outputs) == rows:
            rest = {k: np.ascontiguousarray(v[~sure]) for k, v in feeds.items()}
            partial = PartialExit(sure, {k: outputs[k] for k in names}, rest, feeds)
        else:  # not batch-major: the rows cannot be sent on alone, so the batch exits all or nothing
            _note_all_or_nothing(bundle)
            answered = 0
    exited = answered == rows and sure is not None
    core.decisions.cascade_done(bundle, exited, ms, choice.planned_small_ms, rows=rows, rows_exited=answered)
    trace.cascade = "exit" if exited else "partial" if partial is not None else "through"
    trace.cascade_rows_exited = answered
    return CascadeRun({k: outputs[k] for k in names} if exited else None, ms, partial)


def _note_all_or_nothing(bundle: PlanBundle) -> None:
    """Log once per loaded bundle that its requests exit all or nothing (not batch-major)."""
    if not bundle.__dict__.get("_cascade_all_or_nothing_noted"):
        bundle.__dict__["_cascade_all_or_nothing_noted"] = True
        _log.info("model '%s': a batch is not batch-major (every input and output with the request's rows "
                  "along a dynamic first dimension): the cascade answers a batch only when every row is "
                  "confident", bundle.model_name)


def cascade_rest(core: Any, bundle: PlanBundle, part: Partition, run: CascadeRun, trace: Any,
                 deadline: float, *, private: bool = False) -> dict[str, np.ndarray]:
    """A partial exit: run the path on the unsure rows and reassemble the response.

    The path runs as any request of those rows would (its own cost entries, so the
    device learner compares like with like); the small model's time is added to the
    trace's device time. If the path's outputs do not have the rest's rows and the
    small model's trailing shapes (a model that is batch-major in its declared
    shapes only), the whole request runs on the path instead (``"through"``).

    Args:
        core: the Gateway's core (``request_costs``, ``_run``).
        bundle: the version answering.
        part: the path.
        run: the cascade's run (``run.partial`` set).
        trace: the request's trace.
        deadline: the request's deadline (``time.perf_counter`` seconds).
        private: the request is private.

    Returns:
        The model's outputs, every row in the request's order.

    Raises:
        SplitgateError: the path failed (as :meth:`Gateway.infer` raises it).
    """
    partial = run.partial
    assert partial is not None
    rest = core._run(bundle, part, partial.rest, trace, deadline, private=private,
                     costs=core.request_costs(bundle, partial.rest))
    merged = merge_rows(partial.exited, partial.small, rest)
    if merged is None:
        _log.warning("model '%s': partition '%s' did not answer the unsure rows row by row; running the whole "
                     "request on it", bundle.model_name, part.id)
        trace.cascade, trace.cascade_rows_exited = "through", 0
        merged = core._run(bundle, part, partial.feeds, trace, deadline, private=private,
                           costs=core.request_costs(bundle, partial.feeds))
    trace.device_ms += run.ms
    return merged


def merge_rows(exited: np.ndarray, small: Mapping[str, np.ndarray],
               rest: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The response of a partial exit: row ``i`` from ``small`` where ``exited[i]``, else the
    next row of ``rest`` (the path's outputs on the unsure rows, in order).

    Returns:
        Every output with all rows (the path's dtype), or None when an output of
        ``rest`` lacks, has too few or too many rows, or differs in its trailing shape.
    """
    out: dict[str, np.ndarray] = {}
    n_rest = int((~exited).sum())
    for name, mine in small.items():
        theirs = rest.get(name)
        if theirs is None or np.ndim(theirs) != np.ndim(mine) or np.ndim(mine) == 0 or \
                np.shape(theirs)[0] != n_rest or np.shape(theirs)[1:] != np.shape(mine)[1:]:
            return None
        theirs = np.asarray(theirs)
        merged = np.empty(np.shape(mine), dtype=theirs.dtype)
        merged[exited] = mine[exited]
        merged[~exited] = theirs
        out[name] = merged
    return out
