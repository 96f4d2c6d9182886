"""Admission control of one cloud replica: a bounded priority queue with per-request deadlines.

Semantics follow Triton's queue policy (``max_queue_size``, a per-request
timeout, priority levels, reject rather than delay), applied *before any
compute*:

- a request arriving at a full queue (``max_queue`` waiting) is refused with
  :class:`~splitgate.errors.QueueFull` (RESOURCE_EXHAUSTED);
- a request with a deadline (``splitgate.deadline_ms``, or the gRPC deadline
  where the host exposes it) that the replica's recent service time times the
  work queued ahead of it says it would miss is refused with
  :class:`~splitgate.errors.DeadlineUnmeetable` (UNAVAILABLE); so is a queued
  request whose deadline can no longer be met when its turn comes;
- waiting requests are served by priority (OIP ``priority``: 1 first; 0 or
  absent = the default level), first come first served within a level.

Every refusal carries a retry hint (ms until the queue ahead has drained),
which hosts send as trailing metadata ``splitgate.retry_after_ms``.

Pure Python with an injectable clock; no Ray. The Ray Serve deployment's drain
batcher takes batches from an :class:`AdmissionQueue`; the plain grpcio server
runs each request on its own thread and waits for its turn
(:meth:`AdmissionQueue.wait_turn`).
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from splitgate import contract
from splitgate.errors import DeadlineUnmeetable, InvalidArgument, QueueFull

__all__ = [
    "AdmissionPolicy",
    "AdmissionQueue",
    "Entry",
    "ServiceTime",
    "request_terms",
]

#: Bounds of the retry hint (ms): never "retry now", never "go away for a minute".
MIN_RETRY_MS = 5.0
MAX_RETRY_MS = 5000.0


@dataclass(frozen=True)
class AdmissionPolicy:
    """How a replica admits work (CloudConfig's admission fields).

    Attributes:
        max_queue: requests that may wait (not yet running) per replica; one
            more is refused RESOURCE_EXHAUSTED. 0 = unbounded (no refusals by size).
        priority_levels: priority levels served (1 = first); a larger requested
            level is served as the last one.
        default_priority: level of a request without ``priority`` (or with 0).
        default_deadline_ms: deadline of a request that gives none (None = none).
        deadline_fraction: share of a request's deadline the replica may spend
            on it (queue and compute); the rest is left for what the replica
            cannot see: the network both ways, gRPC and Serve's ingress, a
            busy host's scheduling. A request is admitted, and batched, only
            if the estimate fits in that share.
    """

    max_queue: int = 32
    priority_levels: int = 3
    default_priority: int = 2
    default_deadline_ms: float | None = None
    deadline_fraction: float = 0.4

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.priority_levels < 1:
            raise ValueError(f"priority_levels must be >= 1, got {self.priority_levels}")
        if not 1 <= self.default_priority <= self.priority_levels:
            raise ValueError(
                f"default_priority must be in [1, priority_levels={self.priority_levels}], got {self.default_priority}"
            )
        if self.default_deadline_ms is not None and not self.default_deadline_ms > 0:
            raise ValueError(f"default_deadline_ms must be > 0 or None, got {self.default_deadline_ms}")
        if not 0 < self.deadline_fraction <= 1:
            raise ValueError(f"deadline_fraction must be in (0, 1], got {self.deadline_fraction}")


def request_terms(
    params: Mapping[str, Any], policy: AdmissionPolicy, grpc_remaining_s: float | None = None
) -> tuple[int, float | None]:
    """A request's priority level and deadline budget (ms) from its parameters.

    Args:
        params: the request's ``parameters`` as plain values (``codec.read_params``).
        policy: the replica's policy (default level, levels, default deadline).
        grpc_remaining_s: the gRPC deadline's time left, when the host knows it.

    Returns:
        (priority level in [1, levels], deadline budget in ms or None): the
        tighter of ``splitgate.deadline_ms`` and the gRPC deadline.

    Raises:
        InvalidArgument: ``priority`` is not a non-negative integer, or
            ``splitgate.deadline_ms`` is not a positive number.
    """
    raw = params.get(contract.PRIORITY)
    if raw is None or raw == 0:
        level = policy.default_priority
    elif isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise InvalidArgument(
            f"parameter '{contract.PRIORITY}' must be a non-negative integer (1 = served first, "
            f"0 = default level {policy.default_priority}), got {raw!r}"
        )
    else:
        level = min(int(raw), policy.priority_levels)
    budgets = []
    given = params.get(contract.DEADLINE_MS)
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, (int, float)) or not (math.isfinite(given) and given > 0):
            raise InvalidArgument(
                f"parameter '{contract.DEADLINE_MS}' must be a positive number of milliseconds, got {given!r}"
            )
        budgets.append(float(given))
    elif policy.default_deadline_ms is not None:
        budgets.append(float(policy.default_deadline_ms))
    if grpc_remaining_s is not None:
        budgets.append(max(grpc_remaining_s, 0.0) * 1e3)
    return level, (min(budgets) if budgets else None)


class ServiceTime:
    """The replica's recent service time: smoothed run time and time per row.

    ``record(run_ms, rows)`` after each suffix run (a batch of ``rows``). The
    estimate of a new request's completion is its own rows plus the rows ahead
    of it (queued or running) at the recent time per row, the rows ahead spread
    over the workers that run batches. Without a sample yet it is 0: nothing is
    refused by deadline before the replica has measured itself.
    """

    def __init__(self, alpha: float = 0.2) -> None:
        self._alpha = alpha
        self.run_ms: float | None = None
        self.row_ms: float | None = None

    def record(self, run_ms: float, rows: int) -> None:
        per_row = run_ms / max(rows, 1)
        if self.run_ms is None or self.row_ms is None:
            self.run_ms, self.row_ms = run_ms, per_row
            return
        a = self._alpha
        self.run_ms += a * (run_ms - self.run_ms)
        self.row_ms += a * (per_row - self.row_ms)

    def estimate_ms(self, rows_ahead: int, rows: int = 1, workers: int = 1) -> float:
        """Expected ms until a request of ``rows`` rows with ``rows_ahead`` rows
        before it (queued or running) has its answer."""
        return self.own_ms(rows) + (self.row_ms or 0.0) * rows_ahead / max(workers, 1)

    def own_ms(self, rows: int = 1) -> float:
        """Expected ms of a request's own run once it starts (0 before any sample)."""
        if self.row_ms is None:
            return 0.0
        return self.row_ms * max(rows, 1)


@dataclass(order=True)
class Entry:
    """One admitted request waiting in the queue (ordered by priority, then arrival)."""

    priority: int
    seq: int
    rows: int = field(compare=False)
    deadline: float | None = field(compare=False)  # monotonic seconds, None = no deadline
    item: Any = field(compare=False)
    dropped: bool = field(default=False, compare=False)


class AdmissionQueue:
    """A replica's bounded priority queue (thread-safe).

    Parameters:
        policy: bounds, levels and default deadline.
        workers: runs that proceed in parallel (compute threads, or slots for
            :meth:`wait_turn`); the estimate spreads queued work over them.
        clock: monotonic seconds (injectable for unit tests).
        timing: the service-time estimator (shared, or a fresh one).
    """

    def __init__(
        self,
        policy: AdmissionPolicy | None = None,
        *,
        workers: int = 1,
        clock: Callable[[], float] = time.monotonic,
        timing: ServiceTime | None = None,
    ) -> None:
        self.policy = policy or AdmissionPolicy()
        self.workers = max(int(workers), 1)
        self.timing = timing or ServiceTime()
        self._clock = clock
        self._heap: list[Entry] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._waiting = 0  # entries in the heap not dropped
        self._running_rows = 0
        self._running = 0
        self.refused_full = 0
        self.refused_deadline = 0
        # decayed counts of recent refusals and admissions (time constant 1 s)
        self._recent = {"refused": 0.0, "admitted": 0.0}
        self._recent_at = clock()

    # -- state ------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Requests waiting (not running)."""
        with self._cv:
            return self._waiting

    def _rows_ahead(self, priority: int) -> int:
        """Rows that run before a new request of ``priority``: running, plus
        waiting at the same or a better level."""
        return self._running_rows + sum(e.rows for e in self._heap if not e.dropped and e.priority <= priority)

    def _count(self, what: str) -> None:
        """Count a refusal or an admission in the recent (decayed, 1 s) rates."""
        now = self._clock()
        decay = math.exp(-max(now - self._recent_at, 0.0))
        self._recent_at = now
        for key in self._recent:
            self._recent[key] *= decay
        self._recent[what] += 1.0

    def _retry_ms(self) -> float:
        """ms until the work queued now has drained, stretched by how many more
        requests are being refused than admitted lately (all of them would come
        back at once otherwise); clamped to the hint bounds."""
        queued = self._running_rows + sum(e.rows for e in self._heap if not e.dropped)
        drain = self.timing.estimate_ms(queued, 0, self.workers) if queued else 0.0
        pressure = self._recent["refused"] / max(self._recent["admitted"], 1.0)
        return float(min(max(drain * max(pressure, 1.0), MIN_RETRY_MS), MAX_RETRY_MS))

    def running(self, rows: int) -> None:
        """Count ``rows`` more rows as running (work ahead of every new request);
        for a host that runs work outside :meth:`take` / :meth:`wait_turn`."""
        with self._cv:
            self._running_rows += max(int(rows), 0)

    # -- admission --------------------------------------------------------------

    def offer(self, item: Any, *, priority: int, deadline_ms: float | None = None, rows: int = 1) -> Entry:
        """Admit ``item`` into the queue, or refuse it at once.

        Args:
            item: what a worker gets back from :meth:`take`.
            priority: level (1 = first).
            deadline_ms: the request's budget from now (None = no deadline).
            rows: rows the request adds to a batch.

        Raises:
            QueueFull: ``max_queue`` requests are already waiting.
            DeadlineUnmeetable: the work ahead says it would finish after its deadline.
        """
        rows = max(int(rows), 1)
        with self._cv:
            limit = self.policy.max_queue
            if limit and self._waiting >= limit:
                self.refused_full += 1
                retry = self._retry_ms()
                self._count("refused")
                raise QueueFull(
                    f"the cloud replica's queue is full ({self._waiting} waiting, max_queue {limit}); "
                    f"refused before any compute, retry after {retry:.0f} ms",
                    retry_after_ms=retry,
                )
            budget_ms = None if deadline_ms is None else deadline_ms * self.policy.deadline_fraction
            if budget_ms is not None:
                estimate = self.timing.estimate_ms(self._rows_ahead(priority), rows, self.workers)
                if estimate > budget_ms:
                    self.refused_deadline += 1
                    retry = self._retry_ms()
                    self._count("refused")
                    raise DeadlineUnmeetable(
                        f"the cloud replica expects to answer in {estimate:.0f} ms (work queued ahead), past its "
                        f"share ({budget_ms:.0f} ms) of the request's deadline of {deadline_ms:.0f} ms; refused "
                        f"before any compute, retry after {retry:.0f} ms",
                        retry_after_ms=retry,
                    )
            # (the replica's own deadline for it: its share of the request's)
            deadline = None if budget_ms is None else self._clock() + budget_ms / 1e3
            entry = Entry(priority=priority, seq=next(self._seq), rows=rows, deadline=deadline, item=item)
            heapq.heappush(self._heap, entry)
            self._count("admitted")
            self._waiting += 1
            self._cv.notify_all()
            return entry

    @staticmethod
    def _left_ms(entry: Entry, now: float) -> float:
        return float("inf") if entry.deadline is None else (entry.deadline - now) * 1e3

    def _late(self, entry: Entry, now: float) -> DeadlineUnmeetable | None:
        """The refusal of a waiting entry whose deadline its own run would now miss."""
        if entry.deadline is None:
            return None
        left_ms = (entry.deadline - now) * 1e3
        if left_ms >= self.timing.own_ms(entry.rows):
            return None
        self.refused_deadline += 1
        retry = self._retry_ms()
        return DeadlineUnmeetable(
            f"the request waited in the cloud replica's queue until its deadline could no longer be met "
            f"({max(left_ms, 0.0):.0f} ms left); refused before any compute, retry after {retry:.0f} ms",
            retry_after_ms=retry,
        )

    def _pop(self) -> Entry:
        entry = heapq.heappop(self._heap)
        if not entry.dropped:
            self._waiting -= 1
        return entry

    # -- batch style (the Ray Serve drain batcher) --------------------------------

    def take(
        self, max_rows: int, wait_s: float = 0.0, timeout_s: float | None = None
    ) -> tuple[list[Entry], list[tuple[Entry, DeadlineUnmeetable]]]:
        """Block until work waits; return (entries to run, entries refused for their deadline).

        Pops in priority order up to ``max_rows`` rows; waits up to ``wait_s``
        after the first for more (batch mates). Entries whose deadline their own
        run would miss are refused instead of run. The caller must call
        :meth:`finished` with the rows it ran. With ``timeout_s``, returns
        ([], []) when nothing arrived in time.
        """
        refused: list[tuple[Entry, DeadlineUnmeetable]] = []
        taken: list[Entry] = []
        rows = 0
        tightest = float("inf")  # ms left to the earliest deadline among the taken
        with self._cv:
            give_up = None if timeout_s is None else self._clock() + timeout_s
            batch_end: float | None = None
            while True:
                while self._heap and self._heap[0].dropped:
                    heapq.heappop(self._heap)
                now = self._clock()
                if self._heap:
                    head = self._heap[0]
                    if taken and rows + head.rows > max(max_rows, 1):
                        break
                    # A batch runs as long as its rows: a mate must not make it
                    # outlast the earliest deadline in it (its own included).
                    left = self._left_ms(head, now)
                    if taken and self.timing.own_ms(rows + head.rows) > min(tightest, left):
                        break
                    self._pop()
                    late = self._late(head, now)
                    if late is not None:
                        refused.append((head, late))
                        continue
                    taken.append(head)
                    tightest = min(tightest, left)
                    rows += head.rows
                    if rows >= max(max_rows, 1):
                        break
                    if batch_end is None:
                        batch_end = now + max(wait_s, 0.0)
                    continue
                if taken:
                    left = (batch_end or now) - now
                    if left <= 0:
                        break
                    self._cv.wait(left)
                    continue
                if refused:
                    break  # answer the refused without waiting for new work
                if give_up is not None:
                    if now >= give_up:
                        break
                    self._cv.wait(give_up - now)
                else:
                    self._cv.wait()
            self._running_rows += rows
            self._running += 1 if taken else 0
        return taken, refused

    def finished(self, rows: int, run_ms: float | None) -> None:
        """A run of ``rows`` rows taken from the queue ended after ``run_ms`` of
        compute (None: it did not run, e.g. every request failed validation)."""
        with self._cv:
            self._running_rows = max(self._running_rows - rows, 0)
            self._running = max(self._running - 1, 0)
            if run_ms is not None and rows > 0:
                self.timing.record(run_ms, rows)
            self._cv.notify_all()

    # -- thread-per-request style (the plain grpcio server) -------------------------

    def wait_turn(self, entry: Entry) -> None:
        """Block the calling thread until ``entry`` is first in line and fewer
        than ``workers`` runs are going; it then counts as running (call
        :meth:`finished` after the run).

        Raises:
            DeadlineUnmeetable: the entry's deadline can no longer be met; it
                leaves the queue without running.
        """
        with self._cv:
            while True:
                while self._heap and self._heap[0].dropped:
                    heapq.heappop(self._heap)
                now = self._clock()
                late = self._late(entry, now)
                if late is not None:
                    self._drop(entry)
                    raise late
                if self._running < self.workers and self._heap and self._heap[0] is entry:
                    self._pop()
                    self._running += 1
                    self._running_rows += entry.rows
                    return
                wait = None
                if entry.deadline is not None:
                    wait = max(entry.deadline - now - self.timing.own_ms(entry.rows) / 1e3, 0.001)
                self._cv.wait(wait)

    def _drop(self, entry: Entry) -> None:
        if not entry.dropped:
            entry.dropped = True
            self._waiting -= 1
            self._cv.notify_all()
