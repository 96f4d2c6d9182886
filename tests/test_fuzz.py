"""Property-based and fuzz tests of the codec, the shared validation and
ModelInfer (in process and over real gRPC): malformed input only ever gets a
typed error / documented status. The long run is ``benchmarks/bench_fuzz.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from splitgate import codec
from splitgate.errors import InvalidArgument, ResourceExhausted, SplitgateError
from splitgate.validate import Limits, validate_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_fuzz  # noqa: E402

FAST = settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))

_dtypes = st.sampled_from([np.dtype(d) for d in ("?", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8")])


@FAST
@given(hnp.arrays(_dtypes, hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=5)))
def test_encode_decode_round_trip(array: np.ndarray) -> None:
    datatype, shape, raw = codec.encode_array(array)
    back = codec.decode_array("t", datatype, shape, raw)
    assert back.dtype == codec.DATATYPES[datatype] and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


@FAST
@given(
    st.sampled_from([*codec.DATATYPES, "BYTES", "", "FP8", "fp32"]),
    st.lists(st.one_of(st.integers(-4, 8), st.sampled_from([2**31, 2**40, 2**62, 2**63 - 1])), max_size=70),
    st.binary(max_size=200),
)
def test_decode_array_never_crashes(datatype: str, shape: list[int], raw: bytes) -> None:
    try:
        arr = codec.decode_array("img", datatype, shape, raw)
    except (InvalidArgument, ResourceExhausted) as exc:
        assert "'img'" in str(exc)
    else:
        assert arr.nbytes == len(raw) and list(arr.shape) == shape


def test_shape_limits_before_allocation() -> None:
    with pytest.raises(ResourceExhausted, match="more than the limit"):
        codec.decode_array("x", "FP32", [0, 2**30, 2**30], b"")  # 0 bytes, yet 2**60 nominal elements
    with pytest.raises(InvalidArgument, match="rank 70"):
        codec.decode_array("x", "FP32", [1] * 70, b"\0" * 4)
    big = 2**31 - 1
    with pytest.raises(InvalidArgument, match=f"expected {big**3 * 4} "):
        codec.decode_array("x", "FP32", [big, big, big], b"\0" * 4)  # product overflows int64
    with pytest.raises(InvalidArgument, match="dimension above"):
        codec.decode_array("x", "FP32", [2**62], b"")


@FAST
@given(bench_fuzz.cases(bench_fuzz.Target("m", "cut-1", "t", "FP32", (1, 2, 3), "d" * 64, ("y",))))
def test_read_inputs_only_raises_typed_errors(case) -> None:
    kind, request = case
    if kind == "bytes":
        return
    try:
        codec.read_inputs(request)
    except (InvalidArgument, ResourceExhausted):
        pass


class _Spec:
    def __init__(self, name: str, datatype: str, shape: list[int]) -> None:
        self.name, self.datatype, self.shape = name, datatype, shape


_values = st.one_of(
    hnp.arrays(_dtypes, hnp.array_shapes(min_dims=0, max_dims=4, max_side=4)),
    st.lists(st.lists(st.floats(), max_size=3), max_size=3),  # often ragged
    st.text(max_size=5),
    st.none(),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


@FAST
@given(st.dictionaries(st.one_of(st.sampled_from(["x", "y", "z"]), st.integers()), _values, max_size=3),
       st.sampled_from(["allow", "reject"]))
def test_validate_inputs_only_raises_typed_errors(inputs: dict, nan_policy: str) -> None:
    specs = [_Spec("x", "FP32", [-1, 3]), _Spec("y", "INT64", [2])]
    try:
        out = validate_inputs(inputs, specs, where="model 'm'", limits=Limits(nan_policy=nan_policy))
    except (InvalidArgument, ResourceExhausted) as exc:
        assert str(exc).startswith("model 'm'")
    else:
        assert out["x"].dtype == np.float32 and out["x"].shape[1] == 3
        if nan_policy == "reject":
            assert np.isfinite(out["x"]).all()


def test_nan_policy_names_tensor_and_index() -> None:
    x = np.zeros((2, 3), np.float32)
    x[1, 2] = np.nan
    specs = [_Spec("x", "FP32", [-1, 3])]
    assert validate_inputs({"x": x}, specs, where="m")["x"] is not None
    with pytest.raises(InvalidArgument, match=r"input 'x' has nan at index \[1, 2\]"):
        validate_inputs({"x": x}, specs, where="m", limits=Limits(nan_policy="reject"))
    with pytest.raises(ResourceExhausted, match="input 'x'"):
        validate_inputs({"x": np.zeros((10, 3), np.float32)}, specs, where="m", limits=Limits(max_tensor_elements=20))


@pytest.fixture(scope="module")
def service(zoo_bundle):
    from splitgate.cloud._service import SuffixService

    return SuffixService([zoo_bundle.root], limits=Limits(nan_policy="reject"))


def test_suffix_service_prepare_only_raises_typed_errors(service, zoo_bundle) -> None:
    target = bench_fuzz.Target.of(zoo_bundle)
    seen: dict[str, int] = {}

    @FAST
    @given(bench_fuzz.cases(target))
    def one(case) -> None:
        kind, request = case
        if kind == "bytes":
            return
        try:
            service.model_infer(request)
            seen["OK"] = seen.get("OK", 0) + 1
        except SplitgateError as exc:
            seen[exc.code.name] = seen.get(exc.code.name, 0) + 1

    one()
    assert "INTERNAL" not in seen, seen
    assert {"INVALID_ARGUMENT", "NOT_FOUND"} <= set(seen), seen


def test_model_infer_fuzz_over_grpc(zoo_bundle) -> None:
    """A few hundred malformed requests (and random-byte messages) over real
    gRPC: documented statuses only, and the server still answers correctly."""
    from splitgate.cloud.baseline import start_baseline

    target = bench_fuzz.Target.of(zoo_bundle)
    examples: list = []
    with start_baseline([str(zoo_bundle.root)]) as server:
        counts = bench_fuzz.fuzz(server.address, target, 300, examples=examples)
        assert sum(counts.values()) >= 250
        assert set(counts) <= bench_fuzz.DOCUMENTED, (counts, examples)
        assert bench_fuzz.still_correct(server.address, target, zoo_bundle)


def test_random_bytes_message_is_invalid_argument(zoo_bundle) -> None:
    import grpc

    from splitgate.cloud.baseline import start_baseline

    with start_baseline([str(zoo_bundle.root)]) as server, grpc.insecure_channel(server.address) as channel:
        status = bench_fuzz.send(channel, ("bytes", b"\xff\xff\xff\xff\x0f"))
    assert status == "INVALID_ARGUMENT"
