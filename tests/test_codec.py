"""Round trips of numpy arrays through OIP raw contents, and rejection of bad tensors."""

from __future__ import annotations

import numpy as np
import pytest

from splitgate import codec
from splitgate.errors import InvalidArgument
from splitgate.protocol import inference_pb2 as pb

DTYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
SHAPES = [(), (0,), (3, 0, 2), (1,), (2, 3, 4)]


def _sample(dtype: type, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if dtype is np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("datatype", sorted(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_through_request(datatype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    array = _sample(DTYPES[datatype], shape, rng)
    request = pb.ModelInferRequest()
    codec.add_inputs(request, {"x": array})
    assert request.inputs[0].datatype == datatype
    # Go over the wire format, not just the in-memory message.
    decoded = codec.read_inputs(pb.ModelInferRequest.FromString(request.SerializeToString()))["x"]
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


def test_non_contiguous_and_big_endian_round_trip() -> None:
    base = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    views = {
        "strided": base[:, ::2, 1::2],
        "transposed": base.transpose(2, 0, 1),
        "fortran": np.asfortranarray(base),
        "big_endian": base.astype(">f4"),
    }
    response = pb.ModelInferResponse()
    codec.add_outputs(response, views)
    decoded = codec.read_outputs(response)
    for name, view in views.items():
        np.testing.assert_array_equal(decoded[name], view)
        assert decoded[name].shape == view.shape


def test_typed_contents_are_accepted() -> None:
    request = pb.ModelInferRequest()
    t = request.inputs.add(name="x", datatype="FP32", shape=[2, 2])
    t.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(
        codec.read_inputs(request)["x"], np.array([[1, 2], [3, 4]], dtype=np.float32)
    )


@pytest.mark.parametrize(
    ("datatype", "shape", "raw", "needle"),
    [
        ("FP32", [2, 2], b"\0" * 15, "expected 16"),
        ("FP32", [-1, 2], b"", "negative dimension"),
        ("COMPLEX64", [1], b"\0" * 8, "unsupported datatype 'COMPLEX64'"),
        ("BOOL", [2], b"\x00\x07", "0 or 1"),
        ("INT64", [10**6, 10**6], b"\0" * 8, "expected 8000000000000"),
    ],
)
def test_bad_tensors_name_the_problem(datatype: str, shape: list[int], raw: bytes, needle: str) -> None:
    with pytest.raises(InvalidArgument, match="tensor 'img'") as info:
        codec.decode_array("img", datatype, shape, raw)
    assert needle in str(info.value)


def test_raw_count_mismatch_is_rejected() -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="a", datatype="FP32", shape=[1])
    request.inputs.add(name="b", datatype="FP32", shape=[1])
    request.raw_input_contents.append(b"\0" * 4)
    with pytest.raises(InvalidArgument, match="2 inputs"):
        codec.read_inputs(request)


def test_params_round_trip() -> None:
    request = pb.ModelInferRequest()
    values = {"splitgate.partition": "cut-3", "n": 7, "ms": 1.5, "flag": True}
    codec.set_params(request.parameters, values)
    assert codec.read_params(request.parameters) == values


def test_unsupported_numpy_dtype() -> None:
    with pytest.raises(InvalidArgument, match="complex"):
        codec.encode_array(np.zeros(2, dtype=np.complex64))
