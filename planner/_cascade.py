"""A confident-on-device cascade: a small device model that answers when it is sure.

``splitgate plan MODEL --cascade small.onnx`` (or ``--cascade int8``: the
planner's own int8 full model, :mod:`splitgate.planner._quantize`) adds a
small classifier to the bundle. The edge runs it first when the policy says
it pays, answers with its outputs when its top-1 confidence is at least the
calibrated threshold, and otherwise takes the usual (split, cloud or device)
path (:mod:`splitgate.edge._cascade`).

Calibration (:func:`calibrate_threshold`): the full fp32 model and the small
model run on the planner's calibration requests; each sample gets the small
model's confidence (top-1 softmax probability of its classifier output, or the
top-1 value itself when the output already holds probabilities) and whether
its argmax agrees with the full model's. The threshold is the lowest
confidence such that, among the samples at or above it, top-1 agreement with
the full model is at least the accuracy guard (:class:`~splitgate.planner._accuracy.Guard`,
99 % by default): the largest exit rate the guard allows.

A bundle records it as plan data (in the plan digest)::

    BUNDLE/cascade/model.onnx      the small model
    BUNDLE/cascade/cascade.json    threshold, exit rate, agreement, device time

The small model must take the full model's inputs (names, types, ranks,
fixed dims) and produce every one of its outputs, one of them a classifier
(float ``[batch, classes]``, classes >= 2); anything else is refused with one
line (:func:`check_interface`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from splitgate.planner._accuracy import Calibration, Guard
from splitgate.planner._graph import TensorSpec
from splitgate.errors import BundleError, InvalidArgument

__all__ = [
    "CASCADE_DIR", "CASCADE_FILE", "CASCADE_MODEL", "INT8", "CascadeSpec", "PlannedCascade",
    "check_interface", "confidence", "confidence_kind", "calibrate_threshold", "plan_cascade", "load_cascade_model",
    "measure_cascade", "with_device_ms", "PROFILE_KEY", "planned_small_ms",
]

CASCADE_DIR = "cascade"
#: the cascade's figures (plan data, listed in the manifest)
CASCADE_FILE = "cascade/cascade.json"
#: the small model
CASCADE_MODEL = "cascade/model.onnx"
#: ``--cascade int8``: the planner's own int8 full model
INT8 = "int8"
#: ``profile.json`` key of the cascade's device time as a device measured it
#: (``splitgate refit``; decision data, outside the plan digest)
PROFILE_KEY = "cascade"


@dataclass(frozen=True)
class CascadeSpec:
    """A bundle's cascade, as ``cascade/cascade.json`` records it.

    Attributes:
        source: ``"int8"`` (the planner's int8 full model) or the user model's file name.
        model: the small model's path in the bundle (``cascade/model.onnx``).
        output: the classifier output whose confidence decides.
        confidence: ``"softmax"`` (logits: top-1 softmax probability) or
            ``"probability"`` (outputs already probabilities: their top-1 value).
        threshold: answer on the device when the confidence is at least this
            (above 1: never; no calibration sample could exit within the guard).
        exit_rate: fraction of calibration samples at or above the threshold.
        agreement: top-1 agreement with the full model among those samples
            (1.0 when none exits).
        overall_agreement: top-1 agreement over every calibration sample.
        min_top1_agreement: the guard the threshold was calibrated for.
        samples: calibration samples (rows).
        calibration_source: where they came from (``"random"`` = seeded noise: weak).
        device_ms: the small model's measured device time at the main planned
            shape (device slowdown or device profile applied as for the
            partitions); None when planned without profiling.
        full_device_ms: the full model's (``device`` partition) at the same, None likewise.
    """

    source: str
    model: str
    output: str
    confidence: str
    threshold: float
    exit_rate: float
    agreement: float
    overall_agreement: float
    min_top1_agreement: float
    samples: int
    calibration_source: str
    device_ms: float | None = None
    full_device_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``cascade/cascade.json``)."""
        return {"version": 1, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "cascade.json") -> CascadeSpec:
        """Read ``cascade/cascade.json``.

        Raises:
            BundleError: a missing or malformed field.
        """
        try:
            spec = cls(
                source=str(data["source"]), model=str(data["model"]), output=str(data["output"]),
                confidence=str(data["confidence"]), threshold=float(data["threshold"]),
                exit_rate=float(data["exit_rate"]), agreement=float(data["agreement"]),
                overall_agreement=float(data["overall_agreement"]),
                min_top1_agreement=float(data["min_top1_agreement"]), samples=int(data["samples"]),
                calibration_source=str(data["calibration_source"]),
                device_ms=None if data.get("device_ms") is None else float(data["device_ms"]),
                full_device_ms=None if data.get("full_device_ms") is None else float(data["full_device_ms"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{where}: malformed cascade ({exc!r})") from None
        if spec.confidence not in ("softmax", "probability") or not 0.0 <= spec.exit_rate <= 1.0:
            raise BundleError(f"{where}: malformed cascade (confidence {spec.confidence!r}, "
                              f"exit_rate {spec.exit_rate})")
        return spec

    def planned_ms(self, full_device_ms: float | None = None) -> float | None:
        """The small model's planned device time; with ``full_device_ms`` (the
        ``device`` partition's planned time for a request's shapes) scaled by
        that against the full model's time at planning. None when not measured."""
        if self.device_ms is None:
            return None
        if full_device_ms is not None and self.full_device_ms:
            return self.device_ms * full_device_ms / self.full_device_ms
        return self.device_ms


def planned_small_ms(spec: CascadeSpec, profile: Mapping[str, Any] | None,
                     full_device_ms: float | None = None) -> float | None:
    """The small model's planned device time, the device's own measurement first.

    A bundle refitted to a device profile that timed the cascade model
    (``splitgate profile`` on the bundle, then ``splitgate refit``) carries
    that time in ``profile.json`` (:data:`PROFILE_KEY`: ``device_ms`` and the
    full model's ``full_device_ms`` measured with it); it replaces the
    planning machine's ratio recorded in ``cascade.json``
    (:meth:`CascadeSpec.planned_ms`).

    Args:
        spec: the bundle's cascade.
        profile: the bundle's ``profile.json`` document (None: none).
        full_device_ms: the ``device`` partition's planned time for a request's
            shapes: the time is scaled by it against the full model's time
            measured with the small model. None = at the main planned shape.

    Returns:
        ms, or None when nothing timed the small model.
    """
    entry = (profile or {}).get(PROFILE_KEY)
    if isinstance(entry, Mapping) and entry.get("device_ms") is not None:
        ms = float(entry["device_ms"])
        full = entry.get("full_device_ms")
        if full_device_ms is not None and full:
            return ms * full_device_ms / float(full)
        return ms
    return spec.planned_ms(full_device_ms)


@dataclass
class PlannedCascade:
    """What planning a cascade yields: its figures and the small model to write."""

    spec: CascadeSpec
    model: onnx.ModelProto


def load_cascade_model(source: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read a user's small model file.

    Raises:
        InvalidArgument: missing or not an ONNX model.
    """
    path = Path(source)
    if not path.is_file():
        raise InvalidArgument(f"cascade model not found: {path}")
    try:
        return onnx.load(os.fspath(path))
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types
        raise InvalidArgument(f"cascade model {path} is not a readable ONNX model: {type(exc).__name__}") from None


def _specs(values: Sequence[onnx.ValueInfoProto], skip: frozenset[str] = frozenset()) -> list[TensorSpec]:
    from splitgate.planner._graph import spec_of_value_info

    return [spec_of_value_info(v) or TensorSpec(v.name, "untyped", []) for v in values if v.name not in skip]


def _dims_match(a: Sequence[int], b: Sequence[int]) -> bool:
    """Same rank; fixed dims equal where both are fixed (-1 = dynamic)."""
    return len(a) == len(b) and all(x == y or x < 0 or y < 0 for x, y in zip(a, b))


def _is_classifier(spec: TensorSpec) -> bool:
    return spec.datatype in ("FP32", "FP16", "FP64", "BF16") and len(spec.shape) == 2 and (
        spec.shape[1] < 0 or spec.shape[1] >= 2)


def check_interface(full: Sequence[TensorSpec], full_out: Sequence[TensorSpec], small: onnx.ModelProto,
                    *, what: str) -> str:
    """Check that ``small`` can stand in for the full model; the classifier output to read.

    Args:
        full: the full model's inputs.
        full_out: its outputs.
        small: the small model.
        what: how to name the small model in an error.

    Returns:
        The name of the first classifier output (float ``[batch, classes]``).

    Raises:
        InvalidArgument: one line naming the mismatch.
    """
    inits = frozenset(i.name for i in small.graph.initializer)
    s_in = {s.name: s for s in _specs(small.graph.input, inits)}
    s_out = {s.name: s for s in _specs(small.graph.output)}
    want_in = {s.name: s for s in full}
    if set(s_in) != set(want_in):
        raise InvalidArgument(f"cascade model {what}: its inputs {sorted(s_in)} are not the model's {sorted(want_in)}")
    for name, spec in want_in.items():
        got = s_in[name]
        if got.datatype != spec.datatype or not _dims_match(got.shape, spec.shape):
            raise InvalidArgument(f"cascade model {what}: input '{name}' is {got.datatype}{list(got.shape)}, "
                                  f"the model's is {spec.datatype}{list(spec.shape)}")
    for spec in full_out:
        got = s_out.get(spec.name)
        if got is None:
            raise InvalidArgument(f"cascade model {what}: it lacks the model's output '{spec.name}' "
                                  f"(has {sorted(s_out)})")
        if got.datatype != spec.datatype or not _dims_match(got.shape, spec.shape):
            raise InvalidArgument(f"cascade model {what}: output '{spec.name}' is {got.datatype}{list(got.shape)}, "
                                  f"the model's is {spec.datatype}{list(spec.shape)}")
    for spec in full_out:
        if _is_classifier(spec):
            return spec.name
    raise InvalidArgument(f"cascade model {what}: the model has no classifier output (float [batch, classes]) "
                          f"to take a confidence from (outputs {[(s.name, list(s.shape)) for s in full_out]})")


def confidence_kind(outputs: np.ndarray) -> str:
    """``"probability"`` when every row is non-negative and sums to 1 (within 1e-3), else ``"softmax"``."""
    a = np.asarray(outputs, dtype=np.float64)
    if a.size and a.min() >= 0.0 and a.max() <= 1.0 and np.allclose(a.sum(axis=-1), 1.0, atol=1e-3):
        return "probability"
    return "softmax"


def confidence(outputs: np.ndarray, kind: str) -> np.ndarray:
    """Per-row top-1 confidence of classifier outputs ``[rows, classes]``.

    Args:
        outputs: logits (``kind="softmax"``) or probabilities (``"probability"``).
        kind: see :func:`confidence_kind`.

    Returns:
        float64 ``[rows]``: the top-1 softmax probability, or the top-1 value.
    """
    a = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1) if np.ndim(outputs) else \
        np.asarray(outputs, dtype=np.float64).reshape(1, -1)
    if kind == "probability":
        return a.max(axis=1)
    shifted = a - a.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return 1.0 / e.sum(axis=1)  # exp(top - top) / sum = the top-1 probability


def calibrate_threshold(conf: np.ndarray, agree: np.ndarray, min_agreement: float) -> tuple[float, float, float]:
    """The lowest confidence threshold whose exits keep top-1 agreement at or above ``min_agreement``.

    Samples are taken most confident first, ties together (a threshold admits
    every sample at its confidence); the largest such set whose agreement
    passes sets the threshold at its least confident member.

    Args:
        conf: per-sample confidence of the small model.
        agree: per-sample top-1 agreement with the full model (bool).
        min_agreement: the guard.

    Returns:
        ``(threshold, exit_rate, agreement among exits)``; ``(inf, 0.0, 1.0)``
        when not even the most confident samples pass.
    """
    conf = np.asarray(conf, dtype=np.float64)
    agree = np.asarray(agree, dtype=bool)
    if conf.size == 0:
        return float("inf"), 0.0, 1.0
    order = np.argsort(-conf, kind="stable")
    c, a = conf[order], agree[order]
    hits = np.cumsum(a)
    best = (float("inf"), 0.0, 1.0)
    n = len(c)
    for k in range(1, n + 1):
        if k < n and c[k] == c[k - 1]:
            continue  # (a tie: the threshold at this value admits the next sample too)
        rate = hits[k - 1] / k
        if rate >= min_agreement:
            best = (float(c[k - 1]), k / n, float(rate))
    return best


def _rows(outputs: list[dict[str, np.ndarray]], name: str) -> np.ndarray:
    return np.concatenate([np.asarray(o[name]).reshape(np.shape(o[name])[0], -1) for o in outputs])


def _run(model: onnx.ModelProto, requests: Sequence[Mapping[str, np.ndarray]], threads: int,
         what: str) -> list[dict[str, np.ndarray]]:
    from splitgate.planner._profile import make_session

    session = make_session(model, threads)
    names = [o.name for o in session.get_outputs()]
    inputs = [i.name for i in session.get_inputs()]
    try:
        return [dict(zip(names, session.run(names, {k: r[k] for k in inputs}))) for r in requests]
    except Exception as exc:  # noqa: BLE001 - ORT raises several types
        raise InvalidArgument(f"{what} fails on the calibration inputs: {str(exc).splitlines()[0]}") from None


def plan_cascade(
    full: onnx.ModelProto, small: onnx.ModelProto, *, source: str, output: str, calibration: Calibration,
    guard: Guard, threads: int = 2,
) -> PlannedCascade:
    """Calibrate a cascade's threshold (no timing: see :func:`measure_cascade`).

    Args:
        full: the fp32 full model.
        small: the small model (interface already checked: :func:`check_interface`).
        source: ``"int8"`` or the user's file name.
        output: the classifier output to read.
        calibration: the calibration requests.
        guard: the accuracy guard (``min_top1_agreement``).
        threads: intra-op threads of the calibration sessions.

    Returns:
        The :class:`PlannedCascade` (device times None).

    Raises:
        InvalidArgument: a model fails on the calibration inputs.
    """
    ref = _rows(_run(full, calibration.requests, threads, "the model"), output)
    got = _rows(_run(small, calibration.requests, threads, f"cascade model {source}"), output)
    kind = confidence_kind(got)
    conf = confidence(got, kind)
    agree = ref.argmax(axis=1) == got.argmax(axis=1)
    threshold, rate, agreement = calibrate_threshold(conf, agree, guard.min_top1_agreement)
    spec = CascadeSpec(
        source=source, model=CASCADE_MODEL, output=output, confidence=kind,
        threshold=threshold if np.isfinite(threshold) else 2.0, exit_rate=round(rate, 6),
        agreement=round(agreement, 6), overall_agreement=round(float(agree.mean()), 6),
        min_top1_agreement=guard.min_top1_agreement, samples=int(len(conf)), calibration_source=calibration.source,
    )
    return PlannedCascade(spec, small)


def with_device_ms(planned: PlannedCascade, device_ms: float, full_device_ms: float) -> PlannedCascade:
    """``planned`` with its device times given (the small model is a partition measured
    with the others: ``--cascade int8`` taking the kept ``device~int8`` model).

    Args:
        planned: the calibrated cascade.
        device_ms: the small model's planned device time at the main planned shape.
        full_device_ms: the ``device`` partition's there.
    """
    from dataclasses import replace

    spec = replace(planned.spec, device_ms=round(device_ms, 4), full_device_ms=round(full_device_ms, 4))
    return PlannedCascade(spec, planned.model)


def measure_cascade(planned: PlannedCascade, full: onnx.ModelProto, feeds: Mapping[str, np.ndarray], *,
                    full_device_ms: float, threads: int, warmup: int, repeats: int) -> PlannedCascade:
    """Time the small model against the full model, interleaved on the same inputs.

    The small model's device time is the full model's planned one
    (``full_device_ms``: slowdown or device profile applied) times their
    measured ratio here.

    Args:
        planned: the calibrated cascade.
        full: the fp32 full model.
        feeds: one request at the main planned shape.
        full_device_ms: the ``device`` partition's planned device time there.
        threads, warmup, repeats: as the partitions were timed.

    Returns:
        ``planned`` with ``device_ms`` and ``full_device_ms`` set.
    """
    from dataclasses import replace

    from splitgate.planner._profile import time_partitions

    (small_t, _), (full_t, _) = time_partitions(
        [(planned.model, None), (full, None)], feeds, device_threads=threads, warmup=warmup, repeats=repeats,
        device_gap_ms=10.0,
    )
    assert small_t is not None and full_t is not None
    ratio = small_t.typical_ms / full_t.typical_ms if full_t.typical_ms > 0 else 1.0
    spec = replace(planned.spec, device_ms=round(full_device_ms * ratio, 4), full_device_ms=round(full_device_ms, 4))
    return PlannedCascade(spec, planned.model)
