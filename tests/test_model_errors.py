"""A model that fails on an input matching its declared inputs: a typed error
naming the model, partition (prefix/suffix/full model, device/cloud), node,
input shapes and onnxruntime's reason -- INVALID_ARGUMENT on the wire, never
INTERNAL with a dump -- on the device, in ``edge serve``, on the cloud; and a
failing partition does not open the Gateway's circuit breaker.

The test model accepts ``x[N, 8]`` for any N but reshapes to a fixed ``[2, 4]``
(node ``Reshape_82``), so it runs at N=1 and fails at N=2 in every partition
whose part holds that node. Real onnxruntime and real gRPC throughout (the
plain grpcio baseline as the cloud: no Ray); fakes only in the unit tests of
the message parsing.
"""

from __future__ import annotations

import pickle
import shutil
import socket
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from _models import IR_VERSION, OPSET
from onnx import TensorProto, helper, numpy_helper

from splitgate.edge import Gateway
from splitgate.edge._serve import serve_edge
from splitgate.edge._sessions import RunSite, SessionCache
from splitgate import codec
from splitgate._ort_errors import clean_reason, load_error, run_error
from splitgate.errors import (
    BundleError,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    ModelRunError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    error_for_code,
    is_peer_failure,
)
from splitgate.protocol import inference_pb2 as pb
from splitgate.protocol import inference_pb2_grpc as pb_grpc

GOOD = np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8)  # N=1: every partition runs
BAD = np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)  # N=2: valid for x[N,8], the Reshape fails
RESHAPE_DUMP = (
    "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Reshape node. "
    "Name:'Reshape_82' Status Message: /onnxruntime_src/onnxruntime/core/providers/cpu/tensor/"
    "reshape_helper.h:91 onnxruntime::ReshapeHelper::ReshapeHelper(const onnxruntime::TensorShape&, "
    "onnxruntime::TensorShapeVector&, bool) input_shape_size == requested_shape_size was false. "
    "The input tensor cannot be reshaped to the requested shape. Input shape:{32,1,2,512}, "
    "requested shape:{1,1024}\n"
)


# -- models and bundles ---------------------------------------------------------------


def _reshaper(scale: float = 2.0) -> onnx.ModelProto:
    """x[N,8] -> Relu -> Mul(scale) -> Reshape([2,4]) 'Reshape_82' -> MatMul -> Tanh -> y[2,3]."""
    inits = [
        numpy_helper.from_array(np.array([2, 4], np.int64), "shape"),
        numpy_helper.from_array(np.array(scale, np.float32), "scale"),
        numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "w"),
    ]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Mul", ["r", "scale"], ["scaled"], name="scale"),
        helper.make_node("Reshape", ["scaled", "shape"], ["grid"], name="Reshape_82"),
        helper.make_node("MatMul", ["grid", "w"], ["mm"], name="matmul"),
        helper.make_node("Tanh", ["mm"], ["y"], name="tanh"),
    ]
    return _model(nodes, inits, [2, 3])


def _healthy() -> onnx.ModelProto:
    """x[N,8] -> Relu -> Mul(3) -> Tanh -> y[N,8]: runs at any N."""
    inits = [numpy_helper.from_array(np.array(3.0, np.float32), "scale")]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Mul", ["r", "scale"], ["scaled"], name="scale"),
        helper.make_node("Tanh", ["scaled"], ["y"], name="tanh"),
    ]
    return _model(nodes, inits, ["N", 8])


def _model(nodes: list, inits: list, y_shape: list) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = IR_VERSION
    return model


def _bundle(model: onnx.ModelProto, root: Path, name: str):
    from splitgate.planner import build_bundle

    path = root / f"{name}.onnx"
    onnx.save(model, path)
    return build_bundle(path, root / f"{name}.bundle", model_name=name, candidates="chain", profile=False)


def _split_before_reshape(bundle) -> str:
    """The partition whose cut tensor is ``scaled``: its suffix holds Reshape_82."""
    return next(p.id for p in bundle.partitions.values() if [t.name for t in p.cut_tensors] == ["scaled"])


def _split_after_reshape(bundle) -> str:
    """The partition whose cut tensor is ``grid``: its prefix holds Reshape_82."""
    return next(p.id for p in bundle.partitions.values() if [t.name for t in p.cut_tensors] == ["grid"])


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_errors")
    stale_root = root / "stale"
    stale_root.mkdir()
    return {
        "reshaper": _bundle(_reshaper(), root, "reshaper"),
        "healthy": _bundle(_healthy(), root, "healthy"),
        "lonely": _bundle(_healthy(), root, "lonely"),  # never served by the cloud
        # Same model name, other weights: another plan digest (a stale edge).
        "stale": _bundle(_reshaper(scale=3.0), stale_root, "reshaper"),
    }


@pytest.fixture(scope="module")
def cloud(bundles):
    """The plain grpcio baseline cloud serving 'reshaper' and 'healthy'."""
    from splitgate.cloud.baseline import start_baseline

    with start_baseline([str(bundles["reshaper"].root), str(bundles["healthy"].root)]) as server:
        yield server.address


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _assert_names_everything(message: str, *needles: str) -> None:
    for needle in ("Reshape 'Reshape_82'", "(input {2,8}, requested {2,4})", *needles):
        assert needle in message, f"{needle!r} not in {message!r}"
    for noise in ("onnxruntime_src", "\x1b[", "ReshapeHelper::", "was false", "[ONNXRuntimeError]"):
        assert noise not in message, f"{noise!r} in {message!r}"
    assert "\n" not in message


# -- the message: unit tests on onnxruntime's text ------------------------------------------


class _OrtFail(Exception):
    """Stands in for onnxruntime's pybind ``Fail`` (recognised by module)."""


_OrtFail.__module__ = "onnxruntime.capi.onnxruntime_pybind11_state"


def test_reason_keeps_node_and_reason_drops_source_noise_and_colour() -> None:
    op, node, reason = clean_reason("\x1b[1;31m" + RESHAPE_DUMP + "\x1b[m")
    assert (op, node) == ("Reshape", "Reshape_82")
    assert reason == "the input tensor cannot be reshaped to the requested shape (input {32,1,2,512}, requested {1,1024})"
    op, node, reason = clean_reason(
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running MatMul node. "
        "Name:'mm' Status Message: matmul_helper.h:59 Compute MatMul dimension mismatch"
    )
    assert (op, node, reason) == ("MatMul", "mm", "MatMul dimension mismatch")


def test_reason_of_a_node_inside_a_subgraph_names_the_innermost_node() -> None:
    text = (
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running If node. Name:'If_3' "
        "Status Message: Non-zero status code returned while running Reshape node. Name:'inner_reshape' "
        "Status Message: /src/reshape_helper.h:91 onnxruntime::ReshapeHelper::ReshapeHelper(const "
        "onnxruntime::TensorShape&) a == b was false. The input tensor cannot be reshaped"
    )
    op, node, reason = clean_reason(text)
    assert (op, node) == ("Reshape", "inner_reshape")
    assert reason == "the input tensor cannot be reshaped (inside If 'If_3')"


def test_run_error_types_by_cause() -> None:
    site = RunSite("crnn", "cut-3", "suffix", "cloud")
    feeds = {"x": np.zeros((1, 1, 64, 7), np.float32), "n": np.zeros((1,), np.int64)}
    err = run_error(_OrtFail(RESHAPE_DUMP), site, feeds)
    assert type(err) is ModelRunError and isinstance(err, InvalidArgument)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(err) == (
        "model 'crnn' partition 'cut-3' (suffix on the cloud) failed at node Reshape 'Reshape_82' on inputs "
        "x[1,1,64,7] FP32, n[1] INT64: the input tensor cannot be reshaped to the requested shape "
        "(input {32,1,2,512}, requested {1,1024})"
    )
    assert (err.model, err.partition, err.part, err.tier) == ("crnn", "cut-3", "suffix", "cloud")
    assert (err.op_type, err.node) == ("Reshape", "Reshape_82")
    assert err.shapes == {"x": (1, 1, 64, 7), "n": (1,)}

    oom = run_error(_OrtFail(
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running ConstantOfShape node. "
        "Name:'big' Status Message: /src/bfc_arena.cc:360 void* onnxruntime::BFCArena::AllocateRawInternal("
        "size_t, bool, onnxruntime::Stream*) Failed to allocate memory for requested buffer of size 4503599627370496"
    ), site, feeds)
    assert type(oom) is ResourceExhausted
    assert "ran out of memory at node ConstantOfShape 'big'" in str(oom) and "x[1,1,64,7] FP32" in str(oom)

    class EPFail(_OrtFail):
        pass

    provider = run_error(EPFail("[ONNXRuntimeError] : 11 : EP_FAIL : CUDA failure 700"), site, feeds)
    assert type(provider) is InternalError and "execution provider" in str(provider)

    load = load_error(_OrtFail("[ONNXRuntimeError] : 1 : FAIL : Unsupported model IR version: 14"), site, "p.onnx")
    assert type(load) is BundleError and "cannot load p.onnx: unsupported model IR version: 14" in str(load)


def test_model_run_error_survives_the_wire_and_others_stay_plain() -> None:
    sent = ModelRunError(
        model="m", partition="cut-2", part="suffix", tier="cloud", op_type="Reshape", node="Reshape_82",
        inputs=[("scaled", (2, 8), "FP32")], reason="the input tensor cannot be reshaped: bad",
    )
    got = error_for_code(grpc.StatusCode.INVALID_ARGUMENT, f"INVALID_ARGUMENT: {sent}")
    assert type(got) is ModelRunError and str(got) == str(sent)  # the status prefix is not doubled
    assert (got.model, got.partition, got.part, got.tier, got.op_type, got.node, got.reason) == (
        "m", "cut-2", "suffix", "cloud", "Reshape", "Reshape_82", "the input tensor cannot be reshaped: bad"
    )
    assert got.shapes == {"scaled": (2, 8)}
    copy = pickle.loads(pickle.dumps(got))
    assert type(copy) is ModelRunError and str(copy) == str(sent) and copy.shapes == {"scaled": (2, 8)}
    plain = error_for_code(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT: model 'm': unknown input 'z'")
    assert type(plain) is InvalidArgument


def test_only_a_failing_peer_counts_against_the_breaker() -> None:
    assert is_peer_failure(Unavailable("x")) and is_peer_failure(InternalError("x"))
    assert is_peer_failure(error_for_code(grpc.StatusCode.UNKNOWN, "x")) and is_peer_failure(OSError("reset"))
    # Ray Serve's proxy with no application deployed: the tier is down, not the model unknown.
    assert is_peer_failure(error_for_code(grpc.StatusCode.NOT_FOUND, (
        "NOT_FOUND: Application 'splitgate' not found. Ping /ray.serve.RayServeAPIService/ListApplications "
        "for available applications."
    )))
    assert not is_peer_failure(NotFound("NOT_FOUND: model 'm' is not served here; served models: ['a']"))
    for refused in (InvalidArgument("x"), NotFound("x"), FailedPrecondition("x"), ResourceExhausted("x"),
                    ModelRunError(reason="x")):
        assert not is_peer_failure(refused), refused


# -- (a) the device: SessionCache and the Gateway's device path -----------------------------


def test_session_cache_names_partition_node_and_shapes(bundles) -> None:
    bundle = bundles["reshaper"]
    cache = SessionCache()
    before, after = (bundle.partition(_split_before_reshape(bundle)), bundle.partition(_split_after_reshape(bundle)))
    site = RunSite.of("reshaper", after, "prefix", "device")
    with pytest.raises(ModelRunError) as info:
        cache.run(after.prefix_path, {"x": BAD}, site)
    _assert_names_everything(str(info.value), f"model 'reshaper' partition '{after.id}' (prefix on the device)",
                             "on inputs x[2,8] FP32")
    assert info.value.shapes == {"x": (2, 8)} and info.value.partition == after.id

    scaled = cache.run(before.prefix_path, {"x": BAD}, RunSite.of("reshaper", before, "prefix", "device"))["scaled"]
    with pytest.raises(ModelRunError) as info:
        cache.run(before.suffix_path, {"scaled": scaled}, RunSite.of("reshaper", before, "suffix", "device"))
    _assert_names_everything(str(info.value), f"partition '{before.id}' (suffix on the device)", "scaled[2,8] FP32")
    # The same sessions keep serving valid inputs.
    assert cache.run(after.prefix_path, {"x": GOOD}, site)["grid"].shape == (2, 4)


def test_session_cache_load_failure_is_a_bundle_error(tmp_path) -> None:
    cache = SessionCache()
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model")
    site = RunSite("m", "cut-1", "prefix", "device")
    with pytest.raises(BundleError, match=r"model 'm' partition 'cut-1' \(prefix on the device\): onnxruntime "
                       r"\S+ cannot load \S*garbage.onnx: protobuf parsing failed"):
        cache.run(garbage, {"x": GOOD}, site)
    too_new = _healthy()
    too_new.ir_version = 99
    onnx.save(too_new, tmp_path / "too_new.onnx")
    with pytest.raises(BundleError, match="cannot load .*too_new.onnx: .*IR version") as info:
        cache.run(tmp_path / "too_new.onnx", {"x": GOOD}, site)
    assert "onnxruntime_src" not in str(info.value)


def test_device_gateway_raises_the_typed_error_and_keeps_serving(bundles) -> None:
    with Gateway([bundles["reshaper"]]) as gw:
        with pytest.raises(ModelRunError) as info:
            gw.infer("reshaper", {"x": BAD})
        _assert_names_everything(str(info.value), "model 'reshaper' partition 'device' (full model on the device)",
                                 "on inputs x[2,8] FP32")
        assert gw.infer("reshaper", {"x": GOOD}).outputs["y"].shape == (2, 3)


# -- (b) edge serve over real gRPC --------------------------------------------------------------


def _edge_call(stub, model: str, x: np.ndarray, partition: str | None = None):
    request = pb.ModelInferRequest(model_name=model)
    codec.add_inputs(request, {"x": x})
    if partition is not None:
        codec.set_params(request.parameters, {"splitgate.partition": partition})
    return stub.ModelInfer(request, timeout=30)


def test_edge_serve_answers_invalid_argument_and_serves_on(bundles) -> None:
    gw = Gateway([bundles["reshaper"]])
    server, port, _ = serve_edge(gw, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(2):
                with pytest.raises(grpc.RpcError) as info:
                    _edge_call(stub, "reshaper", BAD)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                _assert_names_everything(info.value.details(), "partition 'device'", "x[2,8] FP32")
                assert "internal error" not in info.value.details()
                out = codec.read_outputs(_edge_call(stub, "reshaper", GOOD))
                assert out["y"].shape == (2, 3)
    finally:
        server.stop(0).wait()
        gw.close()


# -- (c) the cloud: SuffixService, the baseline over gRPC, the Ray app's batch path ------------


def _cloud_request(model: str, partition: str, name: str, x: np.ndarray, digest: str | None = None):
    request = pb.ModelInferRequest(model_name=model)
    codec.add_inputs(request, {name: x})
    params = {"splitgate.partition": partition}
    if digest:
        params["splitgate.plan_digest"] = digest
    codec.set_params(request.parameters, params)
    return request


def test_suffix_service_names_the_node(bundles) -> None:
    from splitgate.cloud._service import SuffixService

    bundle = bundles["reshaper"]
    cut = _split_before_reshape(bundle)
    service = SuffixService([bundle.root])
    with pytest.raises(ModelRunError) as info:
        service.model_infer(_cloud_request("reshaper", cut, "scaled", BAD))
    _assert_names_everything(str(info.value), f"partition '{cut}' (suffix on the cloud)", "scaled[2,8] FP32")
    with pytest.raises(ModelRunError, match=r"partition 'cloud' \(full model on the cloud\)"):
        service.model_infer(_cloud_request("reshaper", "cloud", "x", BAD))
    assert service.model_infer(_cloud_request("reshaper", cut, "scaled", GOOD)).outputs


def test_suffix_service_unloadable_suffix_is_failed_precondition(bundles, tmp_path) -> None:
    from splitgate.cloud._service import SuffixService
    from splitgate.planner import PlanBundle

    copy = tmp_path / "bundle"
    shutil.copytree(bundles["reshaper"].root, copy)
    bundle = PlanBundle.load(copy)
    cut = bundle.partition(_split_before_reshape(bundle))
    rel = cut.suffix_path.relative_to(bundle.root).as_posix()
    too_new = onnx.load(cut.suffix_path)
    too_new.ir_version = 99  # a file this onnxruntime cannot load (its sha256 check left out)
    onnx.save(too_new, cut.suffix_path)
    bundle.manifest["files"].pop(rel)
    service = SuffixService([])
    service.add_bundle(bundle, smoke=False)
    with pytest.raises(BundleError, match=rf"partition '{cut.id}' \(suffix on the cloud\): onnxruntime \S+ "
                       rf"cannot load {rel}: .*IR version") as info:
        service.model_infer(_cloud_request("reshaper", cut.id, "scaled", GOOD))
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_baseline_answers_invalid_argument_naming_the_node_and_serves_on(bundles, cloud) -> None:
    cut = _split_before_reshape(bundles["reshaper"])
    with grpc.insecure_channel(cloud) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(_cloud_request("reshaper", cut, "scaled", BAD), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            _assert_names_everything(info.value.details(), f"partition '{cut}' (suffix on the cloud)",
                                     "scaled[2,8] FP32")
            assert stub.ModelInfer(_cloud_request("reshaper", cut, "scaled", GOOD), timeout=30).outputs


@pytest.mark.integration  # imports Ray Serve (seconds); `make test-fast` leaves it out
def test_ray_app_batch_path_isolates_the_failing_request(bundles) -> None:
    """The deployment's drain worker (``_work``, the default batcher), called
    without Ray: a batch that fails only because it is a batch is rerun singly
    and succeeds; in a batch with a failing request only that one fails, typed."""
    pytest.importorskip("ray")
    from splitgate.cloud._app import InferenceDeployment
    from splitgate.cloud._service import SuffixService

    cut = _split_before_reshape(bundles["reshaper"])
    cls = InferenceDeployment.func_or_class
    app = cls.__new__(cls)  # the replica's state without starting Ray
    app._service = SuffixService([bundles["reshaper"].root])
    app._max_batch, app._max_bytes, app._check_size = 8, 1 << 26, False
    good = [(_cloud_request("reshaper", cut, "scaled", GOOD), 1), (_cloud_request("reshaper", cut, "scaled", GOOD), 2)]
    out = app._work(good)
    assert all(ok for ok, _ in out), out  # [2,8] as one batch fails at Reshape_82; alone each runs
    out = app._work([good[0], (_cloud_request("reshaper", cut, "scaled", BAD), 2)])
    assert out[0][0] and not out[1][0]
    assert isinstance(out[1][1], ModelRunError) and out[1][1].shapes == {"scaled": (2, 8)}


# -- (d) the Gateway with a real cloud: the breaker ------------------------------------------


def test_failing_partition_on_the_cloud_raises_and_leaves_the_breaker_closed(bundles, cloud) -> None:
    cut = _split_before_reshape(bundles["reshaper"])
    healthy_cut = next(p.id for p in bundles["healthy"].partitions.values() if p.kind == "split")
    with Gateway([bundles["reshaper"], bundles["healthy"]], cloud, hedge=False, breaker_failures=3) as gw:
        for _ in range(8):  # far past breaker_failures
            with pytest.raises(ModelRunError) as info:
                gw.infer("reshaper", {"x": BAD}, partition=cut)
            _assert_names_everything(str(info.value), f"partition '{cut}' (suffix on the cloud)", "scaled[2,8] FP32")
            assert info.value.tier == "cloud" and info.value.shapes == {"scaled": (2, 8)}
            assert gw.breaker_state == "closed"
        r = gw.infer("healthy", {"x": BAD}, partition=healthy_cut)
        assert r.trace.partition == healthy_cut and r.trace.fallback is None and r.trace.bytes_sent > 0
        np.testing.assert_allclose(r.outputs["y"], np.tanh(3 * np.maximum(BAD, 0)), rtol=1e-6)
        ok = gw.infer("reshaper", {"x": GOOD}, partition=cut)
        assert ok.trace.fallback is None and ok.trace.bytes_sent > 0


def test_edge_serve_relays_the_clouds_model_error(bundles, cloud) -> None:
    cut = _split_before_reshape(bundles["reshaper"])
    gw = Gateway([bundles["reshaper"]], cloud, hedge=False)
    server, port, _ = serve_edge(gw, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                _edge_call(stub, "reshaper", BAD, partition=cut)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = info.value.details()
            _assert_names_everything(details, f"partition '{cut}' (suffix on the cloud)")
            assert details.startswith("model 'reshaper'"), details  # no "INVALID_ARGUMENT: " prefix relayed
            response = _edge_call(stub, "reshaper", GOOD, partition=cut)
            assert codec.read_params(response.parameters)["splitgate.fallback"] == ""
    finally:
        server.stop(0).wait()
        gw.close()


def test_refusals_fall_back_locally_without_opening_the_breaker(bundles, cloud) -> None:
    """NOT_FOUND (a model the cloud does not serve) and FAILED_PRECONDITION (a
    stale plan digest) complete on the device, and the breaker stays closed."""
    lonely_cut = next(p.id for p in bundles["lonely"].partitions.values() if p.kind == "split")
    stale = bundles["stale"]
    stale_cut = _split_before_reshape(stale)
    want = np.tanh((3 * np.maximum(GOOD, 0)).reshape(2, 4) @ (np.arange(12, dtype=np.float32).reshape(4, 3) / 10))
    backoff_s = 0.5
    with Gateway([bundles["lonely"], stale], cloud, hedge=False, breaker_failures=2, breaker_reset_s=backoff_s) as gw:
        for k in range(4):
            # the first refusal costs a round trip; then the model alone backs off the cloud
            r = gw.infer("lonely", {"x": BAD}, partition=lonely_cut)
            assert r.trace.fallback == ("not_found" if k == 0 else "cloud-refused")
            np.testing.assert_allclose(r.outputs["y"], np.tanh(3 * np.maximum(BAD, 0)), rtol=1e-6)
            r = gw.infer("reshaper", {"x": GOOD}, partition=stale_cut)
            assert r.trace.fallback == ("failed_precondition" if k == 0 else "cloud-refused")
            np.testing.assert_allclose(r.outputs["y"], want, rtol=1e-5)
            assert gw.breaker_state == "closed"
        time.sleep(backoff_s + 0.1)  # after the back-off the cloud is asked again
        assert gw.infer("lonely", {"x": BAD}, partition=lonely_cut).trace.fallback == "not_found"
        # A stale plan whose suffix fails: the local suffix names itself.
        with pytest.raises(ModelRunError, match=rf"partition '{stale_cut}' \(suffix on the device\)"):
            gw.infer("reshaper", {"x": BAD}, partition=stale_cut)


def test_an_unreachable_cloud_still_opens_the_breaker(bundles) -> None:
    cut = _split_before_reshape(bundles["reshaper"])
    with Gateway([bundles["reshaper"]], _closed_port(), hedge=False, breaker_failures=2, deadline_ms=5000) as gw:
        r = gw.infer("reshaper", {"x": GOOD}, partition=cut)
        assert r.trace.fallback == "unavailable"
        # The local suffix fails on this input: the device's own typed error.
        with pytest.raises(ModelRunError, match=rf"partition '{cut}' \(suffix on the device\)"):
            gw.infer("reshaper", {"x": BAD}, partition=cut)
        assert gw.breaker_state == "open"
        assert gw.infer("reshaper", {"x": GOOD}, partition=cut).trace.fallback == "breaker-open"
