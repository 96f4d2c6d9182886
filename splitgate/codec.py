"""numpy <-> Open Inference Protocol tensors.

Tensors travel as row-major little-endian bytes in ``raw_input_contents`` /
``raw_output_contents``; BOOL is one byte per element. Decoding validates the
datatype, the shape and the byte length against each other and raises
:class:`~splitgate.errors.InvalidArgument` naming the tensor when they disagree.
Typed ``contents`` fields are accepted on input for clients that use them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from splitgate.errors import InvalidArgument, ResourceExhausted
from splitgate.protocol import inference_pb2 as pb

__all__ = [
    "DATATYPES",
    "MAX_RANK",
    "MAX_DIM",
    "MAX_ELEMENTS",
    "nominal_elements",
    "check_shape",
    "datatype_of",
    "numpy_dtype",
    "encode_array",
    "decode_array",
    "add_inputs",
    "read_inputs",
    "add_outputs",
    "read_outputs",
    "set_params",
    "read_params",
]

# OIP datatype name -> numpy dtype (little-endian, as the wire is).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_BY_KIND = {(dt.kind, dt.itemsize): name for name, dt in DATATYPES.items()}

# Which typed ``contents`` field holds each datatype (for clients not using raw).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def datatype_of(dtype: np.dtype | type) -> str:
    """Return the OIP datatype name of a numpy dtype.

    Raises:
        InvalidArgument: the dtype has no OIP equivalent (e.g. complex, object).
    """
    dt = np.dtype(dtype)
    name = _BY_KIND.get((dt.kind, dt.itemsize))
    if name is None:
        raise InvalidArgument(f"numpy dtype {dt} has no Open Inference Protocol datatype")
    return name


def numpy_dtype(datatype: str, *, tensor: str = "?") -> np.dtype:
    """Return the numpy dtype for an OIP datatype name.

    Raises:
        InvalidArgument: the datatype is unknown; the message names the tensor.
    """
    try:
        return DATATYPES[datatype]
    except KeyError:
        known = ", ".join(DATATYPES)
        raise InvalidArgument(
            f"tensor '{tensor}': unsupported datatype '{datatype}' (expected one of {known})"
        ) from None


def encode_array(array: Any) -> tuple[str, list[int], bytes]:
    """Encode an array as (datatype, shape, row-major little-endian bytes)."""
    arr = np.asarray(array)
    datatype = datatype_of(arr.dtype)
    wire = DATATYPES[datatype]
    # order="C" copies non-contiguous views (and keeps 0-d arrays 0-d); astype fixes byte order.
    arr = arr.astype(wire, order="C", copy=False)
    return datatype, list(arr.shape), arr.tobytes()


# Shape limits checked before anything is allocated (numpy caps rank at 64 and
# total bytes at 2**63; ONNX Runtime kernels index with int32 in places).
MAX_RANK = 32
MAX_DIM = 2**31 - 1
#: Default cap on a tensor's elements (zero dimensions ignored): 2**28 = 1 GiB of FP32.
MAX_ELEMENTS = 2**28


def nominal_elements(dims: Sequence[int]) -> int:
    """Product of the non-zero dimensions: what a shape would allocate if it were filled."""
    return math.prod(d for d in dims if d)


def check_shape(name: str, shape: Sequence[int], max_elements: int | None = MAX_ELEMENTS) -> tuple[int, ...]:
    """Check a declared shape before anything is allocated; return it as ints.

    Raises:
        InvalidArgument: rank above MAX_RANK, a negative dimension or one above MAX_DIM.
        ResourceExhausted: more than ``max_elements`` elements (zero dimensions
            ignored; None = not checked here).
    """
    dims = tuple(int(d) for d in shape)
    if len(dims) > MAX_RANK:
        raise InvalidArgument(f"tensor '{name}': rank {len(dims)} exceeds the limit of {MAX_RANK} dimensions")
    if any(d < 0 for d in dims):
        raise InvalidArgument(f"tensor '{name}': shape {list(dims)} has a negative dimension")
    if any(d > MAX_DIM for d in dims):
        raise InvalidArgument(
            f"tensor '{name}': shape {list(dims)} has a dimension above the limit of {MAX_DIM}"
        )
    if max_elements is not None and nominal_elements(dims) > max_elements:
        raise ResourceExhausted(
            f"tensor '{name}': shape {list(dims)} has {nominal_elements(dims)} elements, "
            f"more than the limit of {max_elements}"
        )
    return dims


def decode_array(
    name: str, datatype: str, shape: Sequence[int], raw: bytes, *, max_elements: int = MAX_ELEMENTS
) -> np.ndarray:
    """Decode raw contents into a numpy array, checking length against shape.

    The returned array may be a read-only view of ``raw`` (no copy).

    Raises:
        InvalidArgument: unknown datatype, negative or oversized dimension, rank
            above MAX_RANK, or a byte length that does not match ``prod(shape) * itemsize``.
        ResourceExhausted: more than MAX_ELEMENTS elements (zero dimensions ignored).
    """
    dtype = numpy_dtype(datatype, tensor=name)
    dims = check_shape(name, shape, None)
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"tensor '{name}': {len(raw)} bytes of raw contents, expected {expected} "
            f"for {datatype} shape {list(dims)}"
        )
    check_shape(name, dims, max_elements)  # bytes match: only an honest but too large tensor is left
    arr = np.frombuffer(raw, dtype=dtype).reshape(dims)
    if datatype == "BOOL" and arr.size and arr.view(np.uint8).max() > 1:
        raise InvalidArgument(f"tensor '{name}': BOOL bytes must be 0 or 1")
    return arr


def _decode_contents(
    name: str, datatype: str, shape: Sequence[int], contents: Any, max_elements: int = MAX_ELEMENTS
) -> np.ndarray:
    dtype = numpy_dtype(datatype, tensor=name)
    dims = check_shape(name, shape, max_elements)
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidArgument(f"tensor '{name}': {datatype} must be sent as raw contents")
    values = getattr(contents, field)
    if len(values) != math.prod(dims):
        raise InvalidArgument(
            f"tensor '{name}': {len(values)} values in {field}, expected {math.prod(dims)} "
            f"for shape {list(dims)}"
        )
    try:
        return np.asarray(values, dtype=dtype).reshape(dims)
    except (OverflowError, ValueError) as exc:  # e.g. 300 in uint_contents of a UINT8 tensor
        raise InvalidArgument(f"tensor '{name}': {field} values do not fit {datatype}: {exc}") from None


def add_inputs(request: pb.ModelInferRequest, arrays: Mapping[str, Any]) -> int:
    """Append named arrays to a request as raw contents; return the bytes added."""
    sent = 0
    for name, value in arrays.items():
        datatype, shape, raw = encode_array(value)
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
        sent += len(raw)
    return sent


def read_inputs(request: pb.ModelInferRequest, *, max_elements: int = MAX_ELEMENTS) -> dict[str, np.ndarray]:
    """Decode every input of a request (raw or typed contents) into arrays.

    Raises:
        InvalidArgument: mismatched counts, duplicate names, or a bad tensor.
        ResourceExhausted: a tensor over ``max_elements`` elements.
    """
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
            "send one raw entry per input or none"
        )
    out: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if not tensor.name:
            raise InvalidArgument(f"input {i} has an empty name")
        if tensor.name in out:
            raise InvalidArgument(f"tensor '{tensor.name}' is given twice")
        if raw:
            out[tensor.name] = decode_array(
                tensor.name, tensor.datatype, tensor.shape, raw[i], max_elements=max_elements
            )
        else:
            out[tensor.name] = _decode_contents(
                tensor.name, tensor.datatype, tensor.shape, tensor.contents, max_elements
            )
    return out


def add_outputs(response: pb.ModelInferResponse, arrays: Mapping[str, Any]) -> int:
    """Append named arrays to a response as raw contents; return the bytes added."""
    sent = 0
    for name, value in arrays.items():
        datatype, shape, raw = encode_array(value)
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(raw)
        sent += len(raw)
    return sent


def read_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Decode every output of a response into arrays."""
    raw = response.raw_output_contents
    out: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(response.outputs):
        if raw:
            out[tensor.name] = decode_array(tensor.name, tensor.datatype, tensor.shape, raw[i])
        else:
            out[tensor.name] = _decode_contents(tensor.name, tensor.datatype, tensor.shape, tensor.contents)
    return out


def set_params(params: Any, values: Mapping[str, bool | int | float | str]) -> None:
    """Write plain Python values into an OIP ``parameters`` map."""
    for key, value in values.items():
        slot = params[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            slot.int64_param = value
        elif isinstance(value, float):
            slot.double_param = value
        else:
            slot.string_param = str(value)


def read_params(params: Any) -> dict[str, bool | int | float | str]:
    """Read an OIP ``parameters`` map into plain Python values."""
    out: dict[str, bool | int | float | str] = {}
    for key, param in params.items():
        choice = param.WhichOneof("parameter_choice")
        out[key] = getattr(param, choice) if choice else ""
    return out
