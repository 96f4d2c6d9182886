"""Compressed encodings of cut tensors on the wire (Auto-Split-style, no retraining).

A cut tensor is sent in one of these encodings, named by the input tensor's
``splitgate.encoding`` parameter (absent = ``raw``):

========  ==============================================  ===========================
encoding  wire tensor                                     extra
========  ==============================================  ===========================
raw       the tensor itself                               -
fp16      FP16, same shape                                -
int8      UINT8, same shape: q = round(x / scale) + zp    ``splitgate.scale`` (double),
                                                          ``splitgate.zero_point`` (int)
int8c     UINT8, same shape, one (scale, zp) per channel  companion FP32 tensors
          along ``splitgate.axis`` (default 1)            ``NAME/scale``, ``NAME/zero_point``
zstd      UINT8 [n]: zstd of the raw little-endian bytes  ``splitgate.datatype``, ``splitgate.shape``
uint8     UINT8, same shape: codes k with                 ``splitgate.scale``,
          x == dtype(k * scale + offset) bit for bit      ``splitgate.offset`` (double),
          (lossless; 8-bit data such as images            ``splitgate.datatype``
          scaled from bytes)                              (FP16/FP32/FP64, default FP32)
========  ==============================================  ===========================

``uint8`` is lossless by construction: :func:`uint8_codes` finds a scale and
offset that reproduce every value of the tensor exactly (decoded in float64,
then cast to the tensor's dtype) or refuses it. :func:`encode_tensor` raises
for a tensor that does not hold 8-bit data; :func:`add_encoded_inputs` (the
edge's path) then sends that tensor raw, so a ``uint8`` request never loses
a bit whatever the caller sends.

FP16/INT8 travel as raw contents. Decoding checks everything it is given and
raises :class:`~splitgate.errors.InvalidArgument` naming the tensor: a scale of
the wrong length, a truncated payload, corrupt or oversized zstd data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from splitgate import codec
from splitgate.errors import InvalidArgument
from splitgate.protocol import inference_pb2 as pb
from splitgate import contract

__all__ = ["ENCODINGS", "LOSSLESS", "encode_tensor", "add_encoded_inputs", "read_decoded_inputs", "encoded_nbytes",
           "uint8_codes"]

ENCODINGS = ("raw", "fp16", "int8", "int8c", "zstd", "uint8")
#: encodings that decode bit-exactly (``uint8``: or the tensor travels raw)
LOSSLESS = ("raw", "zstd", "uint8")
P_ENCODING = contract.ENCODING
P_SCALE = contract.SCALE
P_ZERO = contract.ZERO_POINT
P_OFFSET = contract.OFFSET
P_AXIS = contract.AXIS
P_DATATYPE = contract.DATATYPE
P_SHAPE = contract.SHAPE
_SCALE_SUFFIX = "/scale"
_ZERO_SUFFIX = "/zero_point"
ZSTD_LEVEL = 3


def _affine(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point mapping [lo, hi] (widened to include 0) onto 0..255."""
    lo = np.minimum(lo, 0.0)
    hi = np.maximum(hi, 0.0)
    scale = (hi - lo) / 255.0
    scale = np.where(scale > 0, scale, 1.0)
    zero = np.clip(np.round(-lo / scale), 0, 255)
    return scale.astype(np.float64), zero.astype(np.float64)


#: (float dtype, unsigned integer view of its bits) that ``uint8`` encodes
_UINT8_SOURCES = {np.dtype(np.float16): np.uint16, np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}
#: elements looked at first: more distinct values than 256 among them refuses the tensor at once
_UINT8_SAMPLE = 4096


def _decode_levels(codes: np.ndarray, scale: float, offset: float, dtype: np.dtype) -> np.ndarray:
    """``dtype(codes * scale + offset)``, computed in float64: the ``uint8`` decoding."""
    wide = np.asarray(codes, dtype=np.float64)
    return (wide * scale + offset).astype(dtype)


def _level_candidates(levels: np.ndarray) -> list[tuple[float, float]]:
    """(scale, offset) guesses for sorted distinct finite values ``levels`` (at least two):
    the smallest gap (or a small fraction of it, when gaps are not its multiples) snapped to
    a simple fraction (``1/255``, ``2/255``), then its float64 least-squares fit."""
    from fractions import Fraction

    gap, span = float(np.diff(levels).min()), float(levels[-1] - levels[0])
    for div in (1, 2, 3, 4, 5, 6, 8):
        count = round(span / (gap / div))  # codes from the smallest to the largest value
        if count > 255:
            return []
        step = span / count
        steps = (levels - levels[0]) / step
        codes = np.rint(steps)
        if np.max(np.abs(steps - codes)) < 0.1:
            break
    else:
        return []
    out = []
    inverse = Fraction(1.0 / step).limit_denominator(64)
    if inverse and abs(float(inverse) * step - 1.0) < 1e-6:
        snapped = float(Fraction(inverse.denominator, inverse.numerator))
        out.append((snapped, float(np.rint(levels[0] / snapped)) * snapped))
        out.append((snapped, float(levels[0])))
    fit_scale, fit_offset = np.polyfit(codes, levels, 1)
    out.append((float(fit_scale), float(fit_offset)))
    out.append((step, float(levels[0])))
    return [(s, o) for s, o in out if math.isfinite(s) and s > 0 and math.isfinite(o)]


def _codes_from_sample(flat: np.ndarray, sample: np.ndarray, bits: type) -> tuple[np.ndarray, float, float] | None:
    """The fast path of :func:`uint8_codes`: a grid guessed from the distinct values of a
    sample (and the tensor's extremes), checked on every element; None: not found this way."""
    lo, hi = flat.min(), flat.max()
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo == hi:
        return None
    levels = np.unique(np.concatenate([sample.astype(np.float64), [float(lo), float(hi)]]))
    for scale, offset in _level_candidates(levels):
        codes = _exact_codes(flat, scale, offset, bits)
        if codes is not None:
            return codes, scale, offset
    return None


def _exact_codes(flat: np.ndarray, scale: float, offset: float, bits: type) -> np.ndarray | None:
    """The codes of a flat tensor on the grid (scale, offset), if every element decodes to its
    own bits: the codes are found in float32 (fast; a wrong one fails the check) and checked
    through the decoding's 256-entry table."""
    x = flat.astype(np.float32, copy=False)
    found = np.rint((x - np.float32(offset)) * np.float32(1.0 / scale))
    if found.min() < 0 or found.max() > 255:
        return None
    codes = found.astype(np.uint8)
    table = _decode_levels(np.arange(256), scale, offset, flat.dtype).view(bits)
    return codes if np.array_equal(table[codes], flat.view(bits)) else None


def uint8_codes(array: np.ndarray) -> tuple[np.ndarray, float, float] | None:
    """The lossless 8-bit form of a float tensor, if it has one.

    Args:
        array: an FP16/FP32/FP64 tensor.

    Returns:
        ``(codes, scale, offset)`` with ``codes`` uint8 of the same shape and
        ``array.dtype(codes * scale + offset)`` (computed in float64) equal to
        ``array`` bit for bit -- signed zeros included; or None when no such
        form exists (more than 256 distinct values, values off one evenly
        spaced grid, NaN or infinity, or not a float tensor).
    """
    a = np.asarray(array)
    bits = _UINT8_SOURCES.get(a.dtype)
    if bits is None:
        return None
    flat = a.reshape(-1)
    if flat.size == 0:
        return np.zeros(a.shape, np.uint8), 1.0, 0.0
    if flat.size > _UINT8_SAMPLE:
        sample = np.unique(flat[:_UINT8_SAMPLE].view(bits))
        if sample.size > 256:
            return None
        found = _codes_from_sample(flat, sample.view(a.dtype), bits)
        if found is not None:
            return found[0].reshape(a.shape), found[1], found[2]
    patterns = np.unique(flat.view(bits))  # distinct bit patterns: -0.0 and 0.0 stay apart
    if patterns.size > 256:
        return None
    values = patterns.view(a.dtype)
    if not np.all(np.isfinite(values)):
        return None
    levels = np.unique(values.astype(np.float64))
    guesses = [(1.0, float(levels[0]))] if levels.size == 1 else _level_candidates(levels)
    for scale, offset in guesses:
        codes = np.rint((values.astype(np.float64) - offset) / scale)
        if codes.min() < 0 or codes.max() > 255:
            continue
        if np.array_equal(_decode_levels(codes, scale, offset, a.dtype).view(bits), patterns):
            full = _exact_codes(flat, scale, offset, bits)
            if full is not None:
                return full.reshape(a.shape), scale, offset
    return None


def encode_tensor(
    array: np.ndarray, encoding: str, *, axis: int = 1
) -> tuple[np.ndarray, dict[str, Any], dict[str, np.ndarray]]:
    """Encode one float tensor.

    Returns:
        (wire array, tensor parameters, companion tensors by name suffix).

    Raises:
        InvalidArgument: unknown encoding, a lossy encoding of a non-float
            tensor, or ``uint8`` of a tensor that does not hold 8-bit data.
    """
    if encoding not in ENCODINGS:
        raise InvalidArgument(f"unknown encoding {encoding!r}; expected one of {list(ENCODINGS)}")
    a = np.asarray(array)
    if encoding == "raw":
        return a, {}, {}
    if encoding == "zstd":
        import zstandard

        _, shape, raw = codec.encode_array(a)
        blob = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
        params = {P_ENCODING: "zstd", P_DATATYPE: codec.datatype_of(a.dtype), P_SHAPE: ",".join(map(str, shape))}
        return np.frombuffer(blob, dtype=np.uint8), params, {}
    if a.dtype.kind != "f":
        raise InvalidArgument(f"encoding {encoding!r} is for float tensors, got {a.dtype}")
    if encoding == "fp16":
        return a.astype(np.float16), {P_ENCODING: "fp16"}, {}
    if encoding == "uint8":
        found = uint8_codes(a)
        if found is None:
            raise InvalidArgument(
                f"uint8 encoding needs 8-bit data (at most 256 evenly spaced values that decode bit-exactly); "
                f"this {a.dtype} tensor of shape {list(a.shape)} has none"
            )
        codes, scale, offset = found
        return codes, {P_ENCODING: "uint8", P_SCALE: scale, P_OFFSET: offset,
                       P_DATATYPE: codec.datatype_of(a.dtype)}, {}
    x = a.astype(np.float32, copy=False)
    if encoding == "int8":
        if x.size:
            scale, zero = _affine(np.float64(x.min()), np.float64(x.max()))
        else:
            scale, zero = np.float64(1.0), np.float64(0.0)
        q = np.clip(np.round(x / scale) + zero, 0, 255).astype(np.uint8)
        return q, {P_ENCODING: "int8", P_SCALE: float(scale), P_ZERO: int(zero)}, {}
    # int8c: one scale per channel along axis.
    if x.ndim <= axis:
        raise InvalidArgument(f"int8c needs an axis {axis} but the tensor has shape {list(x.shape)}")
    reduce = tuple(i for i in range(x.ndim) if i != axis)
    lo = x.min(axis=reduce) if x.size else np.zeros(x.shape[axis])
    hi = x.max(axis=reduce) if x.size else np.zeros(x.shape[axis])
    scale, zero = _affine(lo.astype(np.float64), hi.astype(np.float64))
    shape = [1] * x.ndim
    shape[axis] = -1
    q = np.clip(np.round(x / scale.reshape(shape)) + zero.reshape(shape), 0, 255).astype(np.uint8)
    companions = {_SCALE_SUFFIX: scale.astype(np.float32), _ZERO_SUFFIX: zero.astype(np.float32)}
    return q, {P_ENCODING: "int8c", P_AXIS: axis}, companions


def encoded_nbytes(array: np.ndarray, encoding: str) -> int:
    """Bytes the encoded tensor puts on the wire (payload plus companions); a
    ``uint8`` tensor without 8-bit data travels raw, as :func:`add_encoded_inputs` sends it."""
    wire, _, extra = _encode_or_raw(array, encoding)
    return wire.nbytes + sum(v.nbytes for v in extra.values())


def _encode_or_raw(
    array: np.ndarray, encoding: str
) -> tuple[np.ndarray, dict[str, Any], dict[str, np.ndarray]]:
    """:func:`encode_tensor`, except that ``uint8`` falls back to raw (never lossy)."""
    if encoding != "uint8":
        return encode_tensor(array, encoding)
    try:
        return encode_tensor(array, encoding)
    except InvalidArgument:
        return np.asarray(array), {}, {}


def add_encoded_inputs(
    request: pb.ModelInferRequest, arrays: Mapping[str, np.ndarray], encoding: str = "raw"
) -> int:
    """Append ``arrays`` to a request in ``encoding``; return bytes added."""
    if encoding == "raw":
        return codec.add_inputs(request, arrays)
    sent = 0
    for name, value in arrays.items():
        use = encoding if np.asarray(value).dtype.kind == "f" or encoding == "zstd" else "raw"
        wire, params, extra = _encode_or_raw(value, use)
        datatype, shape, raw = codec.encode_array(wire)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        codec.set_params(tensor.parameters, params)
        request.raw_input_contents.append(raw)
        sent += len(raw)
        for suffix, arr in extra.items():
            sent += codec.add_inputs(request, {name + suffix: arr})
    return sent


def _param(params: dict, key: str, name: str, kind: type) -> Any:
    if key not in params:
        raise InvalidArgument(f"tensor '{name}': encoding needs parameter {key}")
    value = params[key]
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidArgument(f"tensor '{name}': parameter {key} must be {kind.__name__}, got {value!r}")
    return value


def _decode_one(name: str, wire: np.ndarray, params: dict, companions: dict[str, np.ndarray]) -> np.ndarray:
    encoding = params.get(P_ENCODING, "raw")
    if encoding == "raw":
        return wire
    if encoding == "fp16":
        if wire.dtype != np.float16:
            raise InvalidArgument(f"tensor '{name}': fp16 encoding needs datatype FP16, got {wire.dtype}")
        return wire.astype(np.float32)
    if encoding in ("int8", "int8c", "uint8") and wire.dtype != np.uint8:
        raise InvalidArgument(f"tensor '{name}': {encoding} encoding needs datatype UINT8, got {wire.dtype}")
    if encoding == "int8":
        scale = _param(params, P_SCALE, name, float)
        zero = _param(params, P_ZERO, name, int)
        if not (math.isfinite(scale) and scale > 0) or not 0 <= zero <= 255:
            raise InvalidArgument(f"tensor '{name}': int8 scale must be finite and > 0 and zero point in 0..255")
        return ((wire.astype(np.float32) - np.float32(zero)) * np.float32(scale)).astype(np.float32)
    if encoding == "uint8":
        scale = _param(params, P_SCALE, name, float)
        offset = _param(params, P_OFFSET, name, float)
        if not (math.isfinite(scale) and scale > 0 and math.isfinite(offset)):
            raise InvalidArgument(f"tensor '{name}': uint8 scale must be finite and > 0 and offset finite")
        dtype = codec.numpy_dtype(str(params.get(P_DATATYPE, "FP32")), tensor=name)
        if dtype not in _UINT8_SOURCES:
            raise InvalidArgument(f"tensor '{name}': uint8 decodes to FP16, FP32 or FP64, not {params[P_DATATYPE]}")
        return _decode_levels(wire, scale, offset, dtype)
    if encoding == "int8c":
        axis = _param(params, P_AXIS, name, int)
        if not 0 <= axis < wire.ndim:
            raise InvalidArgument(f"tensor '{name}': axis {axis} out of range for shape {list(wire.shape)}")
        channels = wire.shape[axis]
        for suffix in (_SCALE_SUFFIX, _ZERO_SUFFIX):
            arr = companions.get(name + suffix)
            if arr is None:
                raise InvalidArgument(f"tensor '{name}': int8c needs a companion tensor '{name + suffix}'")
            if arr.shape != (channels,) or arr.dtype != np.float32:
                raise InvalidArgument(
                    f"tensor '{name}': '{name + suffix}' must be FP32 shape [{channels}] "
                    f"(one per channel on axis {axis}), got {arr.dtype} {list(arr.shape)}"
                )
        scale, zero = companions[name + _SCALE_SUFFIX], companions[name + _ZERO_SUFFIX]
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise InvalidArgument(f"tensor '{name}': int8c scales must be finite and > 0")
        shape = [1] * wire.ndim
        shape[axis] = -1
        return ((wire.astype(np.float32) - zero.reshape(shape)) * scale.reshape(shape)).astype(np.float32)
    if encoding == "zstd":
        import zstandard

        datatype = _param(params, P_DATATYPE, name, str)
        try:
            shape = [int(d) for d in _param(params, P_SHAPE, name, str).split(",") if d != ""]
        except ValueError:
            raise InvalidArgument(f"tensor '{name}': {P_SHAPE} must be comma-separated integers") from None
        dtype = codec.numpy_dtype(datatype, tensor=name)
        shape = list(codec.check_shape(name, shape))  # bounds the decompressed size before allocating
        expected = math.prod(shape) * dtype.itemsize
        try:
            # max_output_size bounds memory: a zstd bomb cannot inflate past the declared size.
            raw = zstandard.ZstdDecompressor().decompress(wire.tobytes(), max_output_size=expected)
        except zstandard.ZstdError as exc:
            raise InvalidArgument(f"tensor '{name}': corrupt zstd payload: {exc}") from None
        return codec.decode_array(name, datatype, shape, raw)
    raise InvalidArgument(f"tensor '{name}': unknown encoding {encoding!r}; expected one of {list(ENCODINGS)}")


def read_decoded_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """Decode a request's inputs, undoing any ``splitgate.encoding``.

    Companion tensors of int8c inputs (``NAME/scale``, ``NAME/zero_point``) are
    consumed and do not appear in the result.

    Raises:
        InvalidArgument: a malformed tensor or encoding; the message names it.
    """
    wire = codec.read_inputs(request)
    params = {t.name: codec.read_params(t.parameters) for t in request.inputs}
    per_channel = [n for n, p in params.items() if p.get(P_ENCODING) == "int8c"]
    companions = {n + s for n in per_channel for s in (_SCALE_SUFFIX, _ZERO_SUFFIX)}
    return {
        name: _decode_one(name, arr, params[name], wire)
        for name, arr in wire.items()
        if name not in companions
    }
