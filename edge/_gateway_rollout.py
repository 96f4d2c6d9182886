"""The Gateway's staged rollouts: a candidate version next to the stable one,
routed by caller (A/B) or run in its shadow, judged by :class:`RolloutRule`.

:class:`RolloutCore` is a part of the Gateway's core (``_Core`` inherits it);
the decisions themselves (split, statistics, the rule) are the I/O-free
:mod:`splitgate.edge._rollout`; this module does the running they ask for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from splitgate.edge._rollout import Rollout, RolloutRule, outputs_agree, version_of
from splitgate.errors import FailedPrecondition, InvalidArgument, ModelRunError, NotFound
from splitgate.planner import PlanBundle

if TYPE_CHECKING:
    from splitgate.edge._gateway import Result

_log = logging.getLogger("splitgate.edge")


@dataclass
class _Staged:
    """A model's staged candidate version and its rollout (:meth:`Gateway.stage_candidate`)."""

    bundle: PlanBundle
    rollout: Rollout
    shadows: int = 0  # shadow runs queued or running
    lock: threading.Lock = field(default_factory=threading.Lock)


def _request_fault(exc: BaseException) -> bool:
    """Is this the request's own fault (bad inputs, an unknown partition) rather than
    a failure of the version that ran it? A model failing on valid inputs is not."""
    return isinstance(exc, (InvalidArgument, NotFound)) and not isinstance(exc, ModelRunError)


def _same_interface(stable: PlanBundle, candidate: PlanBundle) -> str | None:
    """Why ``candidate`` cannot stand in for ``stable`` (inputs or outputs differ), or None."""
    for what, mine, theirs in (("inputs", stable.inputs, candidate.inputs),
                               ("outputs", stable.outputs, candidate.outputs)):
        a = [(t.name, t.datatype, tuple(t.shape)) for t in mine]
        b = [(t.name, t.datatype, tuple(t.shape)) for t in theirs]
        if a != b:
            return f"its {what} {b} differ from the stable version's {a}"
    return None


class RolloutCore:
    """The rollout half of the Gateway's core (mixed into ``_Core``, whose
    attributes it uses: ``bundles``, ``rollouts``, ``config``, ``_pool`` ...)."""

    # -- staged rollout -------------------------------------------------------------

    def stage_candidate(
        self, model: str, source: str | Path, *, share: float = 0.1, shadow: bool = False,
        rule: RolloutRule | None = None,
    ) -> dict[str, Any]:
        """Load a candidate version of ``model`` next to its stable one and start
        routing to it (:class:`~splitgate.edge._rollout.Rollout`). The candidate is
        loaded as :meth:`update_bundle` loads a new version: whole, authentic,
        smoke-run. Returns :meth:`rollout_status`.

        Raises:
            NotFound: ``model`` is not loaded.
            BundleError: the candidate fails its integrity, signature or smoke check.
            InvalidArgument: it is another model, has other inputs or outputs, is
                the stable version, lives in the stable version's directory, or
                a bad share or rule.
            FailedPrecondition: a candidate of ``model`` is already staged.
        """
        stable = self.bundle(model)
        if not isinstance(shadow, bool):
            raise InvalidArgument(f"shadow must be a bool, got {shadow!r}")
        candidate = self._load_candidate(source)
        if candidate.model_name != model:
            raise InvalidArgument(f"bundle {candidate.root} is model '{candidate.model_name}', not '{model}'")
        if (why := _same_interface(stable, candidate)) is not None:
            raise InvalidArgument(f"candidate {candidate.root} cannot stand in for '{model}': {why}")
        if candidate.root.resolve() == stable.root.resolve():
            raise InvalidArgument(
                f"candidate of '{model}' is in the stable version's directory {stable.root}: stage it from its own"
            )
        rollout = Rollout(model, stable.plan_digest, candidate.plan_digest, share=share,
                          mode="shadow" if shadow else "ab", rule=rule)
        with self._swap_lock:
            if model in self.rollouts:
                raise FailedPrecondition(
                    f"model '{model}' already has a candidate staged "
                    f"({self.rollouts[model].rollout.candidate_version}): promote or abort it first"
                )
            self.rollouts[model] = _Staged(candidate, rollout)
            self.rollout_ended.pop(model, None)
        self.rollout_metrics.staged(rollout)
        _log.info("rollout of model '%s': candidate %s staged next to %s (%s)", model, rollout.candidate_version,
                  rollout.stable_version, "shadow" if shadow else f"A/B share {rollout.share:g}")
        return self.rollout_status(model)

    def promote(self, model: str) -> PlanBundle:
        """Make ``model``'s candidate its stable version (the old one is kept for
        :meth:`rollback_bundle`); returns it.

        Raises:
            NotFound: no candidate of ``model`` is staged.
        """
        return self._end_rollout(model, "promote", "promoted by hand")

    def abort_candidate(self, model: str) -> PlanBundle:
        """Drop ``model``'s candidate (a rollback); returns the stable version, which keeps serving.

        Raises:
            NotFound: no candidate of ``model`` is staged.
        """
        return self._end_rollout(model, "abort", "aborted by hand")

    def rollout_status(self, model: str) -> dict[str, Any]:
        """Plain data about ``model``'s rollout: ``state`` ("none", "staged",
        "promoted", "rolled_back", "aborted"), mode, share, the rule, both
        versions' statistics, and the reason of the last judgement.

        Raises:
            NotFound: ``model`` is not loaded.
        """
        stable = self.bundle(model)
        staged = self.rollouts.get(model)
        if staged is not None:
            judgement = staged.rollout.decided
            return {"state": "staged", **staged.rollout.describe(), "candidate_root": str(staged.bundle.root),
                    "reason": judgement.reason if judgement else None}
        if model in self.rollout_ended:
            return dict(self.rollout_ended[model])
        return {"state": "none", "model": model, "stable": {"version": version_of(stable.plan_digest)}}

    def _end_rollout(self, model: str, verdict: str, reason: str, staged: _Staged | None = None) -> PlanBundle:
        """End ``model``'s rollout (``staged``: only if it is still that one):
        ``promote`` swaps the candidate in, ``rollback``/``abort`` drop it.
        Returns the version now serving."""
        with self._swap_lock:
            current = self.rollouts.get(model)
            if current is None or (staged is not None and current is not staged):
                if staged is not None:  # (another thread ended it already)
                    return self.bundle(model)
                raise NotFound(f"model '{model}' has no candidate staged")
            del self.rollouts[model]
            rollout, candidate = current.rollout, current.bundle
            if verdict == "promote":
                old = self.bundles[model]
                self.previous[model] = (old, self.refused.get(model, {}))
                self.refused[model] = {}
                self.bundles[model] = candidate
            state = {"promote": "promoted", "rollback": "rolled_back"}.get(verdict, "aborted")
            self.rollout_ended[model] = {"state": state, **rollout.describe(),
                                         "candidate_root": str(candidate.root), "reason": reason}
        if verdict == "promote":
            self._forget_costs(model)  # (as update_bundle: the model's plan changed)
        else:
            self._evict_sessions(candidate)
        self.rollout_metrics.ended(rollout, verdict)
        (_log.info if verdict == "promote" else _log.warning)(
            "rollout of model '%s': candidate %s %s: %s", model, rollout.candidate_version, state.replace("_", " "),
            reason,
        )
        return self.bundles[model]

    def _rollout_infer(
        self, staged: _Staged, inputs: Mapping[str, Any], *, partition: str | None, deadline_ms: float | None,
        private: bool | None, caller: str | None,
    ) -> Result:
        """Route a request of a model with a staged candidate.

        A/B: the candidate answers the callers :meth:`Rollout.assign` gives it;
        when it fails (other than on the request's own fault), the failure
        counts against it and the stable version answers in the time left.
        Shadow: the stable version answers; the candidate runs the same inputs
        in the pool and its outputs are compared. Each run is counted for its
        version; then the rule is judged and may promote or roll back."""
        rollout = staged.rollout
        stable = self.bundle(rollout.model)
        if stable.plan_digest != rollout.stable_digest:  # update_bundle/add_bundle replaced it underneath
            self._end_rollout(rollout.model, "abort", "the stable version was replaced during the rollout", staged)
            return self._infer_version(stable, inputs, partition=partition, deadline_ms=deadline_ms, private=private)
        budget_ms = deadline_ms if deadline_ms is not None else self.config.deadline_ms
        start = time.perf_counter()
        if rollout.assign(caller) == "candidate":
            try:
                result = self._infer_version(
                    staged.bundle, inputs, partition=partition, deadline_ms=deadline_ms, private=private,
                )
            except Exception as exc:  # noqa: BLE001 - a candidate's failure never fails the request
                if not _request_fault(exc):
                    self._rollout_run(staged, "candidate", 0.0, error=True)
                if budget_ms > 0:  # (the stable version gets the time left, at least 1 ms)
                    deadline_ms = max(budget_ms - (time.perf_counter() - start) * 1e3, 1.0)
            else:
                self._rollout_run(staged, "candidate", result.trace.total_ms, fallback=bool(result.trace.fallback))
                return result
        try:
            result = self._infer_version(stable, inputs, partition=partition, deadline_ms=deadline_ms, private=private)
        except Exception as exc:
            if not _request_fault(exc):
                self._rollout_run(staged, "stable", 0.0, error=True)
            raise
        self._rollout_run(staged, "stable", result.trace.total_ms, fallback=bool(result.trace.fallback))
        if rollout.mode == "shadow":
            self._shadow_later(staged, inputs, result.outputs, partition=partition, private=private)
        return result

    def _rollout_run(self, staged: _Staged, arm: str, latency_ms: float, *, error: bool = False,
                     fallback: bool = False) -> None:
        """Count one run of a version, then judge the rollout and act on a verdict."""
        rollout = staged.rollout
        rollout.record(arm, latency_ms, error=error, fallback=fallback)  # type: ignore[arg-type]
        self.rollout_metrics.run(rollout, arm, latency_ms, error=error, fallback=fallback)  # type: ignore[arg-type]
        verdict, reason = rollout.judge()
        if verdict is not None:
            self._end_rollout(rollout.model, verdict, reason, staged)

    def _shadow_later(
        self, staged: _Staged, inputs: Mapping[str, Any], stable_outputs: Mapping[str, np.ndarray], *,
        partition: str | None, private: bool | None,
    ) -> None:
        """Run the candidate on a copy of the request's inputs in the pool, off the
        request's path; skipped while ``max_concurrency`` shadow runs are queued
        (the candidate must not build a backlog behind the stable version)."""
        with staged.lock:
            if staged.shadows >= self.config.max_concurrency:
                return
            staged.shadows += 1
        feeds = {name: np.array(value, copy=True) for name, value in inputs.items()}
        want = {name: np.array(value, copy=True) for name, value in stable_outputs.items()}
        try:
            self._pool.submit(self._shadow_run, staged, feeds, want, partition, private)
        except RuntimeError:  # the pool is shut down (closing)
            with staged.lock:
                staged.shadows -= 1

    def _shadow_run(
        self, staged: _Staged, feeds: dict[str, np.ndarray], want: dict[str, np.ndarray],
        partition: str | None, private: bool | None,
    ) -> None:
        try:
            if self.rollouts.get(staged.rollout.model) is not staged:
                return  # the rollout ended meanwhile
            rule = staged.rollout.rule
            try:
                result = self._infer_version(staged.bundle, feeds, partition=partition, private=private)
            except Exception as exc:  # noqa: BLE001 - counted against the candidate; no request waits on it
                if not _request_fault(exc):
                    self._rollout_run(staged, "candidate", 0.0, error=True)
                return
            agreed = outputs_agree(want, result.outputs, compare=rule.compare, rtol=rule.rtol, atol=rule.atol)
            if staged.rollout.record_agreement(agreed):  # (not once a verdict ended the rollout)
                self.rollout_metrics.comparison(staged.rollout, agreed)
            self._rollout_run(staged, "candidate", result.trace.total_ms, fallback=bool(result.trace.fallback))
        finally:
            with staged.lock:
                staged.shadows -= 1
