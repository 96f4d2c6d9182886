"""Interop: Triton's ``tritonclient[grpc]`` calls the Ray Serve cloud tier.

tritonclient[grpc] needs protobuf<7 and splitgate protobuf>=7.35, so it lives
in its own pinned virtualenv, ``.venv/triton``, made by the install step
(``make test`` or ``make triton-env``; ``SPLITGATE_TRITON_VENV`` overrides the
path), never at test time. It runs as a subprocess against the session tier:
ServerLive, ServerReady, ModelMetadata (full model and a partition), and ModelInfer of a split suffix
with ``splitgate.partition`` in the request parameters. No Serve
``application`` metadata is sent: with one app, Ray 2.60 routes without it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("SPLITGATE_TRITON_VENV", REPO / ".venv" / "triton"))
PY = VENV / "bin" / "python"

CLIENT = r'''
import json, sys
import numpy as np
import tritonclient.grpc as tc

args = json.loads(sys.argv[1])
out = {}
for address in args["addresses"]:
    client = tc.InferenceServerClient(url=address)
    res = {"live": client.is_server_live(), "ready": client.is_server_ready()}
    meta = client.get_model_metadata(args["model"], as_json=True)
    res["inputs"] = [i["name"] for i in meta["inputs"]]
    pmeta = client.get_model_metadata(args["model"], model_version=args["partition"], as_json=True)
    res["partition_inputs"] = [i["name"] for i in pmeta["inputs"]]
    x = np.load(args["x"])
    inp = tc.InferInput(args["input"], list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(args["model"], [inp], parameters={"splitgate.partition": args["partition"]})
    response = result.get_response(as_json=True)
    name = response["outputs"][0]["name"]
    np.save(args["y"] + address.replace(":", "_") + ".npy", result.as_numpy(name))
    res["output"] = name
    res["params"] = sorted(response.get("parameters", {}))
    client.close()
    out[address] = res
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def triton_python() -> Path:
    """The pinned tritonclient virtualenv's python; skips (before the tier starts) when it was never made."""
    if not PY.exists():
        pytest.skip(f"no tritonclient virtualenv at {VENV}: `make triton-env` makes it (`make test` does too)")
    return PY


def test_tritonclient_calls_the_cloud_tier(triton_python: Path, cloud_tier, zoo_bundle, tmp_path) -> None:
    cuts = [p for p in zoo_bundle.partitions.values() if p.kind == "split"]
    part = cuts[len(cuts) // 2]
    (spec,) = part.cut_tensors
    x = np.random.default_rng(3).standard_normal([2, *spec.shape[1:]]).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    addresses = [cloud_tier.address, *cloud_tier.endpoints[:1]]  # proxy and a replica's own port
    args = {
        "addresses": addresses,
        "model": zoo_bundle.model_name,
        "partition": part.id,
        "input": spec.name,
        "x": str(tmp_path / "x.npy"),
        "y": str(tmp_path / "y_"),
    }
    proc = subprocess.run(
        [str(triton_python), "-c", CLIENT, json.dumps(args)], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    session = ort.InferenceSession(str(part.suffix_path), providers=["CPUExecutionProvider"])
    (want,) = session.run(None, {spec.name: x})
    assert len(addresses) == 2, "the tier publishes a direct-ingress endpoint"
    for address in addresses:
        res = report[address]
        assert res["live"] and res["ready"]
        assert res["inputs"] == [t.name for t in zoo_bundle.inputs]
        assert res["partition_inputs"] == [spec.name]
        assert "splitgate.cloud_ms" in res["params"] and "splitgate.queue_depth" in res["params"]
        got = np.load(tmp_path / f"y_{address.replace(':', '_')}.npy")
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
