"""OpenTelemetry tracing where the package is installed; nothing at all where it is not.

Edge and cloud both use this module (it sits in the shared low layer so the
cloud tier never imports the edge). Every function is a no-op when
``opentelemetry`` cannot be imported: it is an optional dependency (the
``otel`` extra), imported on first use, never at import time of splitgate.
Spans go to the process's global tracer provider. Until one is configured
(``opentelemetry.trace.set_tracer_provider``; the API's default proxy or no-op
provider records nothing) no span is even started: the check costs about a
microsecond a request. Trace context is then not propagated either.

Trace context crosses the wire as W3C Trace Context (``traceparent``,
``tracestate``) in the gRPC call metadata of ``ModelInfer``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

__all__ = ["active", "available", "client_span", "current_headers", "current_span", "now_ns", "record_span", "request_span",
           "server_span"]

TRACER_NAME = "splitgate"
_otel: Any = None  # the imported modules, False when not installed, None before the first try


def _modules() -> Any:
    """``(trace, propagate)`` of opentelemetry, or None when it is not installed."""
    global _otel
    if _otel is None:
        try:
            from opentelemetry import propagate, trace
        except ImportError:
            _otel = False
        else:
            _otel = (trace, propagate)
    return _otel or None


def available() -> bool:
    """True when opentelemetry is importable (spans are then recorded through its global provider)."""
    return _modules() is not None


def active() -> bool:
    """True when opentelemetry is installed and a tracer provider that records is configured."""
    return _active() is not None


def _active() -> Any:
    """``(trace, propagate)`` when a tracer provider that records is configured, else None."""
    otel = _modules()
    if otel is None:
        return None
    provider = otel[0].get_tracer_provider()
    if isinstance(provider, (otel[0].ProxyTracerProvider, otel[0].NoOpTracerProvider)):
        return None
    return otel


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes OTel accepts (None values dropped)."""
    return {k: v for k, v in attributes.items() if v is not None}


@contextlib.contextmanager
def request_span(name: str, attributes: Mapping[str, Any]) -> Iterator[Any]:
    """A span made current for the body (the edge's per-request span); yields it (None without OTel).
    An exception escaping the body is recorded on the span and re-raised."""
    otel = _active()
    if otel is None:
        yield None
        return
    tracer = otel[0].get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(name, attributes=_clean(attributes)) as span:
        yield span


def current_headers() -> dict[str, str]:
    """The current trace context as W3C headers (``traceparent``, ``tracestate``); empty without OTel
    or outside a recording span. Take it on the request's thread: worker threads do not inherit it."""
    otel = _active()
    if otel is None:
        return {}
    carrier: dict[str, str] = {}
    otel[1].inject(carrier)
    return carrier


@contextlib.contextmanager
def client_span(name: str, parent: Mapping[str, str] | None, attributes: Mapping[str, Any]) -> Iterator[
        tuple[tuple[str, str], ...]]:
    """A client span for one outgoing call, child of ``parent`` (W3C headers; None = the current
    span); yields the call metadata that carries it. No span (empty metadata) without OTel or
    without a parent (the edge's link probes are not traced)."""
    otel = _active()
    if otel is None or (not parent and not otel[0].get_current_span().is_recording()):
        yield ()
        return
    trace, propagate = otel
    ctx = propagate.extract(dict(parent)) if parent else None
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(name, context=ctx, kind=trace.SpanKind.CLIENT,
                                      attributes=_clean(attributes)) as span:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        try:
            yield tuple(carrier.items())
        except BaseException as exc:
            span.set_attribute("error.type", type(exc).__name__)
            raise


@contextlib.contextmanager
def server_span(metadata: Iterable[tuple[str, Any]] | None, name: str,
                attributes: Mapping[str, Any]) -> Iterator[Any]:
    """A server span for one incoming call, child of the W3C context in its gRPC ``metadata``
    (a root span when there is none); yields it (None without OTel)."""
    otel = _active()
    if otel is None:
        yield None
        return
    trace, propagate = otel
    carrier = {str(k).lower(): v for k, v in metadata or () if isinstance(v, str)}
    ctx = propagate.extract(carrier)
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(name, context=ctx, kind=trace.SpanKind.SERVER,
                                      attributes=_clean(attributes)) as span:
        yield span


def current_span() -> Any:
    """The current span when it records, else None (also without OTel)."""
    otel = _active()
    if otel is None:
        return None
    span = otel[0].get_current_span()
    return span if span.is_recording() else None


def record_span(name: str, start_ns: int, duration_ms: float, attributes: Mapping[str, Any]) -> None:
    """A finished child span of the current span, timed after the fact (a leg measured by the
    request: ``start_ns`` in ``time.time_ns()`` terms). No-op without OTel."""
    otel = _active()
    if otel is None or duration_ms < 0:
        return
    tracer = otel[0].get_tracer(TRACER_NAME)
    span = tracer.start_span(name, start_time=start_ns, attributes=_clean(attributes))
    span.end(end_time=start_ns + int(duration_ms * 1e6))


def now_ns() -> int:
    """Wall-clock ns, the time base of span timestamps."""
    return time.time_ns()
