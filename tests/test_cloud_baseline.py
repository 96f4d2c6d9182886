"""The honest cloud-only baseline (issue 16.1): the lossless ``uint8`` wire encoding for
8-bit inputs (offered only when every calibration input decodes bit-exactly, decoded by
the cloud tier over real gRPC), and "cloud-only" = the best guarded cloud encoding in
the experiments' policies and the DADS reproduction rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _models import dynamic_batch_model, save, session
from splitgate.planner import Conditions, Constraints, PlanBundle, build_bundle

from splitgate.encoding import (
    add_encoded_inputs,
    encode_tensor,
    encoded_nbytes,
    read_decoded_inputs,
    uint8_codes,
)
from splitgate.errors import InvalidArgument
from splitgate.protocol import inference_pb2 as pb

FAST = {"repeats": 3, "warmup": 1}
BATCH = 16


def _byte_images(n: int, seed: int = 0, shape: tuple[int, ...] = (2, 8, 8)) -> np.ndarray:
    """Images scaled from bytes: exactly ``k / 255`` in float32."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, *shape)) / 255.0).astype(np.float32)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _wire_round_trip(x: np.ndarray) -> tuple[pb.ModelInferRequest, np.ndarray]:
    request = pb.ModelInferRequest()
    add_encoded_inputs(request, {"x": x}, "uint8")
    wire = pb.ModelInferRequest.FromString(request.SerializeToString())
    return wire, read_decoded_inputs(wire)["x"]


@pytest.mark.parametrize("make", [
    lambda: _byte_images(4),                                                             # k / 255 (numpy, float64 math)
    lambda: np.random.default_rng(1).integers(0, 256, (3, 32)).astype(np.float32) / np.float32(255),  # float32 math
    lambda: (np.random.default_rng(2).integers(40, 200, (3, 32)) / 256.0).astype(np.float32),  # k / 256, no 0 level
    lambda: np.random.default_rng(3).integers(-128, 128, (3, 32)).astype(np.float64),  # integers held as float64
    lambda: _byte_images(1, shape=(3, 64, 64)),                                         # large: the sampled fast path
])
def test_uint8_is_bit_exact_for_8bit_data(make) -> None:  # type: ignore[no-untyped-def]
    x = make()
    wire, y = _wire_round_trip(x)
    assert wire.inputs[0].datatype == "UINT8" and len(wire.raw_input_contents[0]) == x.size
    assert _same_bits(y, x)
    assert encoded_nbytes(x, "uint8") == x.size


@pytest.mark.parametrize("make, why", [
    (lambda: np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32), "gaussian floats"),
    (lambda: ((_byte_images(2) - 0.5) / 0.3).astype(np.float32), "normalized after scaling: not on one exact grid"),
    (lambda: np.array([0.0, -0.0, 1.0], np.float32), "a negative zero would come back positive"),
    (lambda: np.array([0.0, np.nan, 1.0], np.float32), "NaN"),
])
def test_uint8_refuses_float_data_and_the_wire_stays_lossless(make, why: str) -> None:  # type: ignore[no-untyped-def]
    x = make()
    assert uint8_codes(x) is None, why
    with pytest.raises(InvalidArgument, match="8-bit data"):
        encode_tensor(x, "uint8")
    wire, y = _wire_round_trip(x)  # the edge's path sends such a tensor raw
    assert wire.inputs[0].datatype == "FP32" and not wire.inputs[0].parameters
    assert _same_bits(y, x) and encoded_nbytes(x, "uint8") == x.nbytes


@pytest.mark.parametrize("key, value, needle", [
    ("splitgate.scale", 0.0, "scale must be finite"),
    ("splitgate.offset", float("inf"), "offset finite"),
    ("splitgate.datatype", "INT32", "decodes to FP16, FP32 or FP64"),
])
def test_bad_uint8_parameters_are_invalid_argument(key: str, value: object, needle: str) -> None:
    from splitgate import codec

    request = pb.ModelInferRequest()
    add_encoded_inputs(request, {"x": _byte_images(1)}, "uint8")
    codec.set_params(request.inputs[0].parameters, {key: value})  # type: ignore[dict-item]
    with pytest.raises(InvalidArgument, match=needle):
        read_decoded_inputs(request)


def _plan(tmp: Path, calibration: np.ndarray, name: str) -> PlanBundle:
    """The small conv net at batch 16; no prefix fits the device, so the cloud wins everywhere."""
    model = save(dynamic_batch_model(), tmp / f"{name}.onnx")
    return build_bundle(model, tmp / f"{name}.bundle", batch=BATCH, device_slowdown=50.0,
                        constraints=Constraints(device_memory_mb=1e-6), calibration={"x": calibration}, **FAST)


@pytest.fixture(scope="module")
def byte_bundle(tmp_path_factory: pytest.TempPathFactory) -> PlanBundle:
    return _plan(tmp_path_factory.mktemp("bytes"), _byte_images(4 * BATCH), "bytes")


def test_planner_offers_cloud_uint8_for_byte_images_and_records_the_check(byte_bundle: PlanBundle) -> None:
    assert "cloud@uint8" in byte_bundle.partitions
    m = byte_bundle.profile["encodings"]["measured"]["cloud@uint8"]
    assert m["dropped"] is None and m["exact_roundtrip_requests"] == 4
    assert m["raw_bytes"] / m["wire_bytes"] == pytest.approx(4.0)
    assert m["accuracy"]["y"]["top1_agreement"] == 1.0
    # never on a cut tensor that fails the same check (conv activations are not 8-bit data)
    cuts = {pid: why for pid, why in byte_bundle.profile["encodings"]["dropped"].items() if pid.endswith("@uint8")}
    assert cuts and all("does not hold 8-bit data" in why for why in cuts.values())
    assert not any(pid.endswith("@uint8") and pid != "cloud@uint8" for pid in byte_bundle.partitions)


def test_planner_refuses_cloud_uint8_for_a_float_image(tmp_path: Path) -> None:
    x = _byte_images(2 * BATCH)
    x[1, 0, 0, 0] = 0.5004  # one request holds one value off the 8-bit grid
    b = _plan(tmp_path, x, "float")
    assert "cloud@uint8" not in b.partitions
    why = b.profile["encodings"]["dropped"]["cloud@uint8"]
    assert why.startswith("not applicable") and "calibration request 0" in why


def test_cloud_only_is_the_best_guarded_cloud_encoding(byte_bundle: PlanBundle) -> None:
    from splitgate.experiments.policies import (
        LABELS,
        cloud_only_choice,
        static_partition,
    )

    clouds = [pid for pid, p in byte_bundle.partitions.items() if p.kind == "cloud"]
    assert len(clouds) > 2, clouds
    for uplink in (0.13, 1.1, 5.85, 18.88, 1000.0):
        c = Conditions(uplink_mbps=uplink, rtt_ms=50.0)
        pid = cloud_only_choice(byte_bundle, c)
        fastest = min(clouds, key=lambda k: byte_bundle.estimate(k, c).latency_ms)
        assert byte_bundle.estimate(pid, c).latency_ms == byte_bundle.estimate(fastest, c).latency_ms
        assert static_partition("cloud", byte_bundle, c) == pid
        assert static_partition("cloud-raw", byte_bundle, c) == "cloud"
    slow = Conditions(uplink_mbps=0.13, rtt_ms=50.0)
    assert cloud_only_choice(byte_bundle, slow) != "cloud", "on CAT1 an encoded upload beats raw fp32"
    assert LABELS["cloud-raw"] == "cloud (raw fp32)"


def test_reproduction_rows_take_cloud_only_and_keep_raw_fp32_as_a_column() -> None:
    from splitgate.experiments._records import Summary
    from splitgate.experiments.runner import reproduction_rows

    def s(policy: str, ms: float, parts: str) -> Summary:
        return Summary("analytic", policy, 10, ms, ms, ms, 1.0, 1.0, 0, parts)

    sums = {"3g": [s("device", 900.0, "device 100%"), s("cloud", 300.0, "cloud@uint8 100%"),
                   s("cloud-raw", 1200.0, "cloud 100%"), s("mincut", 250.0, "cut-3@int8 100%")]}
    [row] = reproduction_rows(sums, "analytic")
    assert row["cloud_ms"] == 300.0 and row["cloud_partition"] == "cloud@uint8 100%"
    assert row["cloud_raw_ms"] == 1200.0 and row["speedup_vs_cloud"] == 1.2 and row["speedup_vs_cloud_raw"] == 4.8


@pytest.fixture(scope="module")
def baseline(byte_bundle: PlanBundle) -> Iterator[str]:
    from splitgate.cloud.baseline import start_baseline

    server = start_baseline([str(byte_bundle.root)])
    try:
        yield server.address
    finally:
        server.stop()


def test_gateway_sends_cloud_uint8_over_grpc_bit_exact(byte_bundle: PlanBundle, baseline: str) -> None:
    """Real gRPC, real onnxruntime: a quarter of the bytes and exactly the raw upload's outputs."""
    from splitgate.edge import Gateway

    x = _byte_images(BATCH, seed=7)
    want = session(byte_bundle.model_path).run(None, {"x": x})[0]
    with Gateway([byte_bundle], cloud=baseline) as gw:
        enc = gw.infer(byte_bundle.model_name, {"x": x}, partition="cloud@uint8")
        raw = gw.infer(byte_bundle.model_name, {"x": x}, partition="cloud")
    assert enc.trace.partition == "cloud@uint8" and not enc.trace.fallback
    assert enc.trace.bytes_sent == x.size and raw.trace.bytes_sent == x.nbytes
    np.testing.assert_array_equal(enc.outputs["y"], raw.outputs["y"])
    np.testing.assert_allclose(enc.outputs["y"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.integration
def test_ray_tier_decodes_uint8_inputs(cloud_tier, zoo_bundle) -> None:
    """The Ray Serve tier decodes a uint8 input through the shared codec: the full model's
    outputs equal those on the raw fp32 upload of the same image."""
    import grpc

    from splitgate import codec
    from splitgate.protocol import inference_pb2_grpc as pb_grpc

    (spec,) = zoo_bundle.inputs
    x = _byte_images(1, seed=5, shape=tuple(d if d >= 0 else 1 for d in spec.shape[1:]))
    outputs = {}
    with grpc.insecure_channel(cloud_tier.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for enc in ("uint8", "raw"):
            request = pb.ModelInferRequest(model_name=zoo_bundle.model_name)
            codec.set_params(request.parameters, {"splitgate.partition": "cloud",
                                                  "splitgate.plan_digest": zoo_bundle.plan_digest})
            sent = add_encoded_inputs(request, {spec.name: x}, enc)
            assert sent == (x.size if enc == "uint8" else x.nbytes)
            outputs[enc] = codec.read_outputs(stub.ModelInfer(request, timeout=60))
    assert outputs["uint8"].keys() == outputs["raw"].keys()
    for name in outputs["raw"]:
        np.testing.assert_array_equal(outputs["uint8"][name], outputs["raw"][name])
