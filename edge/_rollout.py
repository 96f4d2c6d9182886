"""Staged rollout, A/B and shadow runs of a candidate model version: the I/O-free part.

A :class:`Rollout` holds two versions of one model, the ``stable`` one and a
``candidate``, and decides, per request, which one answers:

* mode ``"ab"``: a ``share`` (0..1) of callers get the candidate. The
  assignment is sticky: a stable hash of (caller key, model, candidate plan
  digest) puts each caller on one side for the whole rollout (a new candidate
  reshuffles). A request without a caller key gets a per-request draw.
* mode ``"shadow"``: the stable version answers every request; the candidate
  runs on the same inputs off the request's path and its answer is only
  compared (:func:`outputs_agree`).

It keeps per-version statistics (requests, errors, fallbacks, a latency window
for the p95, agreement with the stable version) and judges them against a
:class:`RolloutRule` with the pure :func:`judge`: ``"promote"``, ``"rollback"``
or None (keep going), with a reason. Like the decision core
(:mod:`splitgate.edge._decide`), it does no I/O and starts no thread; the
Gateway runs the versions and reports what happened (:meth:`Rollout.record`,
:meth:`Rollout.record_agreement`). Its random draw is injected.

:class:`RolloutMetrics` exports the statistics as Prometheus metrics
``splitgate_rollout_*{model,version}`` on a Gateway's registry.

Thread-safe.
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np

from splitgate.errors import InvalidArgument

__all__ = [
    "Rollout",
    "RolloutRule",
    "RolloutStats",
    "VersionStats",
    "Judgement",
    "RolloutMetrics",
    "judge",
    "outputs_agree",
    "sticky_fraction",
    "version_of",
    "MODES",
]

Mode = Literal["ab", "shadow"]
Arm = Literal["stable", "candidate"]
Verdict = Literal["promote", "rollback"]
#: The rollout modes (:class:`Rollout`).
MODES: tuple[str, ...] = ("ab", "shadow")
#: Comparison of a candidate's outputs with the stable version's (:func:`outputs_agree`).
COMPARISONS: tuple[str, ...] = ("auto", "top1", "allclose")
#: Characters of the plan digest that name a version (as ``ModelMetadata.versions``).
VERSION_CHARS = 12
#: :meth:`Rollout.judge` evaluates the rule once per this many recorded runs (a p95 costs ~50 us).
JUDGE_EVERY = 10


def version_of(plan_digest: str) -> str:
    """The version name of a bundle with this plan digest: its first 12 hex digits."""
    return plan_digest[:VERSION_CHARS]


@dataclass(frozen=True)
class RolloutRule:
    """When a candidate is promoted or rolled back automatically.

    Nothing is judged before both versions have ``min_requests`` requests.
    Then any breach rolls the candidate back at once; a candidate that reaches
    ``promote_after`` requests without a breach is promoted.

    Attributes:
        min_requests: requests each version must have before anything is judged.
        max_error_excess: the candidate's error rate may exceed the stable
            version's by at most this (0.01 = one point).
        max_p95_ratio: the candidate's p95 latency may be at most this many
            times the stable version's (plus ``latency_slack_ms``); None = not judged.
        latency_slack_ms: absolute slack on the p95 bound, so that a tiny
            model's microsecond jitter is not a breach.
        min_agreement: the fraction of compared requests on which the candidate
            must agree with the stable version (shadow mode compares every
            request; A/B compares none, so this is not judged there); None = not judged.
        promote_after: candidate requests without a breach before it is
            promoted; None = never promoted automatically (only rolled back).
        latency_window: the last this many latencies of each version give its
            p95 (nearest rank).
        compare: how outputs are compared (:func:`outputs_agree`): ``"auto"``,
            ``"top1"`` or ``"allclose"``.
        rtol, atol: tolerances of the ``allclose`` comparison.
    """

    min_requests: int = 100
    max_error_excess: float = 0.01
    max_p95_ratio: float | None = 1.5
    latency_slack_ms: float = 1.0
    min_agreement: float | None = 0.95
    promote_after: int | None = 1000
    latency_window: int = 500
    compare: str = "auto"
    rtol: float = 1e-3
    atol: float = 1e-5

    def validate(self) -> RolloutRule:
        """Return the rule itself if its settings are sane.

        Raises:
            InvalidArgument: a setting out of range, naming it.
        """
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise InvalidArgument(f"rollout rule: {what}")

        need(isinstance(self.min_requests, int) and self.min_requests >= 1,
             f"min_requests must be an integer >= 1, got {self.min_requests!r}")
        need(_finite(self.max_error_excess) and 0.0 <= self.max_error_excess <= 1.0,
             f"max_error_excess must be in [0, 1], got {self.max_error_excess!r}")
        need(self.max_p95_ratio is None or (_finite(self.max_p95_ratio) and self.max_p95_ratio >= 1.0),
             f"max_p95_ratio must be None or a number >= 1, got {self.max_p95_ratio!r}")
        need(_finite(self.latency_slack_ms) and self.latency_slack_ms >= 0.0,
             f"latency_slack_ms must be >= 0, got {self.latency_slack_ms!r}")
        need(self.min_agreement is None or (_finite(self.min_agreement) and 0.0 <= self.min_agreement <= 1.0),
             f"min_agreement must be None or in [0, 1], got {self.min_agreement!r}")
        need(self.promote_after is None or (isinstance(self.promote_after, int)
                                            and self.promote_after >= self.min_requests),
             f"promote_after must be None or an integer >= min_requests ({self.min_requests}), "
             f"got {self.promote_after!r}")
        need(isinstance(self.latency_window, int) and self.latency_window >= 20,
             f"latency_window must be an integer >= 20, got {self.latency_window!r}")
        need(self.compare in COMPARISONS, f"compare must be one of {list(COMPARISONS)}, got {self.compare!r}")
        need(_finite(self.rtol) and self.rtol >= 0 and _finite(self.atol) and self.atol >= 0,
             f"rtol and atol must be >= 0, got {self.rtol!r}, {self.atol!r}")
        return self


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class VersionStats:
    """One version's statistics (a snapshot; plain data).

    Attributes:
        version: the version name (:func:`version_of`).
        requests: runs of this version (answered or failed).
        errors: runs that failed.
        fallbacks: runs that finished on the device after a cloud problem.
        p95_ms: p95 latency over the last ``latency_window`` runs (None before any).
        compared: runs whose outputs were compared with the stable version's.
        agreed: compared runs that agreed.
    """

    version: str
    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    p95_ms: float | None = None
    compared: int = 0
    agreed: int = 0

    @property
    def error_rate(self) -> float:
        """errors / requests (0 before any request)."""
        return self.errors / self.requests if self.requests else 0.0

    @property
    def agreement(self) -> float | None:
        """agreed / compared (None before any comparison)."""
        return self.agreed / self.compared if self.compared else None

    def to_dict(self) -> dict[str, Any]:
        """Plain data, with ``error_rate`` and ``agreement``."""
        return {**asdict(self), "error_rate": self.error_rate, "agreement": self.agreement}


@dataclass(frozen=True)
class RolloutStats:
    """Both versions' statistics, and the mode they were gathered in."""

    mode: str
    stable: VersionStats
    candidate: VersionStats


class Judgement(NamedTuple):
    """What :func:`judge` decided: ``verdict`` ("promote", "rollback" or None) and why."""

    verdict: Verdict | None
    reason: str


def judge(stats: RolloutStats, rule: RolloutRule) -> Judgement:
    """Promote, roll back, or keep going (pure).

    Before both versions have ``rule.min_requests`` requests: None. Then, in
    this order, a rollback when the candidate's error rate exceeds the stable
    version's by more than ``max_error_excess``, its p95 latency exceeds
    ``max_p95_ratio`` x the stable p95 + ``latency_slack_ms``, or (when
    compared) its agreement is below ``min_agreement``. Without a breach, a
    promotion once the candidate has ``promote_after`` requests.

    Args:
        stats: both versions' statistics.
        rule: the thresholds.

    Returns:
        A :class:`Judgement`; its reason names the numbers it was decided on.
    """
    s, c = stats.stable, stats.candidate
    if c.requests < rule.min_requests or s.requests < rule.min_requests:
        return Judgement(None, f"waiting for {rule.min_requests} requests per version "
                               f"(stable {s.requests}, candidate {c.requests})")
    excess = c.error_rate - s.error_rate
    if excess > rule.max_error_excess:
        return Judgement("rollback", f"error rate {c.error_rate:.1%} vs stable {s.error_rate:.1%} over "
                                     f"{c.requests} requests: {excess:.1%} worse, allowed {rule.max_error_excess:.1%}")
    if rule.max_p95_ratio is not None and c.p95_ms is not None and s.p95_ms is not None:
        bound = rule.max_p95_ratio * s.p95_ms + rule.latency_slack_ms
        if c.p95_ms > bound:
            return Judgement("rollback", f"p95 latency {c.p95_ms:.2f} ms vs stable {s.p95_ms:.2f} ms: above "
                                         f"{rule.max_p95_ratio:g}x + {rule.latency_slack_ms:g} ms = {bound:.2f} ms")
    agreement = c.agreement
    if rule.min_agreement is not None and agreement is not None and c.compared >= rule.min_requests:
        if agreement < rule.min_agreement:
            return Judgement("rollback", f"agreement with stable {agreement:.1%} over {c.compared} compared "
                                         f"requests, below {rule.min_agreement:.1%}")
    if rule.promote_after is not None and c.requests >= rule.promote_after:
        parts = [f"error rate {c.error_rate:.1%} (stable {s.error_rate:.1%})"]
        if c.p95_ms is not None and s.p95_ms is not None:
            parts.append(f"p95 {c.p95_ms:.2f} ms (stable {s.p95_ms:.2f} ms)")
        if agreement is not None:
            parts.append(f"agreement {agreement:.1%}")
        return Judgement("promote", f"{c.requests} requests without a breach: " + ", ".join(parts))
    return Judgement(None, f"no breach after {c.requests} candidate requests")


def sticky_fraction(caller: str, model: str, candidate_digest: str) -> float:
    """A caller's place in [0, 1) for this model's candidate: the same on every
    call and in every process (sha256, not Python's salted ``hash``)."""
    h = hashlib.sha256(f"{caller}\x00{model}\x00{candidate_digest}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def outputs_agree(
    stable: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], *,
    compare: str = "auto", rtol: float = 1e-3, atol: float = 1e-5,
) -> bool:
    """Do two versions' outputs agree?

    ``"top1"``: the same arg-max along the last axis (the same class, per row).
    ``"allclose"``: the same shape and ``np.allclose``. ``"auto"``: top-1 for a
    classifier-shaped output (floating point, ``[batch, classes]`` with at
    least two classes), allclose for any other. Every output the stable
    version has must agree; a missing one disagrees.
    """
    for name, want in stable.items():
        got = candidate.get(name)
        if got is None:
            return False
        want, got = np.asarray(want), np.asarray(got)
        if want.shape != got.shape:
            return False
        how = compare
        if how == "auto":
            classifier = want.ndim == 2 and want.shape[1] >= 2 and np.issubdtype(want.dtype, np.floating)
            how = "top1" if classifier else "allclose"
        if how == "top1" and want.ndim >= 1 and want.shape[-1] >= 1:
            if not np.array_equal(np.argmax(want, axis=-1), np.argmax(got, axis=-1)):
                return False
        elif not np.allclose(want, got, rtol=rtol, atol=atol, equal_nan=True):
            return False
    return True


def _p95(values: deque[float]) -> float:
    """The nearest-rank 95th percentile (sorting 500 floats is ~10x faster than np.percentile)."""
    ordered = sorted(values)
    return ordered[max(math.ceil(0.95 * len(ordered)) - 1, 0)]


@dataclass
class _Tally:
    """One version's running statistics (under the Rollout's lock)."""

    version: str
    window: int
    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    compared: int = 0
    agreed: int = 0
    latencies: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.latencies = deque(maxlen=self.window)

    def snapshot(self) -> VersionStats:
        p95 = _p95(self.latencies) if self.latencies else None
        return VersionStats(self.version, self.requests, self.errors, self.fallbacks, p95, self.compared, self.agreed)


class Rollout:
    """A stable and a candidate version of one model, and how traffic is split.

    Parameters:
        model: the model name.
        stable_digest, candidate_digest: the two versions' plan digests (they differ).
        share: the candidate's share of callers in ``"ab"`` mode (0..1); ignored in shadow.
        mode: ``"ab"`` or ``"shadow"``.
        rule: when to promote or roll back (default :class:`RolloutRule`).
        draw: a uniform [0, 1) draw for requests without a caller key
            (default ``random.random``; a seeded one in tests).

    Raises:
        InvalidArgument: a share outside [0, 1], an unknown mode, a bad rule,
            or the same digest for both versions.
    """

    def __init__(
        self, model: str, stable_digest: str, candidate_digest: str, *, share: float = 0.1,
        mode: str = "ab", rule: RolloutRule | None = None, draw: Callable[[], float] = random.random,
    ) -> None:
        if not _finite(share) or not 0.0 <= share <= 1.0:
            raise InvalidArgument(f"rollout share must be a number in [0, 1], got {share!r}")
        if mode not in MODES:
            raise InvalidArgument(f"rollout mode must be one of {list(MODES)}, got {mode!r}")
        if stable_digest == candidate_digest:
            raise InvalidArgument(
                f"model '{model}': the candidate is the stable version (plan digest {version_of(stable_digest)})"
            )
        self.model = model
        self.stable_digest = stable_digest
        self.candidate_digest = candidate_digest
        self.share = float(share)
        self.mode: str = mode
        self.rule = (rule or RolloutRule()).validate()
        self._draw = draw
        self._lock = threading.Lock()
        self._tallies: dict[str, _Tally] = {
            "stable": _Tally(version_of(stable_digest), self.rule.latency_window),
            "candidate": _Tally(version_of(candidate_digest), self.rule.latency_window),
        }
        self.decided: Judgement | None = None  # set once, by the judgement that ended the rollout
        self._unjudged = 0  # runs recorded since the rule was last evaluated
        self._last = Judgement(None, "nothing judged yet")

    @property
    def stable_version(self) -> str:
        return version_of(self.stable_digest)

    @property
    def candidate_version(self) -> str:
        return version_of(self.candidate_digest)

    def assign(self, caller: str | None) -> Arm:
        """Which version answers this request: always ``"stable"`` in shadow
        mode (the candidate runs beside it); in A/B, ``"candidate"`` for a
        caller whose :func:`sticky_fraction` is below the share, or for a
        request without a caller whose draw is."""
        if self.mode == "shadow" or self.decided is not None:
            return "stable"
        u = self._draw() if caller is None else sticky_fraction(caller, self.model, self.candidate_digest)
        return "candidate" if u < self.share else "stable"

    def record(self, arm: Arm, latency_ms: float, *, error: bool = False, fallback: bool = False) -> None:
        """One run of a version: its latency (ms), whether it failed, whether it fell back."""
        with self._lock:
            tally = self._tallies[arm]
            self._unjudged += 1
            tally.requests += 1
            tally.errors += int(error)
            tally.fallbacks += int(fallback)
            if not error:
                tally.latencies.append(float(latency_ms))

    def record_agreement(self, agreed: bool) -> bool:
        """The candidate's outputs were compared with the stable version's on one request.

        Returns:
            False (nothing recorded) once a verdict ended the rollout: a shadow run
            still in flight then changes neither the statistics nor the metrics.
        """
        with self._lock:
            if self.decided is not None:
                return False
            tally = self._tallies["candidate"]
            tally.compared += 1
            tally.agreed += int(agreed)
            return True

    def stats(self) -> RolloutStats:
        """Both versions' statistics now."""
        with self._lock:
            return RolloutStats(self.mode, self._tallies["stable"].snapshot(), self._tallies["candidate"].snapshot())

    def judge(self, *, force: bool = False) -> Judgement:
        """:func:`judge` on the statistics now, once per :data:`JUDGE_EVERY`
        recorded runs (or now, with ``force``; in between, the last judgement
        without its verdict). A verdict ends the rollout: it is returned once
        (later calls return None with the same reason), so one caller acts on
        it; :meth:`assign` then answers ``"stable"``."""
        if self.decided is not None:
            return Judgement(None, self.decided.reason)
        with self._lock:
            if not force and self._unjudged < JUDGE_EVERY:
                return self._last
            self._unjudged = 0
        result = judge(self.stats(), self.rule)
        self._last = Judgement(None, result.reason)
        if result.verdict is None:
            return result
        with self._lock:
            if self.decided is not None:
                return Judgement(None, self.decided.reason)
            self.decided = result
        return result

    def describe(self) -> dict[str, Any]:
        """Plain data: mode, share, rule, versions and their statistics."""
        stats = self.stats()
        return {
            "model": self.model,
            "mode": self.mode,
            "share": self.share,
            "stable": stats.stable.to_dict(),
            "candidate": stats.candidate.to_dict(),
            "rule": asdict(self.rule),
        }


class RolloutMetrics:
    """Prometheus metrics of rollouts, labelled ``{model, version}``, on a
    Gateway's registry (one instance per registry):

    * ``splitgate_rollout_requests_total{model,version,role}`` runs of a version in a rollout
    * ``splitgate_rollout_errors_total{model,version,role}`` failed runs
    * ``splitgate_rollout_fallbacks_total{model,version,role}`` runs that fell back to the device
    * ``splitgate_rollout_latency_ms{model,version,role}`` histogram of run latency
    * ``splitgate_rollout_compared_total`` / ``splitgate_rollout_agreed_total{model,version}``
      shadow comparisons of the candidate with the stable version
    * ``splitgate_rollout_share{model,version}`` the candidate's A/B share (0 in shadow mode;
      set to 0 when the rollout ends)
    * ``splitgate_rollout_decisions_total{model,version,verdict}`` automatic or manual
      promotions and rollbacks of a candidate
    """

    _BUCKETS_MS = (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        labels = ("model", "version", "role")
        self.requests = Counter("splitgate_rollout_requests", "Runs of a model version in a rollout",
                                labels, registry=registry)
        self.errors = Counter("splitgate_rollout_errors", "Failed runs of a model version in a rollout",
                              labels, registry=registry)
        self.fallbacks = Counter("splitgate_rollout_fallbacks",
                                 "Runs of a model version in a rollout finished on the device after a cloud problem",
                                 labels, registry=registry)
        self.latency = Histogram("splitgate_rollout_latency_ms", "Latency of a model version's runs in a rollout (ms)",
                                 labels, buckets=self._BUCKETS_MS, registry=registry)
        self.compared = Counter("splitgate_rollout_compared", "Candidate runs compared with the stable version",
                                ("model", "version"), registry=registry)
        self.agreed = Counter("splitgate_rollout_agreed", "Candidate runs that agreed with the stable version",
                              ("model", "version"), registry=registry)
        self.share = Gauge("splitgate_rollout_share", "The candidate's share of A/B traffic (0 = none)",
                           ("model", "version"), registry=registry)
        self.decisions = Counter("splitgate_rollout_decisions", "Candidates promoted or rolled back",
                                 ("model", "version", "verdict"), registry=registry)

    def run(self, rollout: Rollout, arm: Arm, latency_ms: float, *, error: bool, fallback: bool) -> None:
        """Count one run of ``arm`` in ``rollout``."""
        labels = (rollout.model, rollout.stable_version if arm == "stable" else rollout.candidate_version, arm)
        self.requests.labels(*labels).inc()
        if error:
            self.errors.labels(*labels).inc()
        else:
            self.latency.labels(*labels).observe(latency_ms)
        if fallback:
            self.fallbacks.labels(*labels).inc()

    def comparison(self, rollout: Rollout, agreed: bool) -> None:
        """Count one comparison of the candidate with the stable version."""
        self.compared.labels(rollout.model, rollout.candidate_version).inc()
        if agreed:
            self.agreed.labels(rollout.model, rollout.candidate_version).inc()

    def staged(self, rollout: Rollout) -> None:
        """A candidate was staged: its share gauge."""
        self.share.labels(rollout.model, rollout.candidate_version).set(
            rollout.share if rollout.mode == "ab" else 0.0
        )

    def ended(self, rollout: Rollout, verdict: str) -> None:
        """A rollout ended (``verdict``: "promote", "rollback" or "abort")."""
        self.share.labels(rollout.model, rollout.candidate_version).set(0.0)
        self.decisions.labels(rollout.model, rollout.candidate_version, verdict).inc()
