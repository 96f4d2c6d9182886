"""Quantized device prefixes: int8 twins of the planned prefixes, guarded and measured.

With :attr:`splitgate.planner.PlanOptions.quantize` every planned split ``P``
with a device prefix, and the full model as ``device``, gets an int8 twin
``P~int8`` (``cut-9~int8``, ``device~int8``): the same cut, the same fp32
suffix (the twin shares ``P``'s suffix file), a prefix quantized with
onnxruntime's quantization tools. Encoded twins of a kept int8 prefix follow
the usual scheme (``cut-9~int8@fp16``; :func:`splitgate.planner._encoding.split_id`
gives ``("cut-9~int8", "fp16")``), so the choice is joint over (cut, prefix
precision, wire encoding). :func:`candidate_parts` splits an id into those three.

How a prefix is quantized (:func:`quantization_method`):

* a model with convolutions: **static** int8, QDQ format, per-channel weights
  (onnxruntime's ``quantize_static``). Activation ranges come from one
  MinMax calibration of the *full* model on the planner's calibration
  requests, cached and reused for every prefix, so ``cut-K~int8`` computes
  exactly the first layers of ``device~int8``. On this CPU (AVX-512 VNNI,
  ResNet-18 224x224, 1 thread) QDQ runs 1.3x faster than fp32 at a quarter of
  the weights, where the QOperator format and dynamic quantization run 4x
  slower than fp32 (benchmarks/bench_quantize.py);
* a model without convolutions but with MatMul/Gemm/LSTM/GRU/Attention:
  **dynamic** int8 (``quantize_dynamic``: weights int8, activations per
  request, no calibration);
* otherwise nothing is quantized.

The guard (:mod:`splitgate.planner._accuracy`): the int8 prefix then the fp32
suffix run on the calibration requests and their outputs are compared with
the fp32 full model's (top-1 agreement for classifiers, cosine otherwise).
A twin that fails is dropped with the reason; one that passes is measured with
every other partition, and kept only when its prefix is measured faster or is
smaller (serialized bytes) than the fp32 prefix. ``profile.json`` ->
``quantization`` lists every twin tried (method, bytes, accuracy, the time
quantizing took) and the dropped ones with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import onnx
from splitgate.planner._accuracy import Calibration, Guard, check, compare_outputs
from splitgate.planner._profile import make_session

from splitgate.errors import BundleError

__all__ = [
    "PRECISIONS",
    "PRECISION_SEP",
    "PrefixQuantizer",
    "QuantizeResult",
    "candidate_parts",
    "quantization_method",
    "quantized_id",
]

#: separates a partition id from its prefix precision (``cut-9~int8``)
PRECISION_SEP = "~"
#: prefix precisions a partition may have
PRECISIONS = ("fp32", "int8")

_STATIC_OPS = frozenset({"Conv", "ConvTranspose"})
_DYNAMIC_OPS = frozenset({"MatMul", "Gemm", "LSTM", "GRU", "Attention"})
_QUANTIZED_BY = {"static": _STATIC_OPS | {"MatMul", "Gemm"}, "dynamic": _DYNAMIC_OPS}


def quantized_id(base: str, precision: str = "int8") -> str:
    """``cut-9`` + ``int8`` -> ``cut-9~int8``; ``fp32`` keeps the base id."""
    return base if precision == "fp32" else f"{base}{PRECISION_SEP}{precision}"


def candidate_parts(pid: str) -> tuple[str, str, str]:
    """A candidate id as (partition, prefix precision, wire encoding).

    ``cut-9~int8@fp16`` -> (``cut-9``, ``int8``, ``fp16``); ``cut-9`` ->
    (``cut-9``, ``fp32``, ``raw``); ``cloud@int8`` -> (``cloud``, ``fp32``, ``int8``).
    """
    rest, _, encoding = pid.partition("@")
    base, _, precision = rest.partition(PRECISION_SEP)
    return base, precision or "fp32", encoding or "raw"


def quantization_method(model: onnx.ModelProto) -> str | None:
    """``"static"`` for a model with convolutions, ``"dynamic"`` for one with only
    MatMul/Gemm/LSTM/GRU/Attention to quantize, None when it has neither."""
    ops = {n.op_type for n in model.graph.node}
    if ops & _STATIC_OPS:
        return "static"
    if ops & _DYNAMIC_OPS:
        return "dynamic"
    return None


@dataclass
class QuantizeResult:
    """One int8 twin, built and guarded.

    Attributes:
        pid: the twin's id (``cut-9~int8``).
        base: its fp32 partition's id.
        method: ``"static"`` or ``"dynamic"`` (None: nothing to quantize).
        fp32_bytes: serialized bytes of the fp32 prefix.
        int8_bytes: serialized bytes of the int8 prefix (0 when none was built).
        seconds: time spent quantizing this prefix (the shared calibration not included).
        accuracy: per-output metrics against the fp32 full model.
        dropped: why it was dropped, or None.
        fp32_ms, int8_ms: the prefixes' measured device times (after measurement).
    """

    pid: str
    base: str
    method: str | None
    fp32_bytes: int
    int8_bytes: int = 0
    seconds: float = 0.0
    accuracy: dict[str, dict[str, Any]] = field(default_factory=dict)
    dropped: str | None = None
    fp32_ms: float | None = None
    int8_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``profile.json`` -> ``quantization.measured``)."""
        return {
            "base": self.base,
            "method": self.method,
            "fp32_bytes": self.fp32_bytes,
            "int8_bytes": self.int8_bytes,
            "seconds": round(self.seconds, 3),
            "fp32_ms": None if self.fp32_ms is None else round(self.fp32_ms, 4),
            "int8_ms": None if self.int8_ms is None else round(self.int8_ms, 4),
            "accuracy": {k: {m: (round(v, 6) if isinstance(v, float) else v) for m, v in row.items()}
                         for k, row in self.accuracy.items()},
            "dropped": self.dropped,
        }


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Silence the quantization tools' root-logger advice (pre-processing) for one call."""
    root = logging.getLogger()
    only_errors = logging.Filter()
    only_errors.filter = lambda record: record.levelno >= logging.ERROR  # type: ignore[method-assign]
    root.addFilter(only_errors)
    try:
        yield
    finally:
        root.removeFilter(only_errors)


def _per_channel_ok(model: onnx.ModelProto) -> bool:
    """Per-channel weights need DequantizeLinear's ``axis``, which exists from opset 13;
    a model exported at an older opset (YOLOX ships at 11) gets per-tensor int8, else
    onnxruntime refuses the int8 model as an invalid graph."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return opset >= 13


def _plain(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without intermediate value infos (planning sizes must not end up in the int8 model)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    return out


class _Reader:
    """The calibration requests as onnxruntime's ``CalibrationDataReader`` wants them."""

    def __init__(self, requests: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]) -> None:
        self._items = iter([{k: np.asarray(r[k]) for k in names} for r in requests])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


class PrefixQuantizer:
    """Builds and guards the int8 twins of one model's prefixes.

    The full model's activation ranges are calibrated once (static method) and
    reused for every prefix; the fp32 full model's outputs on the calibration
    requests are the guard's reference. Use as a context manager (a temporary
    directory holds the quantizer's files).

    Args:
        model: the fp32 full model.
        calibration: the calibration requests (the model's inputs).
        guard: the accuracy thresholds.
        threads: intra-op threads of the guard's sessions.
    """

    def __init__(self, model: onnx.ModelProto, calibration: Calibration, guard: Guard, *, threads: int = 2) -> None:
        self.model = _plain(model)
        self.calibration = calibration
        self.guard = guard
        self.threads = threads
        self.method = quantization_method(self.model)
        self.per_channel = _per_channel_ok(self.model)
        self.calibration_s = 0.0
        self._tmp = tempfile.TemporaryDirectory(prefix="splitgate-quant-")
        self._dir = Path(self._tmp.name)
        self._ranges: Path | None = None
        self._reference: list[dict[str, np.ndarray]] | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the temporary files."""
        self._tmp.cleanup()

    def reference(self) -> list[dict[str, np.ndarray]]:
        """The fp32 full model's outputs on the calibration requests (computed once).

        Raises:
            BundleError: onnxruntime cannot run the model.
        """
        if self._reference is None:
            self._reference = _run_all(make_session(self.model, self.threads), self.calibration.requests)
        return self._reference

    def quantize(self, pid: str, prefix: onnx.ModelProto | None,
                 suffix: onnx.ModelProto | None) -> tuple[onnx.ModelProto | None, QuantizeResult]:
        """The int8 twin of one prefix, guarded.

        Args:
            pid: the fp32 partition's id (``cut-9``, ``device``).
            prefix: its prefix model; None = the full model (``device``).
            suffix: its fp32 suffix (None for ``device``).

        Returns:
            (the int8 prefix, or None when it was not built or failed the guard; the result).
        """
        fp32 = self.model if prefix is None else _plain(prefix)
        result = QuantizeResult(quantized_id(pid), pid, self.method, fp32.ByteSize())
        if self.method is None:
            result.dropped = "nothing to quantize (no Conv, MatMul, Gemm, LSTM, GRU or Attention)"
            return None, result
        if not {n.op_type for n in fp32.graph.node} & _QUANTIZED_BY[self.method]:
            result.dropped = f"nothing to quantize in this prefix ({self.method} method)"
            return None, result
        try:
            if self.method == "static":
                self._calibrate()  # (once, not counted in this prefix's seconds)
            t0 = time.perf_counter()
            int8 = self._quantize(fp32, pid)
        except Exception as exc:  # noqa: BLE001 - the tools raise many types; the twin is dropped, planning goes on
            result.dropped = f"quantization failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return None, result
        result.seconds = time.perf_counter() - t0
        result.int8_bytes = int8.ByteSize()
        try:
            got = self._outputs(int8, suffix)
        except Exception as exc:  # noqa: BLE001 - an int8 model onnxruntime cannot run is dropped
            result.dropped = f"onnxruntime cannot run the int8 prefix: {str(exc).splitlines()[0]}"
            return None, result
        result.accuracy = compare_outputs(self.reference(), got, output_kind=self.guard.output_kind)
        result.dropped = check(result.accuracy, self.guard)
        return (None if result.dropped else int8), result

    def _quantize(self, fp32: onnx.ModelProto, pid: str) -> onnx.ModelProto:
        from onnxruntime.quantization import (
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )

        src, out = self._dir / f"{pid}.onnx", self._dir / f"{pid}.int8.onnx"
        onnx.save(fp32, os.fspath(src))  # (the tools take paths: given a proto they strip its weights in place)
        with _quiet_quantizer():
            if self.method == "dynamic":
                quantize_dynamic(os.fspath(src), os.fspath(out), weight_type=QuantType.QInt8)
            else:
                ranges = self._calibrate()
                quantize_static(os.fspath(src), os.fspath(out), None, quant_format=QuantFormat.QDQ,
                                per_channel=self.per_channel, calibration_cache_path=os.fspath(ranges))
        int8 = onnx.load(os.fspath(out))
        del int8.graph.value_info[:]
        return int8

    def _calibrate(self) -> Path:
        """Calibrate the full model's activation ranges once (MinMax); the cache file's path."""
        if self._ranges is not None:
            return self._ranges
        from onnxruntime.quantization import QuantFormat, quantize_static

        t0 = time.perf_counter()
        src, ranges = self._dir / "model.onnx", self._dir / "ranges.json"
        onnx.save(self.model, os.fspath(src))
        names = [i.name for i in self.model.graph.input]
        with _quiet_quantizer():
            quantize_static(os.fspath(src), os.fspath(self._dir / "model.int8.onnx"),
                            _Reader(self.calibration.requests, names), quant_format=QuantFormat.QDQ,
                            per_channel=self.per_channel, calibration_cache_path=os.fspath(ranges))
        self.calibration_s = time.perf_counter() - t0
        self._ranges = ranges
        return ranges

    def _outputs(self, int8: onnx.ModelProto, suffix: onnx.ModelProto | None) -> list[dict[str, np.ndarray]]:
        """The int8 prefix then the fp32 suffix on every calibration request."""
        pre = make_session(int8, self.threads)
        if suffix is None:
            return _run_all(pre, self.calibration.requests)
        suf = make_session(suffix, self.threads)
        pre_out = [o.name for o in pre.get_outputs()]
        pre_in = [i.name for i in pre.get_inputs()]
        suf_in = [i.name for i in suf.get_inputs()]
        suf_out = [o.name for o in suf.get_outputs()]
        got = []
        for feeds in self.calibration.requests:
            produced = dict(zip(pre_out, pre.run(pre_out, {k: feeds[k] for k in pre_in})))
            cut = {k: produced[k] if k in produced else feeds[k] for k in suf_in}
            got.append(dict(zip(suf_out, suf.run(suf_out, cut))))
        return got


def _run_all(session: Any, requests: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    names = [o.name for o in session.get_outputs()]
    inputs = [i.name for i in session.get_inputs()]
    try:
        return [dict(zip(names, session.run(names, {k: r[k] for k in inputs}))) for r in requests]
    except Exception as exc:
        raise BundleError(f"onnxruntime failed on the calibration inputs: {str(exc).splitlines()[0]}") from exc
