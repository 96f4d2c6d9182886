"""The generated stubs must match proto/inference.proto, and the proto the OIP spec."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from splitgate.protocol import inference_pb2, inference_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "proto" / "inference.proto"


def _compile_descriptor(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    pytest.importorskip("grpc_tools")
    out = tmp_path / "inference.desc"
    # Same import mapping as `make proto`, so file names in the descriptor agree.
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc",
            f"-Isplitgate/protocol={PROTO.parent}",
            f"--descriptor_set_out={out}",
            str(PROTO),
        ],
        check=True,
        cwd=ROOT,
    )
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (fd,) = fds.file
    # protoc adds json_name to descriptor sets but not to the embedded descriptor.
    for msg in _all_messages(fd.message_type):
        for f in msg.field:
            f.ClearField("json_name")
    return fd


def _all_messages(messages):
    for msg in messages:
        yield msg
        yield from _all_messages(msg.nested_type)


def test_stubs_match_proto(tmp_path: Path) -> None:
    fresh = _compile_descriptor(tmp_path)
    committed = descriptor_pb2.FileDescriptorProto.FromString(inference_pb2.DESCRIPTOR.serialized_pb)
    assert fresh == committed, "stubs drifted from proto/inference.proto: run `make proto`"


def test_grpc_stub_has_every_rpc() -> None:
    service = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    methods = {m.name for m in service.methods}
    servicer = {
        n for n in vars(inference_pb2_grpc.GRPCInferenceServiceServicer) if not n.startswith("_")
    }
    assert methods == servicer


# Field numbers of the public KServe Open Inference Protocol v2 spec.
SPEC = {
    "ModelInferRequest": {
        "model_name": 1, "model_version": 2, "id": 3, "parameters": 4,
        "inputs": 5, "outputs": 6, "raw_input_contents": 7,
    },
    "ModelInferResponse": {
        "model_name": 1, "model_version": 2, "id": 3, "parameters": 4,
        "outputs": 5, "raw_output_contents": 6,
    },
    "ModelInferRequest.InferInputTensor": {
        "name": 1, "datatype": 2, "shape": 3, "parameters": 4, "contents": 5,
    },
    "ModelInferResponse.InferOutputTensor": {
        "name": 1, "datatype": 2, "shape": 3, "parameters": 4, "contents": 5,
    },
    "ModelInferRequest.InferRequestedOutputTensor": {"name": 1, "parameters": 2},
    "InferParameter": {
        "bool_param": 1, "int64_param": 2, "string_param": 3, "double_param": 4, "uint64_param": 5,
    },
    "InferTensorContents": {
        "bool_contents": 1, "int_contents": 2, "int64_contents": 3, "uint_contents": 4,
        "uint64_contents": 5, "fp32_contents": 6, "fp64_contents": 7, "bytes_contents": 8,
    },
    "ModelMetadataResponse": {"name": 1, "versions": 2, "platform": 3, "inputs": 4, "outputs": 5},
    "ModelMetadataResponse.TensorMetadata": {"name": 1, "datatype": 2, "shape": 3},
    "ServerMetadataResponse": {"name": 1, "version": 2, "extensions": 3},
    "ModelReadyRequest": {"name": 1, "version": 2},
    "ModelMetadataRequest": {"name": 1, "version": 2},
    "ServerLiveResponse": {"live": 1},
    "ServerReadyResponse": {"ready": 1},
    "ModelReadyResponse": {"ready": 1},
}


@pytest.mark.parametrize("message", sorted(SPEC))
def test_field_numbers_follow_spec(message: str) -> None:
    desc = inference_pb2.DESCRIPTOR
    parts = message.split(".")
    msg = desc.message_types_by_name[parts[0]]
    for nested in parts[1:]:
        msg = msg.nested_types_by_name[nested]
    assert {f.name: f.number for f in msg.fields} == SPEC[message]


def test_service_and_package_names() -> None:
    assert inference_pb2.DESCRIPTOR.package == "inference"
    service = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert [m.name for m in service.methods] == [
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
    ]
