"""What the edge knows about its conditions: link bandwidth and RTT (estimated
passively from every cloud call and by a light probe), battery, and cloud load."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Ewma", "LinkEstimate", "LinkMonitor", "LinkCalibration", "BatteryMonitor", "CloudLoadMonitor"]


class Ewma:
    """Exponentially weighted moving average with an outlier guard.

    A sample further than ``outlier_ratio`` times from the mean (either way) is
    held back; if the next sample confirms the jump (also far, same side) both
    are accepted and the mean resets to them — so a real step change (WiFi to
    3G) is followed within two samples while a single spike is ignored. A
    sample that is itself a confirmed measurement (two probes that agree) is
    accepted at once.

    Two samples in a row more than ``drift_ratio`` off the mean on the same side
    (a smaller change than a step, or a step seen only through RTT samples) set
    :attr:`drifted`: not enough to trust, enough to measure again.

    ``worse`` (``"high"`` for a delay, ``"low"`` for a bandwidth) makes the mean
    believe bad news at once: a sample worse than the mean by more than
    ``drift_ratio`` (and not an outlier) replaces it. Errors cost unequally: an
    edge that thinks a degrading link is still good sends a large tensor into it
    and waits seconds; one that thinks a link is worse than it is runs locally a
    little longer, until the next sample or probe.
    """

    #: the weight of a clearly worse sample (1: it replaces the mean)
    worse_alpha = 1.0

    def __init__(
        self, alpha: float = 0.5, outlier_ratio: float = 4.0, drift_ratio: float = 1.4, worse: str | None = None,
    ) -> None:
        if worse not in (None, "high", "low"):
            raise ValueError(f"worse must be 'high', 'low' or None, got {worse!r}")
        self.worse = worse
        self.alpha = alpha
        self.outlier_ratio = outlier_ratio
        self.drift_ratio = drift_ratio
        self.value: float | None = None
        self._pending: float | None = None
        self._drift_side = 0
        self.samples = 0
        # Set when a confirmed step replaced the mean (``jumped_worse``: to a
        # worse value) / when the mean drifted; the owner clears them.
        self.jumped = False
        self.jumped_worse = False
        self.drifted = False

    def _is_outlier(self, x: float) -> bool:
        assert self.value is not None
        if self.value <= 0 or x <= 0:
            return False
        ratio = x / self.value
        return ratio > self.outlier_ratio or ratio < 1 / self.outlier_ratio

    def _track_drift(self, x: float) -> None:
        assert self.value is not None
        side = 0
        if self.value > 0 and x > 0:
            ratio = x / self.value
            side = 1 if ratio > self.drift_ratio else -1 if ratio < 1 / self.drift_ratio else 0
        if side and side == self._drift_side:
            self.drifted = True
        self._drift_side = side

    def add(self, x: float, *, confirmed: bool = False, suspect: bool = False) -> float:
        """Add a sample; ``confirmed``: it is a checked measurement, take a step at once;
        ``suspect``: something else may explain it (averaged even when it is bad news)."""
        if not math.isfinite(x):
            return self.value if self.value is not None else x
        self.samples += 1
        if self.value is None:
            self.value = x
            return x
        self._track_drift(x)
        if confirmed and self._is_outlier(x):
            self._jump(x)
            return x
        if self._is_outlier(x):
            pending, self._pending = self._pending, x
            if pending is not None and (pending > self.value) == (x > self.value):
                self._jump(math.sqrt(pending * x) if pending > 0 and x > 0 else x)
            return self.value
        self._pending = None
        alpha = self.worse_alpha if not suspect and self._is_clearly_worse(x) else self.alpha
        self.value = alpha * x + (1 - alpha) * self.value
        return self.value

    def _jump(self, x: float) -> None:
        assert self.value is not None
        worse = (x > self.value) if self.worse == "high" else (x < self.value) if self.worse == "low" else False
        self.value, self._pending, self.jumped = x, None, True
        self.jumped_worse = self.jumped_worse or worse

    def _is_clearly_worse(self, x: float) -> bool:
        assert self.value is not None
        if self.worse is None or self.value <= 0 or x <= 0:
            return False
        ratio = x / self.value if self.worse == "high" else self.value / x
        return ratio > self.drift_ratio

    def reset(self, x: float, *, step: bool = False) -> float:
        """Forget the history: the mean becomes ``x`` (after a re-measurement);
        ``step``: it is a measured step, flag it as :meth:`add` flags a confirmed one."""
        if math.isfinite(x):
            if step and self.value is not None:
                self._jump(x)
            self.value = x
            self._pending = None
            self._drift_side = 0
            self.samples += 1
        return self.value if self.value is not None else x


@dataclass(frozen=True)
class LinkEstimate:
    """Current estimate of the link. None where nothing has been measured yet."""

    uplink_mbps: float | None
    downlink_mbps: float | None
    rtt_ms: float | None
    age_s: float
    bandwidth_age_s: float = math.inf


class LinkMonitor:
    """Estimate uplink/downlink bandwidth and RTT from cloud calls.

    Each call reports bytes sent and received and its network time (round trip
    minus the cloud's compute time). A call with tiny payloads (a probe) is an
    RTT sample; a call with a payload gives a bandwidth sample after the
    current RTT estimate is subtracted.

    Parameters:
        min_bandwidth_bytes: payload size below which a call is treated as an RTT sample.
        stale_after_s: how old the *bandwidth* estimate may get before a probe
            is due. RTT samples from small calls do not refresh it: an edge
            running a small cut would otherwise never notice the link recover.
        probe_bytes: the payload of one bandwidth probe send (a probe sends two).
        probe_duty: the most link time probes may take: on a slow link the
            probe interval grows so probes stay under this share (at 0.2 Mbps
            two 32 KB sends take 2.6 s, and a request queued behind them waits).
            Drift still triggers a probe sooner. While no request has used the
            link for ``stale_after_s`` (the edge runs on the device) probes
            delay nobody and keep the plain interval.
    """

    def __init__(
        self,
        *,
        min_bandwidth_bytes: int = 16 * 1024,
        stale_after_s: float = 5.0,
        probe_bytes: int = 32 * 1024,
        probe_duty: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_bandwidth_bytes = min_bandwidth_bytes
        self.stale_after_s = stale_after_s
        self.probe_bytes = probe_bytes
        self.probe_duty = probe_duty
        self._clock = clock
        self._rtt = Ewma(worse="high")
        self._up = Ewma(worse="low")
        self._down = Ewma(worse="low")
        self._updated = -math.inf
        self._bandwidth_updated = -math.inf
        self._last_call = -math.inf  # the last request (not probe) that used the link
        self._changed = False  # the OS reported a network change (mark_changed)
        self._lock = threading.Lock()

    def observe(
        self, bytes_sent: int, bytes_received: int, network_ms: float, *, reset: bool = False,
        confirmed: bool = False, shared: bool = False,
    ) -> None:
        """Record one cloud call's transfer (``reset``: replace the bandwidth
        estimate; ``confirmed``: a checked measurement, accept a step at once;
        ``shared``: a probe shared the link, so a slow call may have queued
        behind its payload: averaged in, not believed at once)."""
        with self._lock:
            self._observe(bytes_sent, bytes_received, network_ms, reset, confirmed, shared)
            self._last_call = self._updated

    def _observe(
        self, bytes_sent: int, bytes_received: int, network_ms: float, reset: bool, confirmed: bool,
        shared: bool = False,
    ) -> None:
        self._updated = self._clock()
        sample, ewma = self._bandwidth_sample(bytes_sent, bytes_received, network_ms)
        if ewma is not None and network_ms <= (self._rtt.value or 0.0):
            # Faster than one round trip: the RTT estimate is stale, and the
            # "transfer time" left is noise (a floor of 0.05 ms made 5 GB/s of it).
            return
        if ewma is None:
            rtt = self._rtt_sample(bytes_sent, bytes_received, network_ms)
            self._rtt.add(rtt, confirmed=confirmed, suspect=shared)
            return
        self._bandwidth_updated = self._updated
        if reset:
            ewma.reset(sample)
        else:
            ewma.add(sample, confirmed=confirmed, suspect=shared)

    def _rtt_sample(self, bytes_sent: int, bytes_received: int, network_ms: float) -> float:
        """A small call's round trip less its bytes' transfer time at the current
        bandwidth estimates: on a 0.9 Mbps link an 8 KB cut takes 70 ms to send,
        and counting that as RTT (205 ms where ServerLive took 123) would both
        penalise every cut and, subtracted from the next bandwidth sample, make
        the link look faster than it is. At most 3/4 of the time is taken off,
        in case the bandwidth estimate is low."""
        transfer = _ms(bytes_sent, self._up.value) + _ms(bytes_received, self._down.value)
        return max(network_ms - transfer, 0.25 * network_ms)

    def _bandwidth_sample(self, bytes_sent: int, bytes_received: int, network_ms: float) -> tuple[float, Ewma | None]:
        """(Mbps, the direction's Ewma) of a call, or (0, None) for an RTT-sized one."""
        if bytes_sent < self.min_bandwidth_bytes and bytes_received < self.min_bandwidth_bytes:
            return 0.0, None
        transfer_ms = max(network_ms - (self._rtt.value or 0.0), 0.05)
        # Attribute the transfer time to the larger direction; the other
        # direction's share is estimated from its own current rate.
        if bytes_sent >= bytes_received:
            other = _ms(bytes_received, self._down.value)
            return _mbps(bytes_sent, max(transfer_ms - other, 0.05)), self._up
        other = _ms(bytes_sent, self._up.value)
        return _mbps(bytes_received, max(transfer_ms - other, 0.05)), self._down

    def observe_rtt(self, rtt_ms: float, *, reset: bool = False, confirmed: bool = False) -> None:
        """Record a probe's round trip (no payload); ``reset`` replaces the estimate."""
        with self._lock:
            self._updated = self._clock()
            if reset:
                self._rtt.reset(rtt_ms)
            else:
                self._rtt.add(rtt_ms, confirmed=confirmed)

    def observe_probe(
        self, rtts_ms: Sequence[float], probe_bytes: int = 0, sends_ms: Sequence[float] = (), *, reset: bool = False,
        agree_ratio: float = 1.5,
    ) -> None:
        """Record a probe: a few empty round trips and a few payload sends.

        The fastest of each counts (a fresh channel's handshake or one stall
        must not set the estimate). When they agree within ``agree_ratio`` the
        measurement is taken as confirmed: a step it shows is followed at once
        rather than after the next probe, seconds later. A probe that measured
        both RTT and bandwidth leaves nothing stale, so a step it shows does
        not call for another probe (:meth:`shifted`).
        """
        if rtts_ms:
            best = min(rtts_ms)
            self.observe_rtt(best, reset=reset, confirmed=len(rtts_ms) > 1 and max(rtts_ms) <= agree_ratio * best)
        if sends_ms:
            best = min(sends_ms)
            with self._lock:
                self._observe(probe_bytes, 0, best, reset, len(sends_ms) > 1 and max(sends_ms) <= agree_ratio * best)
                if rtts_ms:  # (not a network change reported meanwhile: the probe may predate it)
                    self._clear_steps()

    def observe_late(self, bytes_sent: int, bytes_received: int, elapsed_ms: float) -> None:
        """A call still unanswered after ``elapsed_ms`` (the edge gave up on it).

        A censored sample: the link is at least this slow. The estimate moves
        to it at once if it was more optimistic (so the next request does not
        walk into the same outage), and a probe becomes due. A bandwidth far
        below the estimate is a step for the worse (:meth:`shifted_worse`):
        the RTT is re-measured before a decision it could change.
        """
        with self._lock:
            self._updated = self._clock()
            sample, ewma = self._bandwidth_sample(bytes_sent, bytes_received, elapsed_ms)
            if ewma is None:
                if self._rtt.value is None or elapsed_ms > self._rtt.value:
                    self._rtt.reset(elapsed_ms)
            elif ewma.value is None or sample < ewma.value:
                # far below: a step for the worse, measured -- the RTT is stale too (shifted_worse)
                ewma.reset(sample, step=ewma.value is not None and sample * ewma.drift_ratio < ewma.value)
            self._bandwidth_updated = -math.inf

    def shifted(self) -> bool:
        """Did a confirmed step (e.g. WiFi to 3G) move an estimate since :meth:`clear_shift`?

        After a step, the other estimates are stale too (a bandwidth drop
        usually comes with a longer RTT that the passive samples wrongly
        count as transfer time), so the edge re-measures before deciding.
        """
        with self._lock:
            return self._changed or self._rtt.jumped or self._up.jumped or self._down.jumped

    def mark_changed(self) -> None:
        """The OS reported a network change (a radio handover, a new WiFi
        network): every estimate is stale, of unknown direction. :meth:`shifted`
        holds until the next probe starts (:meth:`clear_shift`); a probe
        already running when the change came does not clear it."""
        with self._lock:
            self._changed = True

    def change_reported(self) -> bool:
        """Was a network change reported (:meth:`mark_changed`) since the last probe started?"""
        with self._lock:
            return self._changed

    def shifted_worse(self) -> bool:
        """Did a confirmed step make an estimate worse (a longer RTT, a lower
        bandwidth) since :meth:`clear_shift`?"""
        with self._lock:
            return self._rtt.jumped_worse or self._up.jumped_worse or self._down.jumped_worse

    def clear_shift(self) -> None:
        """Forget steps, drifts and reported changes seen so far (a probe is starting)."""
        with self._lock:
            self._changed = False
            self._clear_steps()

    def _clear_steps(self) -> None:
        for ewma in (self._rtt, self._up, self._down):
            ewma.jumped = ewma.jumped_worse = ewma.drifted = False

    def probe_needed(self) -> str | None:
        """Why the link should be measured now, or None.

        * ``"first"``: nothing measured yet (measure before deciding);
        * ``"shift"``: a confirmed step moved an estimate (re-measure, replacing
          the estimates, before deciding);
        * ``"stale"``: no bandwidth sample for :meth:`probe_interval_s` (in the background);
        * ``"drift"``: an estimate drifted (:class:`Ewma`) and the bandwidth is
          older than a quarter of that, at least a second (in the background) --
          how an edge running a small cut, which sees only RTT samples, notices
          the link get better or worse.
        """
        est = self.estimate()
        if est.rtt_ms is None or est.uplink_mbps is None:
            return "first"
        if self.shifted():
            return "shift"
        interval = self._probe_interval(est)
        if est.bandwidth_age_s > interval:
            return "stale"
        with self._lock:
            drifted = self._rtt.drifted or self._up.drifted or self._down.drifted
        if drifted and est.bandwidth_age_s > max(1.0, interval / 4):
            return "drift"
        return None

    def probe_interval_s(self) -> float:
        """How old the bandwidth estimate may get: ``stale_after_s``, or longer
        where a probe would take more than ``probe_duty`` of the link's time."""
        return self._probe_interval(self.estimate())

    def _probe_interval(self, est: LinkEstimate) -> float:
        idle = self._clock() - self._last_call > self.stale_after_s
        if idle or not est.uplink_mbps or self.probe_duty <= 0:
            return self.stale_after_s
        probe_s = 2 * (_ms(self.probe_bytes, est.uplink_mbps) + 2 * (est.rtt_ms or 0.0)) / 1e3
        return max(self.stale_after_s, probe_s / self.probe_duty)

    def estimate(self) -> LinkEstimate:
        with self._lock:
            return LinkEstimate(
                uplink_mbps=self._up.value,
                downlink_mbps=self._down.value,
                rtt_ms=self._rtt.value,
                age_s=self._clock() - self._updated,
                bandwidth_age_s=self._clock() - self._bandwidth_updated,
            )

    def stale(self) -> bool:
        """Is a bandwidth probe due (no bandwidth sample for :meth:`probe_interval_s`)?"""
        est = self.estimate()
        return est.bandwidth_age_s > self._probe_interval(est)


class LinkCalibration:
    """How much slower cloud calls have lately been than the link estimate
    predicted: a factor >= 1 the edge applies to its estimate when it decides.

    On a link that swings every second (a 3G tram, 0.2-2 Mbps) a probe that
    lands on a peak says 2.4 Mbps and the next 49 KB upload meets 0.4 Mbps;
    each estimate is right when measured and wrong when used. The geometric
    mean of actual/predicted network time over recent calls (EWMA, ``alpha``)
    measures that error; it decays back to 1 with ``half_life_s`` (a link that
    settles is trusted again even while the edge runs on the device and makes
    no calls). On a steady link calls take what was predicted and the factor
    stays at 1. Only pessimism is kept: calls faster than predicted already
    raise the estimate itself.

    Parameters:
        alpha: weight of the newest call.
        half_life_s: time for the excess to halve without calls.
        cap: the largest ratio one call can contribute.
    """

    def __init__(
        self, alpha: float = 0.2, half_life_s: float = 8.0, cap: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.alpha = alpha
        self.half_life_s = half_life_s
        self.cap = cap
        self._clock = clock
        self._log_excess = 0.0
        self._at = clock()
        self._lock = threading.Lock()

    def _decayed(self, now: float) -> float:
        return self._log_excess * 0.5 ** (max(now - self._at, 0.0) / self.half_life_s)

    def observe(self, predicted_ms: float, actual_ms: float) -> None:
        """One cloud call: its predicted and actual network time (a lower bound if it was hedged)."""
        if not (predicted_ms > 0 and actual_ms > 0 and math.isfinite(actual_ms)):
            return
        ratio = min(max(actual_ms / predicted_ms, 1 / self.cap), self.cap)
        with self._lock:
            now = self._clock()
            self._log_excess = (1 - self.alpha) * self._decayed(now) + self.alpha * math.log(ratio)
            self._at = now

    def reset(self) -> None:
        """Forget what was learned (a new network: its errors are not the old one's)."""
        with self._lock:
            self._log_excess = 0.0
            self._at = self._clock()

    def factor(self) -> float:
        """Multiply predicted network times by this (>= 1)."""
        with self._lock:
            return max(1.0, math.exp(self._decayed(self._clock())))


def _mbps(nbytes: int, ms: float) -> float:
    return nbytes * 8 / (ms * 1e3)


def _ms(nbytes: int, mbps: float | None) -> float:
    return 0.0 if not mbps else nbytes * 8 / (mbps * 1e3)


class BatteryMonitor:
    """Battery level in percent: set by the app, else read from the OS (psutil).

    Without a battery (a server, CI) it reports 100 (mains power).
    """

    def __init__(self, level_pct: float | None = None) -> None:
        self._override = level_pct

    def set(self, level_pct: float | None) -> None:
        """Set the level from the app (None = read from the OS again)."""
        if level_pct is not None and not 0 <= level_pct <= 100:
            raise ValueError(f"battery level must be within 0..100, got {level_pct}")
        self._override = level_pct

    def level(self) -> float:
        if self._override is not None:
            return self._override
        try:
            import psutil

            battery = psutil.sensors_battery()
        except (ImportError, AttributeError, OSError):
            battery = None
        if battery is None or battery.power_plugged:
            return 100.0
        return float(battery.percent)


class CloudLoadMonitor:
    """Cloud load from response parameters: queue depth and compute-time EWMA."""

    def __init__(self) -> None:
        self._cloud_ms = Ewma(alpha=0.3)
        self.queue_depth = 0

    def observe(self, cloud_ms: float, queue_depth: int) -> None:
        self._cloud_ms.add(cloud_ms)
        self.queue_depth = queue_depth

    @property
    def cloud_ms(self) -> float | None:
        return self._cloud_ms.value
