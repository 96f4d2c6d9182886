"""Cut-tensor encodings: round trips within their error bounds, byte savings,
and clear INVALID_ARGUMENT errors for malformed encoded payloads."""

from __future__ import annotations

import numpy as np
import pytest

from splitgate import codec
from splitgate.encoding import add_encoded_inputs, encoded_nbytes, read_decoded_inputs
from splitgate.errors import InvalidArgument
from splitgate.protocol import inference_pb2 as pb


def _relu_activation(seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((2, 16, 8, 8)).astype(np.float32)
    x *= np.linspace(0.1, 5.0, 16, dtype=np.float32).reshape(1, -1, 1, 1)  # channels differ in range
    return np.maximum(x, 0)


def _round_trip(x: np.ndarray, encoding: str) -> np.ndarray:
    request = pb.ModelInferRequest()
    add_encoded_inputs(request, {"t": x}, encoding)
    wire = pb.ModelInferRequest.FromString(request.SerializeToString())
    out = read_decoded_inputs(wire)
    assert list(out) == ["t"]
    return out["t"]


@pytest.mark.parametrize("encoding", ["raw", "zstd"])
def test_lossless_encodings_are_exact(encoding: str) -> None:
    x = _relu_activation()
    np.testing.assert_array_equal(_round_trip(x, encoding), x)


def test_fp16_error_is_half_precision() -> None:
    x = _relu_activation()
    np.testing.assert_allclose(_round_trip(x, "fp16"), x, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("encoding", ["int8", "int8c"])
def test_int8_error_is_within_half_a_step(encoding: str) -> None:
    x = _relu_activation()
    y = _round_trip(x, encoding)
    if encoding == "int8":
        step = (x.max() - min(x.min(), 0)) / 255
        assert np.max(np.abs(y - x)) <= step / 2 + 1e-6
    else:
        for c in range(x.shape[1]):
            step = (x[:, c].max() - min(x[:, c].min(), 0)) / 255
            assert np.max(np.abs(y[:, c] - x[:, c])) <= step / 2 + 1e-6


def test_int8_sends_a_quarter_of_the_bytes() -> None:
    x = _relu_activation()
    assert x.nbytes / encoded_nbytes(x, "int8") == pytest.approx(4.0)
    assert x.nbytes / encoded_nbytes(x, "int8c") >= 3.5
    assert encoded_nbytes(x, "zstd") < x.nbytes  # ReLU zeros compress


def test_integer_tensors_pass_through_lossy_encodings_untouched() -> None:
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    np.testing.assert_array_equal(_round_trip(ids, "int8"), ids)


def _encoded(encoding: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest()
    add_encoded_inputs(request, {"t": _relu_activation()}, encoding)
    return request


def test_wrong_scale_length_is_rejected() -> None:
    request = _encoded("int8c")
    i = [t.name for t in request.inputs].index("t/scale")
    request.inputs[i].shape[:] = [15]
    request.raw_input_contents[i] = request.raw_input_contents[i][:-4]
    with pytest.raises(InvalidArgument, match=r"'t/scale' must be FP32 shape \[16\]"):
        read_decoded_inputs(request)


def test_missing_companion_is_rejected() -> None:
    request = _encoded("int8c")
    keep = [i for i, t in enumerate(request.inputs) if t.name != "t/zero_point"]
    trimmed = pb.ModelInferRequest()
    for i in keep:
        trimmed.inputs.append(request.inputs[i])
        trimmed.raw_input_contents.append(request.raw_input_contents[i])
    with pytest.raises(InvalidArgument, match="companion tensor 't/zero_point'"):
        read_decoded_inputs(trimmed)


@pytest.mark.parametrize("encoding", ["int8", "fp16", "int8c"])
def test_truncated_payload_is_rejected(encoding: str) -> None:
    request = _encoded(encoding)
    request.raw_input_contents[0] = request.raw_input_contents[0][:-7]
    with pytest.raises(InvalidArgument, match="tensor 't'"):
        read_decoded_inputs(request)


def test_truncated_or_corrupt_zstd_is_rejected() -> None:
    request = _encoded("zstd")
    blob = request.raw_input_contents[0]
    request.raw_input_contents[0] = blob[: len(blob) // 2]
    request.inputs[0].shape[:] = [len(blob) // 2]
    with pytest.raises(InvalidArgument, match="tensor 't'"):
        read_decoded_inputs(request)


def test_zstd_cannot_inflate_past_declared_shape() -> None:
    request = _encoded("zstd")
    request.inputs[0].parameters["splitgate.shape"].string_param = "2,16,8,4"  # half the real size
    with pytest.raises(InvalidArgument, match="tensor 't'"):
        read_decoded_inputs(request)


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("splitgate.scale", -1.0, "scale must be finite"),
        ("splitgate.scale", float("nan"), "scale must be finite"),
        ("splitgate.zero_point", 300, "zero point"),
        ("splitgate.encoding", "int4", "unknown encoding 'int4'"),
    ],
)
def test_bad_int8_parameters_are_rejected(key: str, value: object, needle: str) -> None:
    request = _encoded("int8")
    codec.set_params(request.inputs[0].parameters, {key: value})
    with pytest.raises(InvalidArgument, match=needle):
        read_decoded_inputs(request)


def test_wrong_wire_datatype_is_rejected() -> None:
    request = pb.ModelInferRequest()
    codec.add_inputs(request, {"t": _relu_activation()})
    codec.set_params(request.inputs[0].parameters, {"splitgate.encoding": "int8", "splitgate.scale": 0.1, "splitgate.zero_point": 0})
    with pytest.raises(InvalidArgument, match="needs datatype UINT8"):
        read_decoded_inputs(request)
