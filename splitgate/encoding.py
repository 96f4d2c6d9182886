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
========  ==============================================  ===========================

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

__all__ = ["ENCODINGS", "encode_tensor", "add_encoded_inputs", "read_decoded_inputs", "encoded_nbytes"]

ENCODINGS = ("raw", "fp16", "int8", "int8c", "zstd")
P_ENCODING = contract.ENCODING
P_SCALE = contract.SCALE
P_ZERO = contract.ZERO_POINT
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


def encode_tensor(
    array: np.ndarray, encoding: str, *, axis: int = 1
) -> tuple[np.ndarray, dict[str, Any], dict[str, np.ndarray]]:
    """Encode one float tensor.

    Returns:
        (wire array, tensor parameters, companion tensors by name suffix).

    Raises:
        InvalidArgument: unknown encoding, or a lossy encoding of a non-float tensor.
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
    """Bytes the encoded tensor puts on the wire (payload plus companions)."""
    wire, _, extra = encode_tensor(array, encoding)
    return wire.nbytes + sum(v.nbytes for v in extra.values())


def add_encoded_inputs(
    request: pb.ModelInferRequest, arrays: Mapping[str, np.ndarray], encoding: str = "raw"
) -> int:
    """Append ``arrays`` to a request in ``encoding``; return bytes added."""
    if encoding == "raw":
        return codec.add_inputs(request, arrays)
    sent = 0
    for name, value in arrays.items():
        use = encoding if np.asarray(value).dtype.kind == "f" or encoding == "zstd" else "raw"
        wire, params, extra = encode_tensor(value, use)
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
    if encoding in ("int8", "int8c") and wire.dtype != np.uint8:
        raise InvalidArgument(f"tensor '{name}': {encoding} encoding needs datatype UINT8, got {wire.dtype}")
    if encoding == "int8":
        scale = _param(params, P_SCALE, name, float)
        zero = _param(params, P_ZERO, name, int)
        if not (math.isfinite(scale) and scale > 0) or not 0 <= zero <= 255:
            raise InvalidArgument(f"tensor '{name}': int8 scale must be finite and > 0 and zero point in 0..255")
        return ((wire.astype(np.float32) - np.float32(zero)) * np.float32(scale)).astype(np.float32)
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
