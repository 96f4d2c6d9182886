"""Per-request telemetry of the Gateway: estimated energy, battery, version, drift, and traces.

One hook, :meth:`RequestTelemetry.request_done`, runs after each answered
request. It fills the request's :class:`~splitgate.edge.Trace` (``energy_mj``,
``battery_pct``, ``version``), counts it in Prometheus metrics (the Gateway's
registry, next to :mod:`splitgate.edge._metrics`), feeds the drift monitors
(:mod:`splitgate.edge._drift`) and, where OpenTelemetry is installed, adds a
child span per leg to the request's span (:mod:`splitgate._tracing`).

Energy is an **estimate**: the planner's cost model
(:mod:`splitgate.planner._cost`: device compute power, the Huang et al.
MobiSys'12 radio power ``P = au*tu + ad*td + b`` and idle power while waiting)
applied to the request's *measured* times and bytes. The transfer times are
the bytes over the link monitor's bandwidth estimates (at most the measured
network time); the rest of the network time and the cloud time count as idle
waiting. Radio time of a cloud call that failed or was overtaken by the device
is not counted. The power figures are the bundle's (``profile.json``'s
``energy``; the defaults without a profile), not a measurement of this device.

Label cardinality: ``model`` (loaded models), ``partition`` (a bundle's
partitions), ``version`` (the first 12 characters of the plan digest; a
version's series are removed when it stops serving), ``signal`` (a few per
model input/output). Nothing is labelled per request or per caller.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from splitgate.edge._drift import DriftHub
from splitgate.planner import EnergyModel
from splitgate.planner._cost import transfer_ms

from splitgate import _tracing

__all__ = ["RequestTelemetry", "request_energy_mj"]

_ENERGY_BUCKETS_MJ = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 20000)
_request_start_ns: contextvars.ContextVar[int | None] = contextvars.ContextVar("splitgate_request_start",
                                                                               default=None)


def request_energy_mj(trace: Any, energy: EnergyModel, uplink_mbps: float, downlink_mbps: float | None = None,
                      ) -> float:
    """Estimated device energy of one request, in mJ, from its measured legs.

    Args:
        trace: the request's Trace (``device_ms``, ``network_ms``, ``cloud_ms``,
            ``bytes_sent``, ``bytes_received``).
        energy: the power figures (the bundle's energy model).
        uplink_mbps: the link's uplink estimate (chooses the radio under ``"auto"``, times the upload).
        downlink_mbps: the downlink estimate (None = the uplink's).

    Returns:
        compute power x device time + radio power x transfer time + idle power x the
        rest of the wait (network time not spent transferring, plus cloud time).
    """
    mj = energy.compute_mw * trace.device_ms / 1e3
    if trace.network_ms <= 0 and trace.cloud_ms <= 0:
        return mj
    up = max(uplink_mbps, 1e-3)
    down = max(downlink_mbps or up, 1e-3)
    t_up = min(transfer_ms(trace.bytes_sent, up), trace.network_ms)
    t_down = min(transfer_ms(trace.bytes_received, down), max(trace.network_ms - t_up, 0.0))
    wait = max(trace.network_ms - t_up - t_down, 0.0) + trace.cloud_ms
    radio = energy.radio_for(up)
    uj = radio.power_mw(up, 0.0) * t_up + radio.power_mw(0.0, down) * t_down + energy.idle_mw * wait
    if energy.radio_tail:
        uj += radio.tail_mw * radio.tail_s * 1e3
    return mj + uj / 1e3


def _energy_model(bundle: Any) -> EnergyModel:
    profile = getattr(bundle, "plan_profile", None)
    return profile.energy_model if profile is not None else EnergyModel()


class RequestTelemetry:
    """The Gateway's telemetry: metrics in its registry, drift monitors, request spans.

    Parameters:
        registry: the Gateway's Prometheus registry.
        drift_threshold, drift_window, drift_min_requests: the drift monitors' settings
            (:class:`~splitgate.edge._drift.DriftHub`).
        link: the Gateway's link monitor (its ``estimate()`` times the transfers), or None.
        battery: the Gateway's battery monitor (its ``level()``, read at most once a second:
            reading the OS's battery takes tens of microseconds), or None.
        default_uplink_mbps: the uplink assumed before one is measured.
    """

    def __init__(self, registry: Any, *, drift_threshold: float = 0.25, drift_window: int = 256,
                 drift_min_requests: int = 128,
                 link: Any = None, battery: Any = None, default_uplink_mbps: float = 10.0) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self._link = link
        self._battery = battery
        self._battery_read: tuple[float, float | None] = (-1.0, None)  # (monotonic time, level)
        self._default_up = default_uplink_mbps
        self.drift = DriftHub(registry, threshold=drift_threshold, window=drift_window,
                              min_requests=drift_min_requests)
        self.energy = Histogram(
            "splitgate_energy_mj", "Estimated device energy per request in mJ (the planner's compute and "
            "radio power model applied to the measured times and bytes)", ("model", "partition"),
            buckets=_ENERGY_BUCKETS_MJ, registry=registry,
        )
        self.battery = Gauge("splitgate_battery_pct", "Battery level the last request was decided with (0-100)",
                             registry=registry)
        self.version_requests = Counter(
            "splitgate_version_requests", "Requests answered per bundle version (plan digest, 12 characters)",
            ("model", "version"), registry=registry,
        )
        self.version_info = Gauge(
            "splitgate_model_version", "1 for the bundle version (plan digest, 12 characters) a model serves",
            ("model", "version"), registry=registry,
        )
        self._versions: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    # -- spans ------------------------------------------------------------------

    def traced(self, infer: Callable[..., Any]) -> Callable[..., Any]:
        """``infer`` wrapped in a ``splitgate.infer`` request span (``infer`` itself without OTel;
        without a configured tracer provider the wrapper only checks for one)."""
        if not _tracing.available():
            return infer

        def run(model: str, inputs: Mapping[str, Any], **kwargs: Any) -> Any:
            if not _tracing.active():  # no tracer provider configured: no span at all
                return infer(model, inputs, **kwargs)
            token = _request_start_ns.set(_tracing.now_ns())
            try:
                with _tracing.request_span("splitgate.infer", {"splitgate.model": model}):
                    return infer(model, inputs, **kwargs)
            finally:
                _request_start_ns.reset(token)

        return run

    def cloud_context(self) -> dict[str, str] | None:
        """The request span's W3C trace context, for the cloud call's metadata (None without OTel).
        Call it on the request's thread."""
        return _tracing.current_headers() or None

    # -- the hook ---------------------------------------------------------------

    def battery_pct(self) -> float | None:
        """The battery level (the monitor's, at most a second old; None without a monitor)."""
        if self._battery is None:
            return None
        at, level = self._battery_read
        now = time.monotonic()
        if now - at >= 1.0:
            level = self._battery.level()
            self._battery_read = (now, level)
        return level

    def request_done(self, bundle: Any, feeds: Mapping[str, Any], outputs: Mapping[str, Any], trace: Any, *,
                     battery_pct: float | None = None, current: bool = True) -> None:
        """Account for one answered request: fill ``trace.energy_mj``, ``battery_pct`` and
        ``version``; count it; feed the drift monitor; add the leg spans.

        Args:
            bundle: the bundle version that answered.
            feeds: the validated inputs.
            outputs: the outputs returned.
            trace: the request's Trace.
            battery_pct: the battery level the request was decided with (None = :meth:`battery_pct`).
            current: ``bundle`` is the model's serving version (not a candidate or a stale one).
        """
        model, version = bundle.model_name, bundle.plan_digest[:12]
        battery_pct = self.battery_pct() if battery_pct is None else battery_pct
        est = self._link.estimate() if self._link is not None else None
        up, down = (est.uplink_mbps, est.downlink_mbps) if est is not None else (None, None)
        trace.energy_mj = round(request_energy_mj(trace, _energy_model(bundle), up or self._default_up, down), 4)
        trace.battery_pct = battery_pct
        trace.version = trace.version or version
        self.energy.labels(model, trace.partition).observe(trace.energy_mj)
        if battery_pct is not None:
            self.battery.set(battery_pct)
        self.version_requests.labels(model, version).inc()
        if current:
            self._serving(model, version)
        self.drift.observe(bundle, feeds, outputs, current=current)
        self._leg_spans(trace)

    def _serving(self, model: str, version: str) -> None:
        """Mark ``version`` as the one ``model`` serves; drop the series of versions it replaced."""
        with self._lock:
            old = self._versions.get(model, set())
            if old == {version}:
                return
            self._versions[model] = {version}
        for v in old - {version}:
            for metric in (self.version_info, self.version_requests):
                try:
                    metric.remove(model, v)
                except KeyError:
                    pass
        self.version_info.labels(model, version).set(1)

    def _leg_spans(self, trace: Any) -> None:
        start = _request_start_ns.get()
        if start is None:
            return
        attrs = {
            "splitgate.model": trace.model, "splitgate.partition": trace.partition,
            "splitgate.version": trace.version, "splitgate.fallback": trace.fallback or "",
            "splitgate.device_ms": trace.device_ms, "splitgate.network_ms": trace.network_ms,
            "splitgate.cloud_ms": trace.cloud_ms, "splitgate.total_ms": trace.total_ms,
            "splitgate.bytes_sent": trace.bytes_sent, "splitgate.bytes_received": trace.bytes_received,
            "splitgate.energy_mj": trace.energy_mj, "splitgate.battery_pct": trace.battery_pct,
        }
        span = _tracing.current_span()
        if span is not None:
            for k, v in attrs.items():
                if v is not None:
                    span.set_attribute(k, v)
        if trace.device_ms > 0:  # (the cloud leg has its own span, made around the call: CloudClient)
            _tracing.record_span("splitgate.device", start, trace.device_ms,
                                 {"splitgate.partition": trace.partition, "splitgate.leg": "device",
                                  "splitgate.device_ms": trace.device_ms})
