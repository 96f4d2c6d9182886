"""Per model/partition counters and latency histograms, in Prometheus format
(prometheus_client, one private registry per Gateway) and readable from Python."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["GatewayMetrics"]

_BUCKETS_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class GatewayMetrics:
    """Counters: requests, fallbacks, bytes, cascade outcomes. Histograms: device/network/cloud/total ms.
    Gauge: the learned device factor per model (``Trace.device_factor``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("model", "partition")
        self.requests = Counter(
            "splitgate_requests", "Requests answered", (*labels, "outcome"), registry=self.registry
        )
        self.fallbacks = Counter(
            "splitgate_fallbacks", "Requests finished on the device after a cloud problem",
            (*labels, "reason"), registry=self.registry,
        )
        self.bytes_sent = Counter(
            "splitgate_bytes_sent", "Bytes of cut tensors sent to the cloud", labels, registry=self.registry
        )
        self.bytes_received = Counter(
            "splitgate_bytes_received", "Bytes received from the cloud", labels, registry=self.registry
        )
        self.latency = Histogram(
            "splitgate_latency_ms", "Latency by leg in milliseconds", (*labels, "leg"),
            buckets=_BUCKETS_MS, registry=self.registry,
        )
        self.device_factor = Gauge(
            "splitgate_device_factor",
            "The device's measured speed against the plan its last decision used (3 = three times slower)",
            ("model",), registry=self.registry,
        )
        self.cascade = Counter(
            "splitgate_cascade",
            "Requests that met a confident-on-device cascade: exit (the small model answered), partial (it "
            "answered some rows of a batch, the chosen path the others), through (it ran, then the chosen path), "
            "skipped (it would not pay), error (it failed; the path answered)",
            ("model", "outcome"), registry=self.registry,
        )

    def record(self, trace: Any, outcome: str = "ok") -> None:
        """Count one finished request from its Trace."""
        m, p = trace.model, trace.partition
        self.requests.labels(m, p, outcome).inc()
        if trace.fallback:
            self.fallbacks.labels(m, p, trace.fallback).inc()
        self.bytes_sent.labels(m, p).inc(trace.bytes_sent)
        self.bytes_received.labels(m, p).inc(trace.bytes_received)
        for leg in ("device", "network", "cloud", "total"):
            self.latency.labels(m, p, leg).observe(getattr(trace, f"{leg}_ms"))
        if not getattr(trace, "cached", False):
            self.device_factor.labels(m).set(getattr(trace, "device_factor", 1.0))
        if getattr(trace, "cascade", None):
            self.cascade.labels(m, trace.cascade).inc()

    def prometheus(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, float]:
        """Every sample as ``{"name{label=value,...}": value}`` for Python callers."""
        out: dict[str, float] = {}
        for family in self.registry.collect():
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
        return out
