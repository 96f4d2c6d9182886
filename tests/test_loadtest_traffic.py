"""Unit tests of the load test's traffic recording and mix parsing (no tier needed)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from splitgate.loadtests._traffic import MixItem, load_traffic, parse_mix, record_traffic, save_traffic
from splitgate import codec
from splitgate.errors import InvalidArgument


def test_parse_mix() -> None:
    assert parse_mix("cut-3:3, cloud:1") == [MixItem(None, "cut-3", 3.0), MixItem(None, "cloud", 1.0)]
    assert parse_mix("mobilenet/cut-3:2,cloud") == [MixItem("mobilenet", "cut-3", 2.0), MixItem(None, "cloud", 1.0)]
    for bad in ("", "cut-3:x", "cut-3:0", "cut-3:-1", "mobilenet/:1"):
        with pytest.raises(InvalidArgument):
            parse_mix(bad)


def test_unknown_or_device_partitions_are_refused(zoo_bundle) -> None:
    with pytest.raises(InvalidArgument, match="cut-9999"):
        record_traffic([zoo_bundle.root], parse_mix("cut-9999:1"))
    with pytest.raises(InvalidArgument, match="device"):
        record_traffic([zoo_bundle.root], parse_mix("device:1"))
    with pytest.raises(InvalidArgument, match="nosuchmodel"):
        record_traffic([zoo_bundle.root], parse_mix("nosuchmodel/cloud:1"))


def test_recorded_payloads_are_real_prefix_outputs(zoo_bundle, tmp_path) -> None:
    split = next(p for p in zoo_bundle.partitions.values() if p.kind == "split")
    traffic = record_traffic([zoo_bundle.root], parse_mix(f"{split.id}:3,cloud:1"), samples=2, seed=7)
    assert [(t.name, t.weight) for t in traffic] == [
        (f"{zoo_bundle.model_name}/{split.id}", 3.0), (f"{zoo_bundle.model_name}/cloud", 1.0)
    ]
    cut, cloud = traffic
    (spec,) = split.cut_tensors
    request = cut.messages()[0]
    assert request.parameters["splitgate.partition"].string_param == split.id
    assert request.parameters["splitgate.plan_digest"].string_param == zoo_bundle.plan_digest
    assert [t.name for t in request.inputs] == [spec.name] and request.inputs[0].datatype == spec.datatype
    # The cut tensor is exactly what the prefix computes from the cloud request's input.
    x = codec.read_inputs(cloud.messages()[0])[zoo_bundle.inputs[0].name]
    prefix = ort.InferenceSession(str(split.prefix_path), providers=["CPUExecutionProvider"])
    (expected,) = prefix.run([spec.name], {zoo_bundle.inputs[0].name: np.asarray(x)})
    np.testing.assert_array_equal(codec.read_inputs(request)[spec.name], expected)
    assert cut.tensor_bytes == expected.nbytes
    # Distinct seeded samples, and a lossless file round trip.
    assert cut.requests[0] != cut.requests[1]
    again = load_traffic(save_traffic(traffic, tmp_path / "t.npz"))
    assert [(t.name, t.weight, t.requests, t.tensor_bytes) for t in again] == [
        (t.name, t.weight, t.requests, t.tensor_bytes) for t in traffic
    ]
