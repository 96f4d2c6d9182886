"""One request end to end through a real split: onnxruntime on the device, real
gRPC to a real Ray Serve ingress, onnxruntime in the replica."""

from __future__ import annotations

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from splitgate.edge import CloudClient, Gateway
from splitgate import codec
from splitgate.errors import InvalidArgument, NotFound
from splitgate.protocol import inference_pb2 as pb
from splitgate.protocol import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sample(zoo_bundle):
    rng = np.random.default_rng(1)
    (spec,) = zoo_bundle.inputs
    shape = [d if d >= 0 else 2 for d in spec.shape]  # batch 2 through a dynamic batch dim
    x = rng.standard_normal(shape).astype(np.float32)
    session = ort.InferenceSession(str(zoo_bundle.model_path), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {spec.name: x})
    return spec.name, x, expected


@pytest.fixture(scope="module")
def stub(cloud_tier):
    with grpc.insecure_channel(cloud_tier.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _three_splits(bundle) -> list[str]:
    cuts = [p.id for p in bundle.partitions.values() if p.kind == "split"]
    assert len(cuts) >= 3, f"mobilenet should have several chain cuts, got {cuts}"
    return [cuts[0], cuts[len(cuts) // 2], cuts[-1]]


def test_three_splits_match_full_model(zoo_bundle, cloud_tier, sample) -> None:
    name, x, expected = sample
    with Gateway([zoo_bundle], cloud=cloud_tier.address) as gateway:
        for pid in ["cloud", *_three_splits(zoo_bundle), "device"]:
            result = gateway.infer(zoo_bundle.model_name, {name: x}, partition=pid)
            (out,) = result.outputs.values()
            np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5, err_msg=pid)
            trace = result.trace
            assert trace.partition == pid
            if pid == "device":
                assert trace.bytes_sent == 0 and trace.cloud_ms == 0
            else:
                part = zoo_bundle.partition(pid)
                cut_elems = sum(int(np.prod([d if d >= 0 else 2 for d in t.shape])) for t in part.cut_tensors)
                assert trace.bytes_sent == cut_elems * 4
                assert trace.cloud_ms > 0 and trace.network_ms > 0
            if pid not in ("cloud", "device"):
                assert trace.device_ms > 0


def test_health_and_metadata(stub, zoo_bundle) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name=zoo_bundle.model_name)).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="no-such-model")).ready
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=zoo_bundle.model_name))
    assert [t.name for t in meta.inputs] == [t.name for t in zoo_bundle.inputs]
    assert meta.inputs[0].datatype == "FP32"
    cut = _three_splits(zoo_bundle)[1]
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=zoo_bundle.model_name, version=cut))
    assert [t.name for t in meta.inputs] == [t.name for t in zoo_bundle.partition(cut).cut_tensors]


def _request(model: str, arrays: dict, partition: str | None = None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    if partition:
        codec.set_params(request.parameters, {"splitgate.partition": partition})
    codec.add_inputs(request, arrays)
    return request


def test_bad_requests_get_clear_statuses_and_server_keeps_serving(stub, zoo_bundle, sample) -> None:
    name, x, expected = sample
    model = zoo_bundle.model_name
    cases = [
        (_request("no-such-model", {name: x}), grpc.StatusCode.NOT_FOUND, "no-such-model"),
        (_request(model, {name: x}, "cut-9999"), grpc.StatusCode.NOT_FOUND, "cut-9999"),
        (_request(model, {"wrong_name": x}), grpc.StatusCode.INVALID_ARGUMENT, "wrong_name"),
        (_request(model, {name: x[:, :2]}), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        (_request(model, {name: x.astype(np.float64)}), grpc.StatusCode.INVALID_ARGUMENT, "FP64"),
        (_request(model, {name: x[0]}), grpc.StatusCode.INVALID_ARGUMENT, "rank"),
    ]
    truncated = _request(model, {name: x})
    truncated.raw_input_contents[0] = truncated.raw_input_contents[0][:-3]
    cases.append((truncated, grpc.StatusCode.INVALID_ARGUMENT, "bytes"))
    for request, code, needle in cases:
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=30)
        assert info.value.code() == code, info.value.details()
        assert needle in info.value.details()
        # ... and the server keeps serving.
        response = stub.ModelInfer(_request(model, {name: x}), timeout=30)
        np.testing.assert_allclose(
            codec.read_outputs(response)[response.outputs[0].name], expected, rtol=1e-4, atol=1e-5
        )


def test_typed_errors_from_client(cloud_tier, zoo_bundle, sample) -> None:
    name, x, _ = sample
    with CloudClient(cloud_tier.address) as client:
        with pytest.raises(NotFound, match="no-such-model"):
            client.infer("no-such-model", {name: x})
        with pytest.raises(InvalidArgument, match="unknown input 'bogus'"):
            client.infer(zoo_bundle.model_name, {"bogus": x})
    with Gateway([zoo_bundle], cloud=cloud_tier.address) as gateway:
        with pytest.raises(InvalidArgument, match="expected rank 4"):
            gateway.infer(zoo_bundle.model_name, {name: x[0]}, partition="cloud")
        with pytest.raises(NotFound, match="not loaded"):
            gateway.infer("nope", {name: x})
