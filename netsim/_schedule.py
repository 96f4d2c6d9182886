"""Play a :class:`~splitgate.netsim.traces.Trace` into shaping links in real time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from splitgate.netsim._proxy import LinkConditions
from splitgate.netsim.traces import Trace, TracePoint

__all__ = ["ScheduleDriver", "Shapeable"]


class Shapeable(Protocol):
    """Anything whose link conditions can be set: :class:`ShapingProxy`, :class:`TbfLink`."""

    def set(self, conditions: LinkConditions | None = None, **changes: object) -> LinkConditions: ...


class ScheduleDriver:
    """Apply a trace's conditions to links at the trace's times, from a background thread.

    Parameters:
        trace: the conditions over time.
        links: the links to drive (all get the same conditions at the same time).
        time_scale: play the trace this many times slower (0.5 = twice as fast).
        on_change: called with ``(elapsed_s, point)`` after each change.

    ``start()`` applies the first point at once and returns; :attr:`t0` is the
    monotonic start time, :meth:`elapsed` the trace time now. Use as a context
    manager, or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        trace: Trace,
        links: Iterable[Shapeable],
        *,
        time_scale: float = 1.0,
        on_change: Callable[[float, TracePoint], None] | None = None,
    ) -> None:
        self.trace = trace
        self.links = list(links)
        self.time_scale = time_scale
        self.on_change = on_change
        self.t0 = 0.0
        self.applied: list[tuple[float, TracePoint]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def elapsed(self) -> float:
        """Trace seconds since :meth:`start`."""
        return (time.monotonic() - self.t0) / self.time_scale

    def current(self) -> TracePoint:
        return self.trace.at(self.elapsed())

    def done(self) -> bool:
        return self.elapsed() >= self.trace.duration_s

    def _apply(self, point: TracePoint) -> None:
        cond = point.conditions()
        for link in self.links:
            link.set(cond)
        self.applied.append((self.elapsed(), point))
        if self.on_change is not None:
            self.on_change(self.elapsed(), point)

    def start(self) -> ScheduleDriver:
        self.t0 = time.monotonic()
        self._apply(self.trace.points[0])
        self._thread = threading.Thread(target=self._run, name="netsim-schedule", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        for point in self.trace.points[1:]:
            wait = self.t0 + point.t_s * self.time_scale - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            self._apply(point)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ScheduleDriver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
