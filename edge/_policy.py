"""Which partition to run now: a decision-table lookup with hysteresis."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from typing import Any

from splitgate.edge._monitor import LinkMonitor
from splitgate.planner import Conditions, PlanBundle

__all__ = ["Policy", "hedge_delay_ms", "rtt_first", "rtt_probe_timeout_s", "calibrated"]


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

    def choose(
        self, bundle: PlanBundle, conditions: Conditions, *, costs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> str:
        """Return the partition id to run for ``bundle`` under ``conditions``.

        ``costs``: the request's cost entries (:meth:`PlanBundle.costs` for its
        shapes, device times as measured); the choice and the hysteresis then
        weigh those instead of the profile's planned figures.
        """
        if not bundle.has_profile:
            return "device"  # no profile: nothing to trade off; stay local
        best = bundle.choose(conditions, costs=costs)
        model = bundle.model_name
        with self._lock:
            current = self._current.get(model)
            if current is not None and current != best and current in bundle.partitions:
                allowed = not (conditions.privacy and bundle.partition(current).kind == "cloud")
                if allowed:
                    now = bundle.estimate(current, conditions, costs=costs).latency_ms
                    new = bundle.estimate(best, conditions, costs=costs).latency_ms
                    if new > now * (1 - self.hysteresis):
                        best = current
            self._current[model] = best
        return best


def hedge_delay_ms(
    remaining_ms: float, local_suffix_ms: float | None, predicted_leg_ms: float | None, factor: float = 3.0,
    floor_ms: float = 200.0,
) -> float:
    """How long to wait for a cloud call before racing the local suffix against it.

    The later of two rules' earliest: the deadline rule (start early enough for
    the local suffix to finish in the budget: ``remaining - 1.2 x`` its measured
    time, or ``0.8 x remaining`` before it was ever measured), and the latency
    rule (``factor x`` the predicted cloud leg, at least ``floor_ms``): a call
    that late is more likely stuck in a tunnel than slow, and waiting out the
    deadline there costs seconds (hedged requests, Dean & Barroso, "The Tail at
    Scale", CACM 2013). The local suffix only races the call: if the cloud
    answers first its answer is used.

    Parameters:
        remaining_ms: budget left when the call starts.
        local_suffix_ms: the measured local suffix time, None if never measured.
        predicted_leg_ms: the planner's estimate of this call (transfer + cloud), None: no latency rule.
        factor: multiple of the prediction to wait; 0 turns the latency rule off.
        floor_ms: the latency rule never hedges earlier than this (a busy
            server's or a loaded link's ordinary tail is not an outage).
    Returns:
        milliseconds after the call starts (>= 0).
    """
    deadline_rule = max(remaining_ms - 1.2 * local_suffix_ms, 0.0) if local_suffix_ms else 0.8 * remaining_ms
    if predicted_leg_ms is None or factor <= 0:
        return deadline_rule
    return min(deadline_rule, max(factor * predicted_leg_ms, floor_ms))


def rtt_first(
    link: LinkMonitor, bundle: PlanBundle, conditions: Conditions,
    *, costs: Mapping[str, Mapping[str, Any]] | None = None,
) -> bool:
    """After a confirmed step, should the RTT be re-measured before this decision?

    Calls carrying a tensor are bandwidth samples and leave the old RTT in
    place, so after WiFi -> 3G the edge sees 3G bandwidth with a WiFi RTT and
    may pick a small cut where the device is now faster. A round trip on the
    request path costs ~0.1-0.3 s on a slow link, so only when it can change
    the decision: the step made the link worse (a longer RTT only makes cloud
    partitions slower) and the table's choice under the current estimates
    still uses the cloud. A better link, or a choice already on the device,
    waits for the background probe. ``costs``: the request's cost entries
    (see :meth:`Policy.choose`).
    """
    if not (link.shifted_worse() and bundle.has_profile):
        return False
    choice = bundle.choose(conditions) if costs is None else bundle.choose(conditions, costs=costs)
    return choice != "device"


def rtt_probe_timeout_s(rtt_ms: float | None) -> float:
    """How long the request-path RTT probe (:func:`rtt_first`) may wait: four
    times the RTT known so far, 0.3-2 s. A ServerLive unanswered by then is
    itself the measurement (a censored sample: the link is at least that
    slow); waiting out 2 s in a tunnel would cost the request the time the
    probe was meant to save."""
    return min(2.0, max(0.3, 4 * (rtt_ms or 0.0) / 1e3))


def calibrated(conditions: Conditions, factor: float) -> Conditions:
    """``conditions`` with every network time ``factor`` x longer (bandwidths
    divided, RTT multiplied): the link as recent calls say it behaves
    (:class:`splitgate.edge.LinkCalibration`)."""
    if factor <= 1.0:
        return conditions
    down = None if conditions.downlink_mbps is None else conditions.downlink_mbps / factor
    return dataclasses.replace(
        conditions, uplink_mbps=conditions.uplink_mbps / factor, downlink_mbps=down, rtt_ms=conditions.rtt_ms * factor
    )
