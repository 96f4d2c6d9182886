"""Step-load locustfile: the split-traffic user plus a :class:`StepLoadShape`.

The shape adds ``--step-users`` users every ``--step-time`` seconds and
measures each step on its own (the first ``warm-up`` part of a step, while
users spawn and queues settle, is left out). It stops at the first step whose
p99 exceeds ``--p99-target-ms`` (or that has failures), or at
``--step-max-users``. The **max sustainable rps** is the best throughput of a
step that met the target: the number to size replicas with. The result goes to
``--step-result`` as JSON (and to the log)::

    locust -f loadtests/stepload.py --headless --host 127.0.0.1:9000 \\
        --bundles mobilenet.bundle --p99-target-ms 100 --step-result step.json
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from locust import LoadTestShape, events
from locust.env import Environment

from splitgate.loadtests.locustfile import SplitTrafficUser  # noqa: F401  (the user class locust runs)

__all__ = ["StepLoadShape", "StepStats", "SplitTrafficUser"]

log = logging.getLogger("splitgate.stepload")
# Part of each step not measured: users are spawning and queues are settling.
WARMUP_FRACTION = 0.3


@dataclass
class StepStats:
    """What one step measured (over its window after warm-up)."""

    users: int
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    within_target: bool


class StepLoadShape(LoadTestShape):
    """Ramp users in steps until p99 crosses the target; report max sustainable rps."""

    use_common_options = True

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[StepStats] = []
        self._step = 0
        self._samples: list[float] = []
        self._failures = 0
        self._window_start = 0.0
        self._done = False

    # Called by the request event listener below.
    def record(self, response_time: float, failed: bool) -> None:
        if time.perf_counter() >= self._window_start:
            self._samples.append(response_time)
            self._failures += int(failed)

    def _options(self) -> Any:
        return self.runner.environment.parsed_options  # type: ignore[union-attr]

    def _close_step(self, users: int, window_s: float, target_ms: float) -> StepStats:
        rt = np.asarray(self._samples, dtype=float)
        p50, p95, p99 = (float(np.percentile(rt, q)) if rt.size else float("inf") for q in (50, 95, 99))
        stats = StepStats(
            users=users,
            requests=int(rt.size),
            failures=self._failures,
            rps=rt.size / window_s if window_s > 0 else 0.0,
            p50_ms=p50,
            p95_ms=p95,
            p99_ms=p99,
            within_target=bool(rt.size) and p99 <= target_ms and self._failures == 0,
        )
        self.steps.append(stats)
        log.warning(
            "step %d: %d users, %.1f rps, p50 %.1f ms, p95 %.1f ms, p99 %.1f ms, %d failures%s",
            len(self.steps), users, stats.rps, p50, p95, p99, self._failures,
            "" if stats.within_target else "  <- over target",
        )
        self._samples, self._failures = [], 0
        return stats

    def tick(self) -> tuple[int, float] | None:
        if self._done:
            return None
        opts = self._options()
        step_users, step_time = opts.step_users, opts.step_time
        run_time = self.get_run_time()
        step = int(run_time // step_time)
        if step == 0 and self._window_start == 0.0:
            self._window_start = time.perf_counter() + WARMUP_FRACTION * step_time
        if step > self._step:  # the previous step just ended
            users = (self._step + 1) * step_users
            stats = self._close_step(users, (1 - WARMUP_FRACTION) * step_time, opts.p99_target_ms)
            self._step = step
            self._window_start = time.perf_counter() + WARMUP_FRACTION * step_time
            if not stats.within_target or users + step_users > opts.step_max_users:
                self._finish(opts)
                return None
        users = (self._step + 1) * step_users
        return users, float(step_users)

    def _finish(self, opts: Any) -> None:
        self._done = True
        result = self.result(opts.p99_target_ms)
        log.warning(
            "max sustainable rps at p99 <= %.0f ms: %.1f (%s users)",
            opts.p99_target_ms, result["max_sustainable_rps"], result["at_users"],
        )
        if opts.step_result:
            with open(opts.step_result, "w", encoding="utf-8") as fh:
                json.dump(result, fh, indent=2)

    def result(self, target_ms: float) -> dict[str, Any]:
        """The steps and the best within-target step, as a JSON-ready dict."""
        ok = [s for s in self.steps if s.within_target]
        best = max(ok, key=lambda s: s.rps) if ok else None
        return {
            "p99_target_ms": target_ms,
            "max_sustainable_rps": best.rps if best else 0.0,
            "at_users": best.users if best else None,
            "p99_at_max_ms": best.p99_ms if best else None,
            "crossed": bool(self.steps) and not self.steps[-1].within_target,
            "steps": [asdict(s) for s in self.steps],
        }


@events.init.add_listener
def _attach(environment: Environment, **_: Any) -> None:
    shape = environment.shape_class
    if isinstance(shape, StepLoadShape):
        environment.events.request.add_listener(
            lambda response_time, exception=None, **_kw: shape.record(response_time, exception is not None)
        )


@events.test_stop.add_listener
def _flush(environment: Environment, **_: Any) -> None:
    """A run cut short (``--run-time``, Ctrl-C) still writes what it measured."""
    shape = environment.shape_class
    if isinstance(shape, StepLoadShape) and not shape._done and environment.parsed_options is not None:
        shape._finish(environment.parsed_options)
