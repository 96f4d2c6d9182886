"""Users' kinds of models, end to end as a user runs them: exported with dynamic
axes, planned with ``splitgate plan --input-shape`` (or ``--sample``), served by
``splitgate cloud serve`` (a real local Ray Serve tier) and ``splitgate edge
serve``, and called through the edge with a plain OIP gRPC client. Every
partition must equal the original model (onnxruntime) at the planned shape and
at two other valid shapes, and the ``cloud`` partition must upload exactly the
request's input bytes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from splitgate.planner import PlanBundle
from splitgate import codec
from splitgate.protocol import inference_pb2 as pb
from splitgate.protocol import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration
pytest.importorskip("torch")
pytest.importorskip("ray")
from splitgate.planner.zoo import DYNAMIC_MODELS, export_zoo_model  # noqa: E402

MODELS = ["detector_dyn", "crnn_dyn", "transformer_dyn", "gru_state", "if_value"]
SPLITGATE = [sys.executable, "-m", "splitgate"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plan_args(name: str, model: Path, out: Path, workdir: Path) -> list[str]:
    case = DYNAMIC_MODELS[name]
    args = [*SPLITGATE, "plan", str(model), "-o", str(out), "--repeats", "2", "--encodings", "raw,zstd"]
    if name == "if_value":  # its inputs must hold sensible values: real samples
        return [*args, "--sample", str(case.write_samples(case.planned[0], workdir / f"{name}.npz"))]
    for shapes in case.planned:
        args += [a for k, v in shapes.items() if v for a in ("--input-shape", f"{k}={'x'.join(map(str, v))}")]
    return args


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, PlanBundle]]:
    root = tmp_path_factory.mktemp("dynserve")
    out: dict[str, tuple[Path, PlanBundle]] = {}
    for name in MODELS:
        model = export_zoo_model(name, root / f"{name}.onnx")
        proc = subprocess.run(_plan_args(name, model, root / f"{name}.bundle", root),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"plan {name}: {proc.stderr[-2000:]}"
        out[name] = (model, PlanBundle.load(root / f"{name}.bundle"))
    return out


def _wait_ready(address: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")  # type: ignore[union-attr]
        try:
            with grpc.insecure_channel(address) as ch:
                if pb_grpc.GRPCInferenceServiceStub(ch).ServerReady(pb.ServerReadyRequest(), timeout=2).ready:
                    return
        except grpc.RpcError as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"{address} not ready after {timeout_s:.0f}s: {last}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def edge(planned: dict[str, tuple[Path, PlanBundle]]) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    bundles = [str(b.root) for _, b in planned.values()]
    cloud_port, edge_port = _free_port(), _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cloud = subprocess.Popen([*SPLITGATE, "cloud", "serve", *bundles, "--port", str(cloud_port), "--insecure"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    procs = [cloud]
    try:
        _wait_ready(f"127.0.0.1:{cloud_port}", cloud, 240)
        gateway = subprocess.Popen(
            [*SPLITGATE, "edge", "serve", *bundles, "--cloud", f"127.0.0.1:{cloud_port}",
             "--port", str(edge_port), "--insecure", "--deadline-ms", "30000"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        procs.append(gateway)
        _wait_ready(f"127.0.0.1:{edge_port}", gateway, 120)
        with grpc.insecure_channel(f"127.0.0.1:{edge_port}",
                                   options=[("grpc.max_receive_message_length", 256 << 20)]) as channel:
            yield pb_grpc.GRPCInferenceServiceStub(channel)
    finally:
        for p in reversed(procs):
            _stop(p)


def _infer(stub, model: str, feeds: dict[str, np.ndarray], partition: str) -> tuple[dict[str, np.ndarray], dict]:
    request = pb.ModelInferRequest(model_name=model)
    codec.set_params(request.parameters, {"splitgate.partition": partition})
    codec.add_inputs(request, feeds)
    response = stub.ModelInfer(request, timeout=60)
    return codec.read_outputs(response), codec.read_params(response.parameters)


@pytest.mark.parametrize("name", MODELS)
def test_every_partition_through_edge_serve_equals_the_original(name: str, planned, edge) -> None:
    model, bundle = planned[name]
    case = DYNAMIC_MODELS[name]
    original = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in original.get_outputs()]
    for k, shapes in enumerate([case.planned[0], *case.other]):
        feeds = case.make_inputs(shapes, seed=11 + k)
        expected = dict(zip(outputs, original.run(outputs, feeds)))
        for pid, part in bundle.partitions.items():
            got, params = _infer(edge, bundle.model_name, feeds, pid)
            where = f"{name} partition {pid} at {shapes}"
            assert params["splitgate.partition"] == pid, where
            assert params["splitgate.fallback"] == "", f"{where}: fell back ({params['splitgate.fallback']})"
            for out in outputs:
                np.testing.assert_allclose(got[out], expected[out], rtol=1e-4, atol=1e-4, err_msg=where)
            if pid == "cloud":
                assert params["splitgate.bytes_sent"] == sum(a.nbytes for a in feeds.values()), where
            if part.kind != "device":
                assert params["splitgate.cloud_ms"] > 0, f"{where}: the cloud did not run"
