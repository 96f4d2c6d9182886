"""What the edge knows about its own speed: measured device times against the plan.

The planner profiled each partition's prefix once (on this machine, scaled, or
on the device itself). At run time the device is rarely that device: another
app takes a core, the SoC throttles when it heats up, the battery saver caps
the clock. :class:`DeviceCosts` learns, from every device leg the Gateway
runs, how far the device is from its plan (ANS, WWW'21; DVFO: learn device
costs online), and hands the decision two numbers:

* a **device factor** per model (``Conditions.device_factor``): how many times
  slower than planned the device is now, learned from everything the model
  runs on the device -- a prefix, the full model, a local suffix, a probe;
* a **relative ratio** per partition: how much slower than the device factor
  says this particular partition runs (a small prefix whose fixed overheads
  the profile undercounted, an operator the throttled core handles worse).
  It multiplies the partition's ``device_ms`` in the cost entries, so the
  estimate is ``planned x ratio x factor``: the partition's own measured ratio
  while it is fresh, the device factor alone for partitions not run lately.

Why a factor times a relative ratio, not a ratio per partition alone: when the
device slows down the Gateway stops running its device-heavy partitions, so
their own ratios go stale exactly when they matter -- measured during the slow
spell, they would keep the device partition looking 3x slower long after the
device recovered. Here what ran (even a small prefix) moves the shared factor,
and every partition follows it; a partition's relative ratio is a property of
the partition, not of the device's state, so it survives the device changing
speed. It still decays towards 1 (half-life ``half_life_s``) when the
partition is not run: then the device factor alone speaks for it.

How a recovery is seen when nothing runs on the device (the Gateway picked
``cloud``): by a **device probe** (:meth:`note_offloaded`). After
``probe_every`` requests of a model with no device work, the Gateway runs the
model's cheapest prefix twice on the request's own inputs, in the background
(while the request waits for the cloud, off its path), and records the faster
run as one sample -- confirmed, i.e. a step it shows is believed at once, when
the two agree. The cost is bounded: one small prefix (a few percent of the
model) twice per ``probe_every`` offloaded requests, one probe at a time.
Letting a stale factor decay back to the plan was the alternative; it costs a
whole device run on the request path each time the decay guesses wrong (every
half-life, while the device stays slow), where a probe costs a small prefix
off the path.

Estimators: :class:`~splitgate.edge._monitor.Ewma` with a tight outlier guard
(``step_ratio``): a sample further than that from the estimate is held back;
a second one on the same side confirms a step, and the estimate jumps to them
(so a 3x slowdown is believed on its second sample, the third request runs on
its decision); a lone spike (a GC pause, a page fault) is dropped. Changes
smaller than ``step_ratio`` are averaged in with ``alpha``. Each device sample
updates the model's factor with its ratio divided by the partition's relative
ratio (so partitions with different relative ratios agree on the factor), then
the partition's relative ratio with its ratio divided by the new factor, more
slowly (``rel_alpha``): a change seen through one partition alone cannot say
whether the device or the partition changed, and the device is the likelier.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from splitgate.edge._monitor import Ewma

__all__ = ["DeviceCosts", "DeviceSample", "suffix_key"]

# Ratios outside this range are measurement accidents (a clock jump), not a device.
_MIN_RATIO, _MAX_RATIO = 1e-3, 1e3


def suffix_key(partition_id: str) -> str:
    """The learner's key for a partition's suffix run locally (a fallback)."""
    return f"{partition_id}/suffix"


@dataclass(frozen=True)
class DeviceSample:
    """One learned figure, for inspection: ``value`` and when it was last updated."""

    value: float
    samples: int
    age_s: float


class _Ratio:
    """A partition's relative ratio and when it was last measured."""

    def __init__(self, alpha: float, step_ratio: float) -> None:
        self.ewma = Ewma(alpha=alpha, outlier_ratio=step_ratio)
        self.at = -math.inf


class DeviceCosts:
    """Learn the device's speed against the plan, per model and partition; thread-safe.

    Parameters:
        alpha: weight of a new sample within ``step_ratio`` of the device factor.
        rel_alpha: the same for a partition's relative ratio (smaller: a gradual
            change goes to the device factor, which every partition follows).
        step_ratio: a sample this many times off the estimate (either way) is
            held back until a second one on the same side confirms a step.
        half_life_s: a partition's relative ratio decays towards 1 (the
            device factor alone) with this half-life while it is not run.
        min_planned_ms: device legs planned shorter than this are not learned
            from (timer and scheduling noise would dominate their ratio).
        probe_every: offloaded requests (no device work) of a model after
            which a device probe is due (:meth:`note_offloaded`); 0 = never.
        clock: seconds, monotonic (injected for tests).
    """

    def __init__(
        self, *, alpha: float = 0.3, rel_alpha: float = 0.1, step_ratio: float = 1.5, half_life_s: float = 60.0,
        min_planned_ms: float = 1.0, probe_every: int = 3, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not step_ratio > 1.0:
            raise ValueError(f"step_ratio must be > 1, got {step_ratio}")
        self.alpha = alpha
        self.rel_alpha = rel_alpha
        self.step_ratio = step_ratio
        self.half_life_s = half_life_s
        self.min_planned_ms = min_planned_ms
        self.probe_every = probe_every
        self._clock = clock
        self._factor: dict[str, Ewma] = {}
        self._factor_at: dict[str, float] = {}
        self._ratios: dict[tuple[str, str], _Ratio] = {}
        self._offloaded: dict[str, int] = {}
        self._lock = threading.Lock()

    # -- learning -----------------------------------------------------------------

    def observe(self, model: str, key: str, measured_ms: float, planned_ms: float, *, confirmed: bool = False) -> bool:
        """Record one device leg: ``key`` (a partition id, or :func:`suffix_key`)
        of ``model`` took ``measured_ms`` where the plan says ``planned_ms`` for
        this request's shapes. ``confirmed``: a checked measurement (two probe
        runs that agree): a step it shows is believed at once.

        Returns:
            True if it was learned from (False: a non-finite time, planned
            below ``min_planned_ms``, or the key's first run, which is cold).
        """
        if not (math.isfinite(measured_ms) and math.isfinite(planned_ms)) or planned_ms < self.min_planned_ms:
            return False
        ratio = min(max(measured_ms / planned_ms, _MIN_RATIO), _MAX_RATIO)
        with self._lock:
            now = self._clock()
            entry = self._ratios.get((model, key))
            if entry is None:  # a session's first run is cold (creation, allocation): not its speed
                self._ratios[(model, key)] = _Ratio(self.rel_alpha, self.step_ratio)
                return False
            factor = self._factor.setdefault(model, Ewma(alpha=self.alpha, outlier_ratio=self.step_ratio))
            factor.add(ratio / self._relative(entry, now), confirmed=confirmed)
            assert factor.value is not None
            entry.ewma.add(ratio / factor.value, confirmed=confirmed)
            entry.at = now
            self._factor_at[model] = now
            self._offloaded[model] = 0
        return True

    def note_offloaded(self, model: str) -> bool:
        """Count a request of ``model`` that ran nothing on the device. Returns
        True when a device probe is due (every ``probe_every`` such requests in a
        row, the count then restarts), so a device that recovered while the
        Gateway used the cloud is noticed."""
        if self.probe_every <= 0:
            return False
        with self._lock:
            n = self._offloaded.get(model, 0) + 1
            due = n >= self.probe_every
            self._offloaded[model] = 0 if due else n
            return due

    def reset(self, model: str | None = None) -> None:
        """Forget what was learned (of one model, or all): the emulated device changed."""
        with self._lock:
            for table in (self._factor, self._factor_at, self._offloaded):
                for m in [m for m in table if model is None or m == model]:
                    del table[m]
            for k in [k for k in self._ratios if model is None or k[0] == model]:
                del self._ratios[k]

    # -- what decisions use ------------------------------------------------------------

    def factor(self, model: str) -> float:
        """The device's speed against ``model``'s plan: device times are this many
        times the planned ones (1.0 before anything of the model ran)."""
        with self._lock:
            ewma = self._factor.get(model)
            return ewma.value if ewma is not None and ewma.value is not None else 1.0

    def relative(self, model: str, key: str) -> float:
        """How much slower than :meth:`factor` says a partition runs (1.0 unmeasured),
        decayed towards 1 while it is not run."""
        with self._lock:
            entry = self._ratios.get((model, key))
            return 1.0 if entry is None else self._relative(entry, self._clock())

    def _relative(self, entry: _Ratio, now: float) -> float:
        value = entry.ewma.value
        if value is None or value <= 0:
            return 1.0
        if self.half_life_s <= 0 or not math.isfinite(entry.at):
            return value
        weight = 0.5 ** (max(now - entry.at, 0.0) / self.half_life_s)
        return value**weight

    def adjust(self, model: str, costs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """Copies of cost entries (:meth:`splitgate.planner.PlanBundle.costs`) whose
        ``device_ms`` carry each partition's relative ratio. The device factor
        is not in them: it goes in ``Conditions.device_factor``."""
        with self._lock:
            now = self._clock()
            out: dict[str, dict[str, Any]] = {}
            for pid, entry in costs.items():
                copy = dict(entry)
                ratio = self._ratios.get((model, pid))
                if ratio is not None and "device_ms" in copy:
                    copy["device_ms"] = float(copy["device_ms"]) * self._relative(ratio, now)
                out[pid] = copy
            return out

    def snapshot(self, model: str) -> dict[str, DeviceSample]:
        """The model's factor (key ``"factor"``) and each partition's relative ratio."""
        with self._lock:
            now = self._clock()
            out: dict[str, DeviceSample] = {}
            ewma = self._factor.get(model)
            if ewma is not None and ewma.value is not None:
                out["factor"] = DeviceSample(ewma.value, ewma.samples, now - self._factor_at.get(model, now))
            for (m, key), entry in self._ratios.items():
                if m == model and entry.ewma.value is not None:
                    out[key] = DeviceSample(self._relative(entry, now), entry.ewma.samples, now - entry.at)
            return out
