"""The Gateway on the device alone (real onnxruntime), and `edge serve` over real gRPC."""

from __future__ import annotations

import asyncio
import shutil
import urllib.request

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from splitgate.edge import AsyncGateway, Gateway
from splitgate.edge._serve import serve_edge
from splitgate import codec
from splitgate.errors import BundleError, InvalidArgument
from splitgate.protocol import inference_pb2 as pb
from splitgate.protocol import inference_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def sample(zoo_bundle):
    (spec,) = zoo_bundle.inputs
    x = np.random.default_rng(3).standard_normal([d if d >= 0 else 1 for d in spec.shape]).astype(np.float32)
    session = ort.InferenceSession(str(zoo_bundle.model_path), providers=["CPUExecutionProvider"])
    return spec.name, x, session.run(None, {spec.name: x})[0]


def test_device_only_gateway_matches_onnxruntime(zoo_bundle, sample) -> None:
    name, x, want = sample
    with Gateway([zoo_bundle]) as gw:
        r = gw.infer(zoo_bundle.model_name, {name: x})
        assert r.trace.partition == "device" and r.trace.bytes_sent == 0
        np.testing.assert_allclose(next(iter(r.outputs.values())), want, rtol=1e-5, atol=1e-6)
        with pytest.raises(InvalidArgument, match="needs the cloud tier"):
            gw.infer(zoo_bundle.model_name, {name: x}, partition="cloud")


def test_cache_hits_are_served_and_counted(zoo_bundle, sample) -> None:
    name, x, want = sample
    with Gateway([zoo_bundle], cache_size=4) as gw:
        first = gw.infer(zoo_bundle.model_name, {name: x})
        second = gw.infer(zoo_bundle.model_name, {name: x.copy()})
        third = gw.infer(zoo_bundle.model_name, {name: x + 1})
        assert not first.trace.cached and second.trace.cached and not third.trace.cached
        np.testing.assert_array_equal(next(iter(second.outputs.values())), next(iter(first.outputs.values())))
        snap = gw.metrics.snapshot()
        model = zoo_bundle.model_name
        assert snap[f"splitgate_requests_total{{model={model},outcome=ok,partition=cache}}"] == 1
        assert snap[f"splitgate_requests_total{{model={model},outcome=ok,partition=device}}"] == 2


def test_async_twin_shares_the_core(zoo_bundle, sample) -> None:
    name, x, want = sample

    async def main() -> tuple[list, dict]:
        async with AsyncGateway([zoo_bundle], max_concurrency=2) as gw:
            results = await asyncio.gather(*(gw.infer(zoo_bundle.model_name, {name: x}) for _ in range(6)))
            return results, gw.metrics.snapshot()

    results, snap = asyncio.run(main())
    # All six went through the shared core: its policy and its metrics.
    assert [r.trace.partition for r in results] == ["device"] * 6
    assert snap[f"splitgate_requests_total{{model={zoo_bundle.model_name},outcome=ok,partition=device}}"] == 6
    for r in results:
        np.testing.assert_allclose(next(iter(r.outputs.values())), want, rtol=1e-5, atol=1e-6)


def test_corrupt_partition_is_refused_and_the_rest_used(zoo_bundle, sample, tmp_path) -> None:
    name, x, want = sample
    copy = tmp_path / "bundle"
    shutil.copytree(zoo_bundle.root, copy)
    split = next(p for p in zoo_bundle.partitions.values() if p.kind == "split")
    rel = split.prefix_path.relative_to(zoo_bundle.root)
    (copy / rel).write_bytes(b"not an onnx model")
    with Gateway([copy]) as gw:
        refused = gw.refused_partitions(zoo_bundle.model_name)
        assert split.id in refused and "sha256" in refused[split.id]
        r = gw.infer(zoo_bundle.model_name, {name: x}, partition=split.id)
        assert r.trace.partition == "device" and r.trace.fallback == "bundle-corrupt"
        np.testing.assert_allclose(next(iter(r.outputs.values())), want, rtol=1e-5, atol=1e-6)
    (copy / "model.onnx").write_bytes(b"truncated")
    with pytest.raises(BundleError, match="model.onnx"):
        Gateway([copy])


def test_edge_serve_speaks_oip_with_clear_errors(zoo_bundle, sample) -> None:
    name, x, want = sample
    model = zoo_bundle.model_name
    gw = Gateway([zoo_bundle])
    server, port, metrics = serve_edge(gw, port=0, metrics_port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(pb.ServerLiveRequest()).live
            assert stub.ModelReady(pb.ModelReadyRequest(name=model)).ready
            request = pb.ModelInferRequest(model_name=model)
            codec.add_inputs(request, {name: x})
            response = stub.ModelInfer(request)
            out = codec.read_outputs(response)
            np.testing.assert_allclose(next(iter(out.values())), want, rtol=1e-5, atol=1e-6)
            assert codec.read_params(response.parameters)["splitgate.partition"] == "device"

            bad = [
                (pb.ModelInferRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
            ]
            wrong_name = pb.ModelInferRequest(model_name=model)
            codec.add_inputs(wrong_name, {"bogus": x})
            bad.append((wrong_name, grpc.StatusCode.INVALID_ARGUMENT, "bogus"))
            wrong_shape = pb.ModelInferRequest(model_name=model)
            codec.add_inputs(wrong_shape, {name: x[:, :, :5]})
            bad.append((wrong_shape, grpc.StatusCode.INVALID_ARGUMENT, "dimension 2"))
            short = pb.ModelInferRequest(model_name=model)
            codec.add_inputs(short, {name: x})
            short.raw_input_contents[0] = b"\0" * 10
            bad.append((short, grpc.StatusCode.INVALID_ARGUMENT, "bytes"))
            for req, code, needle in bad:
                with pytest.raises(grpc.RpcError) as info:
                    stub.ModelInfer(req)
                assert info.value.code() == code and needle in info.value.details()
                assert stub.ModelInfer(request).outputs  # still serving
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics.server_port}/metrics").read().decode()
        assert f'splitgate_requests_total{{model="{model}",outcome="ok",partition="device"}}' in text
    finally:
        server.stop(0)
        if metrics is not None:
            metrics.shutdown()
        gw.close()


def test_device_time_from_profile_pads_to_the_planned_device(slow_device_bundle) -> None:
    from splitgate.planner import Conditions

    bundle = slow_device_bundle
    (spec,) = bundle.inputs
    x = np.zeros([d if d >= 0 else 1 for d in spec.shape], dtype=np.float32)
    planned = bundle.estimate("device", Conditions(uplink_mbps=10)).device_ms
    with Gateway([bundle], device_time_from_profile=True) as gw:
        r = gw.infer(bundle.model_name, {spec.name: x}, partition="device")
    assert r.trace.device_ms >= planned
