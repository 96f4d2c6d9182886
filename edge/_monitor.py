"""What the edge knows about its conditions: link bandwidth and RTT (estimated
passively from every cloud call and by a light probe), battery, and cloud load."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Ewma", "LinkEstimate", "LinkMonitor", "BatteryMonitor", "CloudLoadMonitor"]


class Ewma:
    """Exponentially weighted moving average with an outlier guard.

    A sample further than ``outlier_ratio`` times from the mean (either way) is
    held back; if the next sample confirms the jump (also far, same side) both
    are accepted and the mean resets to them — so a real step change (WiFi to
    3G) is followed within two samples while a single spike is ignored.
    """

    def __init__(self, alpha: float = 0.5, outlier_ratio: float = 4.0) -> None:
        self.alpha = alpha
        self.outlier_ratio = outlier_ratio
        self.value: float | None = None
        self._pending: float | None = None
        self.samples = 0
        # Set when a confirmed step replaced the mean; the owner clears it.
        self.jumped = False

    def _is_outlier(self, x: float) -> bool:
        assert self.value is not None
        if self.value <= 0 or x <= 0:
            return False
        ratio = x / self.value
        return ratio > self.outlier_ratio or ratio < 1 / self.outlier_ratio

    def add(self, x: float) -> float:
        if not math.isfinite(x):
            return self.value if self.value is not None else x
        self.samples += 1
        if self.value is None:
            self.value = x
            return x
        if self._is_outlier(x):
            pending, self._pending = self._pending, x
            if pending is not None and (pending > self.value) == (x > self.value):
                self.value = math.sqrt(pending * x) if pending > 0 and x > 0 else x
                self._pending = None
                self.jumped = True
            return self.value
        self._pending = None
        self.value = self.alpha * x + (1 - self.alpha) * self.value
        return self.value

    def reset(self, x: float) -> float:
        """Forget the history: the mean becomes ``x`` (after a re-measurement)."""
        if math.isfinite(x):
            self.value = x
            self._pending = None
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
    """

    def __init__(
        self,
        *,
        min_bandwidth_bytes: int = 16 * 1024,
        stale_after_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_bandwidth_bytes = min_bandwidth_bytes
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._rtt = Ewma()
        self._up = Ewma()
        self._down = Ewma()
        self._updated = -math.inf
        self._bandwidth_updated = -math.inf
        self._lock = threading.Lock()

    def observe(self, bytes_sent: int, bytes_received: int, network_ms: float, *, reset: bool = False) -> None:
        """Record one cloud call's transfer (``reset``: replace the bandwidth estimate)."""
        with self._lock:
            self._updated = self._clock()
            big_up = bytes_sent >= self.min_bandwidth_bytes
            big_down = bytes_received >= self.min_bandwidth_bytes
            if not big_up and not big_down:
                self._rtt.add(network_ms)
                return
            self._bandwidth_updated = self._updated
            rtt = self._rtt.value or 0.0
            transfer_ms = max(network_ms - rtt, 0.05)
            # Attribute the transfer time to the larger direction; the other
            # direction's share is estimated from its own current rate.
            if bytes_sent >= bytes_received:
                other = _ms(bytes_received, self._down.value)
                sample, ewma = _mbps(bytes_sent, max(transfer_ms - other, 0.05)), self._up
            else:
                other = _ms(bytes_sent, self._up.value)
                sample, ewma = _mbps(bytes_received, max(transfer_ms - other, 0.05)), self._down
            if reset:
                ewma.reset(sample)
            else:
                ewma.add(sample)

    def observe_rtt(self, rtt_ms: float, *, reset: bool = False) -> None:
        """Record a probe's round trip (no payload); ``reset`` replaces the estimate."""
        with self._lock:
            self._updated = self._clock()
            if reset:
                self._rtt.reset(rtt_ms)
            else:
                self._rtt.add(rtt_ms)

    def shifted(self) -> bool:
        """Did a confirmed step (e.g. WiFi to 3G) move an estimate since :meth:`clear_shift`?

        After a step, the other estimates are stale too (a bandwidth drop
        usually comes with a longer RTT that the passive samples wrongly
        count as transfer time), so the edge re-measures before deciding.
        """
        with self._lock:
            return self._rtt.jumped or self._up.jumped or self._down.jumped

    def clear_shift(self) -> None:
        with self._lock:
            self._rtt.jumped = self._up.jumped = self._down.jumped = False

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
        """Is a bandwidth probe due (no bandwidth sample for ``stale_after_s``)?"""
        return self.estimate().bandwidth_age_s > self.stale_after_s


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
