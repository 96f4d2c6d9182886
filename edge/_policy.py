"""Which partition to run now: a decision-table lookup with hysteresis."""

from __future__ import annotations

import threading

from planner import Conditions, PlanBundle

__all__ = ["Policy"]


class Policy:
    """Pick a partition per request from the bundle's decision table.

    The table's choice replaces the current partition only when it is predicted
    (from the bundle's profile, under the same conditions) to be faster by more
    than ``hysteresis``, so noise in the estimates does not make the edge flap.

    Parameters:
        hysteresis: fraction by which a new partition must beat the current one.
    """

    def __init__(self, hysteresis: float = 0.1) -> None:
        self.hysteresis = hysteresis
        self._current: dict[str, str] = {}
        self._lock = threading.Lock()

    def current(self, model: str) -> str | None:
        return self._current.get(model)

    def choose(self, bundle: PlanBundle, conditions: Conditions) -> str:
        """Return the partition id to run for ``bundle`` under ``conditions``."""
        if not bundle.has_profile:
            return "device"  # no profile: nothing to trade off; stay local
        best = bundle.choose(conditions)
        model = bundle.model_name
        with self._lock:
            current = self._current.get(model)
            if current is not None and current != best and current in bundle.partitions:
                allowed = not (conditions.privacy and bundle.partition(current).kind == "cloud")
                if allowed:
                    now = bundle.estimate(current, conditions).latency_ms
                    new = bundle.estimate(best, conditions).latency_ms
                    if new > now * (1 - self.hysteresis):
                        best = current
            self._current[model] = best
        return best
