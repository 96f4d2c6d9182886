"""(cut, encoding) candidates: bytes, encode/decode time and the accuracy guard, measured.

For every measured split partition ``P`` and every lossy or lossless encoding
``E`` in :attr:`splitgate.planner.PlanOptions.encodings` the planner adds a candidate
``P@E`` (e.g. ``cut-12@int8``, ``dag-2@fp16``). ``P`` itself is the raw one
(``"raw"`` is never written into an id). The ``cloud`` partition gets twins too
(``cloud@int8``: the model's own inputs sent encoded, the honest cloud-only
baseline), measured the same way with the full model as the suffix and no
prefix; its lossy twins are dropped as not applicable when the model has no
float input (integer inputs such as tokens travel raw except under ``zstd``),
and the planner keeps a cloud twin only if it wins somewhere or sends fewer
bytes than ``cloud``. The lossless ``uint8`` (8-bit data such as images scaled
from bytes, :func:`splitgate.encoding.uint8_codes`) is offered, for ``cloud``
or a cut, only when every float tensor of every calibration request decodes
bit-exactly (else "not applicable"); the count checked is recorded as
``exact_roundtrip_requests``. ``device`` has no twins. An encoded candidate shares its
raw twin's files.

Measured on the real prefix/suffix sessions over calibration requests
(:mod:`splitgate.planner._accuracy`):

* **bytes**: :func:`splitgate.encoding.encoded_nbytes` of the real cut tensors
  of each request (payload plus int8c companion scales), median over the
  requests; non-float tensors travel raw except under ``zstd``, as
  :func:`splitgate.encoding.add_encoded_inputs` sends them. The candidate's
  ``up_bytes`` is its raw twin's (shape-inferred) bytes times the measured
  encoded/raw ratio, so both are counted alike;
* **encode/decode time**: building the OIP request with
  :func:`~splitgate.encoding.add_encoded_inputs` (the edge's path) and
  :func:`~splitgate.encoding.read_decoded_inputs` (the cloud's path), median
  after warm-up; encode time (times ``device_slowdown``) is added to the
  twin's device time, decode time to its cloud time;
* **accuracy**: suffix outputs on decoded tensors vs. on raw tensors (the
  twins of an int8 prefix, ``cut-9~int8@fp16``: vs. the fp32 full model's
  outputs, so the guard bounds quantization and encoding together);
  encodings failing the :class:`~splitgate.planner._accuracy.Guard` are dropped and
  listed with the reason in ``profile.json`` (``encodings.dropped``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from splitgate.planner._accuracy import Calibration, Guard, check, compare_outputs, load_calibration
from splitgate.planner._options import PlanOptions, check_encodings
from splitgate.planner._partition_profile import PlannedPartition
from splitgate.planner._profile import Timing, make_session
from splitgate.encoding import add_encoded_inputs, encoded_nbytes, read_decoded_inputs, uint8_codes
from splitgate.errors import BundleError, InvalidArgument
from splitgate.protocol import inference_pb2 as pb

__all__ = [
    "SEP",
    "candidate_id",
    "split_id",
    "check_encodings",
    "wire_nbytes",
    "EncodingResult",
    "measure_encodings",
    "add_encoded",
]

if TYPE_CHECKING:
    from splitgate.planner._graph import ModelGraph

#: separates a partition id from its encoding in a candidate id
SEP = "@"


def candidate_id(base: str, encoding: str) -> str:
    """``cut-12`` + ``int8`` -> ``cut-12@int8``; raw keeps the base id."""
    return base if encoding == "raw" else f"{base}{SEP}{encoding}"


def split_id(pid: str) -> tuple[str, str]:
    """``cut-12@int8`` -> (``cut-12``, ``int8``); ``cut-12`` -> (``cut-12``, ``raw``)."""
    base, _, enc = pid.partition(SEP)
    return base, enc or "raw"


def wire_nbytes(arrays: Mapping[str, np.ndarray], encoding: str) -> int:
    """Bytes ``arrays`` put on the wire in ``encoding`` (as ``add_encoded_inputs`` sends them)."""
    total = 0
    for a in arrays.values():
        a = np.asarray(a)
        use = encoding if a.dtype.kind == "f" or encoding == "zstd" else "raw"
        total += encoded_nbytes(a, use)
    return total


@dataclass
class EncodingResult:
    """One encoding of one split, measured.

    Attributes:
        encoding: the encoding name.
        wire_bytes: median bytes per request on the wire.
        raw_bytes: median raw bytes per request (same requests).
        encode: timing of building the request on the device.
        decode: timing of decoding it in the cloud.
        accuracy: per-output metrics (:func:`splitgate.planner._accuracy.compare_outputs`).
        dropped: why the guard dropped it, or None.
        exact_requests: for the lossless ``uint8``: how many calibration
            requests were checked to decode bit-exactly (every one must), else None.
    """

    encoding: str
    wire_bytes: int
    raw_bytes: int
    encode: Timing
    decode: Timing
    accuracy: dict[str, dict[str, Any]] = field(default_factory=dict)
    dropped: str | None = None
    exact_requests: int | None = None

    @property
    def ratio(self) -> float:
        """raw bytes / wire bytes."""
        return self.raw_bytes / self.wire_bytes if self.wire_bytes else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        exact = {} if self.exact_requests is None else {"exact_roundtrip_requests": self.exact_requests}
        return {
            "wire_bytes": self.wire_bytes,
            "raw_bytes": self.raw_bytes,
            "ratio": round(self.ratio, 3),
            "encode_timing": self.encode.to_dict(),
            "decode_timing": self.decode.to_dict(),
            "accuracy": {k: {m: (round(v, 6) if isinstance(v, float) else v) for m, v in row.items()}
                         for k, row in self.accuracy.items()},
            "dropped": self.dropped,
            **exact,
        }


def _time(fn: Any, warmup: int, repeats: int) -> tuple[Timing, Any]:
    out = None
    for _ in range(max(0, warmup)):
        out = fn()
    samples = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return Timing.of(samples), out


def _roundtrip(cut: Mapping[str, np.ndarray], encoding: str) -> dict[str, np.ndarray]:
    request = pb.ModelInferRequest()
    add_encoded_inputs(request, cut, encoding)
    return read_decoded_inputs(request)


def measure_encodings(
    prefix: onnx.ModelProto | None,
    suffix: onnx.ModelProto,
    calibration: Calibration,
    encodings: Sequence[str],
    guard: Guard,
    *,
    device_threads: int = 1,
    cloud_threads: int = 2,
    warmup: int = 2,
    repeats: int = 10,
    reference: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> dict[str, EncodingResult]:
    """Measure each non-raw encoding of one split partition, or of the ``cloud``
    partition (see module docs).

    Args:
        prefix, suffix: the partition's models; ``prefix`` None = the cut
            tensors are the model's inputs (``cloud``; ``suffix`` is the full model).
        calibration: the calibration requests.
        encodings: encodings to measure (``"raw"`` is skipped: it is the twin).
        guard: accuracy thresholds.
        device_threads, cloud_threads: session threads.
        warmup, repeats: of the encode/decode timings.
        reference: the outputs the guard compares with, per calibration request;
            default: the suffix's on the raw cut tensors (an int8 prefix's
            twins pass the fp32 full model's, so the guard covers both errors).

    Returns:
        encoding -> result (dropped ones included, with the reason).

    Raises:
        BundleError: onnxruntime cannot run a side.
    """
    wanted = [e for e in dict.fromkeys(encodings) if e != "raw"]
    if not wanted:
        return {}
    pre = make_session(prefix, device_threads) if prefix is not None else None
    suf = make_session(suffix, cloud_threads)
    suf_in = [i.name for i in suf.get_inputs()]
    suf_out = [o.name for o in suf.get_outputs()]
    try:
        cuts = [_cut_tensors(pre, feeds, suf_in) for feeds in calibration.requests]
        ref = list(reference) if reference is not None else [dict(zip(suf_out, suf.run(suf_out, c))) for c in cuts]
        raw_bytes = int(statistics.median(wire_nbytes(c, "raw") for c in cuts))
        results: dict[str, EncodingResult] = {}
        for enc in wanted:
            if enc == "uint8" and (why := _not_8bit(cuts)) is not None:
                results[enc] = _not_applicable(enc, raw_bytes, why)
                continue
            try:
                enc_t, request = _time(lambda: _build(cuts[0], enc), warmup, repeats)
                dec_t, _ = _time(lambda: read_decoded_inputs(request), warmup, repeats)
                decoded = [_roundtrip(c, enc) for c in cuts]
                nbytes = int(statistics.median(wire_nbytes(c, enc) for c in cuts))
            except InvalidArgument as exc:  # e.g. int8c of a tensor without a channel axis
                results[enc] = _not_applicable(enc, raw_bytes, str(exc))
                continue
            if prefix is None and enc != "zstd" and not any(a.dtype.kind == "f" for a in cuts[0].values()):
                results[enc] = _not_applicable(enc, raw_bytes, "no float input to encode (integer inputs travel raw)")
                continue
            got = [dict(zip(suf_out, suf.run(suf_out, d))) for d in decoded]
            metrics = compare_outputs(ref, got, output_kind=guard.output_kind)
            results[enc] = EncodingResult(enc, nbytes, raw_bytes, enc_t, dec_t, metrics, check(metrics, guard),
                                          exact_requests=_exact_requests(cuts, decoded) if enc == "uint8" else None)
    except BundleError:
        raise
    except Exception as exc:  # noqa: BLE001 - ORT run failures
        raise BundleError(f"onnxruntime failed while measuring encodings: {str(exc).splitlines()[0]}") from exc
    return results


def _not_8bit(cuts: Sequence[Mapping[str, np.ndarray]]) -> str | None:
    """Why ``uint8`` does not apply to these calibration cut tensors (None: it does).

    ``uint8`` is offered only when every float tensor of every calibration
    request has a bit-exact 8-bit form (:func:`splitgate.encoding.uint8_codes`).
    """
    floats = 0
    for i, cut in enumerate(cuts):
        for name, a in cut.items():
            if np.asarray(a).dtype.kind != "f":
                continue
            floats += 1
            if uint8_codes(a) is None:
                return (f"tensor '{name}' of calibration request {i} does not hold 8-bit data "
                        "(uint8 is lossless only when every calibration input decodes bit-exactly)")
    return None if floats else "no float tensor to encode (integer tensors travel raw)"


def _exact_requests(cuts: Sequence[Mapping[str, np.ndarray]], decoded: Sequence[Mapping[str, np.ndarray]]) -> int:
    """How many requests decoded bit-exactly (dtype and bytes of every tensor).

    Raises:
        BundleError: one did not (``uint8`` promises a bit-exact decoding).
    """
    for i, (cut, got) in enumerate(zip(cuts, decoded)):
        for name, a in cut.items():
            b = got[name]
            if b.dtype != a.dtype or b.shape != a.shape or b.tobytes() != np.asarray(a).tobytes():
                raise BundleError(f"uint8 did not decode tensor '{name}' of calibration request {i} bit-exactly")
    return len(cuts)


def _cut_tensors(pre: Any, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """The tensors ``names`` a request sends: the prefix session's outputs, else
    the request's own inputs (``pre`` None: the ``cloud`` partition)."""
    if pre is None:
        return {k: np.asarray(feeds[k]) for k in names}
    pre_out = [o.name for o in pre.get_outputs()]
    pre_in = [i.name for i in pre.get_inputs()]
    produced = dict(zip(pre_out, pre.run(pre_out, {k: feeds[k] for k in pre_in})))
    return {k: produced[k] if k in produced else feeds[k] for k in names}


def _model_outputs(model: onnx.ModelProto, calibration: Calibration, threads: int) -> list[dict[str, np.ndarray]]:
    """A model's outputs on every calibration request.

    Raises:
        BundleError: onnxruntime cannot run it.
    """
    session = make_session(model, threads)
    names = [o.name for o in session.get_outputs()]
    inputs = [i.name for i in session.get_inputs()]
    try:
        return [dict(zip(names, session.run(names, {k: r[k] for k in inputs}))) for r in calibration.requests]
    except Exception as exc:  # noqa: BLE001 - ORT run failures
        raise BundleError(f"onnxruntime failed on the calibration inputs: {str(exc).splitlines()[0]}") from exc


def _not_applicable(encoding: str, raw_bytes: int, why: str) -> EncodingResult:
    none = Timing(0.0, 0.0, 0.0, 0)
    return EncodingResult(encoding, raw_bytes, raw_bytes, none, none, {}, f"not applicable: {why}")


def _build(cut: Mapping[str, np.ndarray], encoding: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest()
    add_encoded_inputs(request, cut, encoding)
    return request


def add_encoded(
    g: ModelGraph,
    parts: list[PlannedPartition],
    options: PlanOptions,
    progress: Callable[[str, int, int], None] | None = None,
    *,
    calibration: Calibration | None = None,
) -> tuple[list[PlannedPartition], dict[str, Any]]:
    """Add the encoded twins of the measured split partitions and of ``cloud`` that pass the guard.

    Args:
        g: the model.
        parts: measured partitions (``profile`` filled in).
        options: planning options (encodings, calibration, guard, threads, repeats).
        progress: ``callback(step, done, total)``.
        calibration: the calibration requests; default: from ``options.calibration``.

    Returns:
        (``parts`` with each split and ``cloud`` followed by its surviving encoded twins,
        the ``encodings`` section of ``profile.json``: options, calibration,
        every measured candidate's figures and the dropped ones with reasons).
    """
    report = progress or (lambda step, done, total: None)
    encs = [e for e in dict.fromkeys(options.encodings) if e != "raw"]
    guard = options.guard()
    encodable = [p for p in parts if (p.kind == "split" and p.prefix is not None and p.suffix is not None)
                 or (p.kind == "cloud" and not p.base)]
    info: dict[str, Any] = {"encodings": list(options.encodings), "guard": guard.to_dict(),
                            "calibration": None, "measured": {}, "dropped": {}}
    if not encs or not encodable:
        return parts, info
    calib = calibration or load_calibration(options.calibration, g.inputs, samples=options.calibration_samples,
                                            batch=options.batch)
    info["calibration"] = {"source": calib.source, "samples": calib.samples, "requests": len(calib.requests)}
    slowdown = options.device_slowdown if options.device_profile is None else 1.0
    fp32_outputs: list[dict[str, np.ndarray]] = []  # the full model's, for int8 prefixes' twins
    out: list[PlannedPartition] = []
    done = 0
    for p in parts:
        out.append(p)
        if p not in encodable:
            continue
        report("measure encodings", done, len(encodable))
        done += 1
        suffix = g.model if p.kind == "cloud" else p.suffix
        assert suffix is not None
        if p.precision != "fp32" and not fp32_outputs:
            fp32_outputs = _model_outputs(g.model, calib, options.cloud_threads)
        results = measure_encodings(
            p.prefix, suffix, calib, encs, guard, device_threads=options.device_threads,
            cloud_threads=options.cloud_threads, warmup=options.warmup, repeats=options.repeats,
            reference=fp32_outputs if p.precision != "fp32" else None,
        )
        for enc, r in results.items():
            pid = candidate_id(p.id, enc)
            info["measured"][pid] = r.to_dict()
            if r.dropped:
                info["dropped"][pid] = r.dropped
                continue
            raw = p.measured()
            twin = raw.encoded(
                enc, p.id,
                up_bytes=int(round(raw.up_bytes * r.wire_bytes / r.raw_bytes)) if r.raw_bytes else r.wire_bytes,
                encode_ms=r.encode.median_ms * slowdown, decode_ms=r.decode.median_ms, wire_ratio=round(r.ratio, 3),
            )
            out.append(replace(p, id=pid, encoding=enc, base=p.id, profile=twin, reference=False))
    report("measure encodings", len(encodable), len(encodable))
    return out, info
