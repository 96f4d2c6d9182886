"""A circuit breaker for the cloud leg: after repeated failures stop calling the
cloud (no more timeouts), probe it now and then, and close again on success.
A reported network change ends an outage's verdict at once (:meth:`CircuitBreaker.network_changed`)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

__all__ = ["CircuitBreaker"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CircuitBreaker:
    """Classic three-state breaker (closed -> open -> half-open -> closed).

    A network change (:meth:`network_changed`) half-opens an open breaker at
    once: the failures it counted were the old network's and say nothing about
    the new one, nor do failures of calls sent before the change that arrive
    after it (``record_failure(sent_at=...)``). A link probe (:meth:`allow_probe`) is a trial of its own: it
    may run whenever the breaker is not open, its success closes the breaker
    and its failure re-opens it, without taking the one request trial.
    I/O-free and thread-safe.

    Parameters:
        failure_threshold: consecutive failures that open the breaker.
        reset_timeout_s: how long it stays open before letting one probe through.
        clock: time source (seconds), replaceable in unit tests.
    """

    def __init__(
        self,
        failure_threshold: int = 3,
        reset_timeout_s: float = 5.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self._changed_at = -math.inf  # the last network change (clock)

    @property
    def state(self) -> str:
        with self._lock:
            self._maybe_half_open()
            return self._state

    def _maybe_half_open(self) -> None:
        if self._state == OPEN and self._clock() - self._opened_at >= self.reset_timeout_s:
            self._state = HALF_OPEN
            self._probe_in_flight = False

    def allow(self) -> bool:
        """May a request go to the cloud now? In half-open, only one trial request at a time.

        Returns:
            True when closed, or half-open with no trial request out (this call takes the trial:
            its outcome must reach :meth:`record_success` or :meth:`record_failure`).
        """
        with self._lock:
            self._maybe_half_open()
            if self._state == CLOSED:
                return True
            if self._state == HALF_OPEN and not self._probe_in_flight:
                self._probe_in_flight = True
                return True
            return False

    def allow_probe(self) -> bool:
        """May a link probe go to the cloud now? Yes unless the breaker is open.

        A probe is bounded by short timeouts and measures the link rather than
        serving a request, so it takes no request trial; its outcome still goes to
        :meth:`record_success` / :meth:`record_failure` (a half-open breaker closes
        or re-opens on it).
        """
        with self._lock:
            self._maybe_half_open()
            return self._state != OPEN

    def network_changed(self) -> bool:
        """The device's network changed: forget the old network's failures.

        An open breaker half-opens now (the next trial, typically the fresh probe of
        the new network, decides), a half-open one frees its trial, a closed one
        restarts its count of consecutive failures. Failures on the new network
        open it again as usual.

        Returns:
            True if the breaker was open or half-open (the cloud was being skipped).
        """
        with self._lock:
            self._maybe_half_open()
            was_tripped = self._state != CLOSED
            if was_tripped:
                self._state = HALF_OPEN
            self._failures = 0
            self._probe_in_flight = False
            self._changed_at = self._clock()
            return was_tripped

    def record_success(self) -> None:
        """A cloud call or probe succeeded: close the breaker."""
        with self._lock:
            self._state = CLOSED
            self._failures = 0
            self._probe_in_flight = False

    def record_failure(self, sent_at: float | None = None) -> bool:
        """A cloud call or probe failed: count it; a half-open breaker, or the
        ``failure_threshold``-th failure in a row, opens it (for ``reset_timeout_s``).

        Args:
            sent_at: when the failed call was sent (this breaker's clock). A call sent
                before the last :meth:`network_changed` failed on the old network (a
                hedged call timing out there after the handover): not counted.

        Returns:
            True if the failure was counted.
        """
        with self._lock:
            if sent_at is not None and sent_at < self._changed_at:
                return False
            self._failures += 1
            if self._state == HALF_OPEN or self._failures >= self.failure_threshold:
                self._state = OPEN
                self._opened_at = self._clock()
                self._probe_in_flight = False
            return True
