"""Bad encoded cut tensors through the real Ray Serve tier: INVALID_ARGUMENT, not a crash."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from splitgate import codec
from splitgate.encoding import add_encoded_inputs
from splitgate.protocol import inference_pb2 as pb
from splitgate.protocol import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


def _request(bundle, encoding: str) -> tuple[pb.ModelInferRequest, str]:
    part = [p for p in bundle.partitions.values() if p.kind == "split"][0]
    (spec,) = part.cut_tensors
    x = np.maximum(np.random.default_rng(3).standard_normal([1, *spec.shape[1:]]), 0).astype(np.float32)
    request = pb.ModelInferRequest(model_name=bundle.model_name)
    codec.set_params(request.parameters, {"splitgate.partition": part.id,
                                          "splitgate.plan_digest": bundle.plan_digest})
    add_encoded_inputs(request, {spec.name: x}, encoding)
    return request, spec.name


def test_bad_encoded_payloads_are_invalid_argument(cloud_tier, zoo_bundle) -> None:
    truncated, name = _request(zoo_bundle, "int8")
    truncated.raw_input_contents[0] = truncated.raw_input_contents[0][:-7]
    wrong_scale, _ = _request(zoo_bundle, "int8c")
    i = [t.name for t in wrong_scale.inputs].index(f"{name}/scale")
    channels = wrong_scale.inputs[i].shape[0]
    wrong_scale.inputs[i].shape[:] = [channels - 1]
    wrong_scale.raw_input_contents[i] = wrong_scale.raw_input_contents[i][:-4]
    good, _ = _request(zoo_bundle, "int8")
    with grpc.insecure_channel(cloud_tier.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for request, needle in ((truncated, name), (wrong_scale, f"'{name}/scale' must be FP32 shape [{channels}]")):
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=60)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert needle in (info.value.details() or ""), info.value.details()
        ok = stub.ModelInfer(good, timeout=60)  # the same tier still answers a well-formed one
        assert ok.outputs and ok.raw_output_contents
