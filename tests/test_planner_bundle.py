"""Plan bundles: build, load, verify, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _models import dynamic_batch_model, light_model, save, session, two_io_model

from splitgate.planner import Partition, PlanBundle, TensorSpec, build_bundle, load_bundle
from splitgate.planner._bundle import plan_digest
from splitgate.errors import BundleError, InvalidArgument, NotFound


@pytest.fixture(scope="module")
def dyn_bundle(tmp_path_factory: pytest.TempPathFactory) -> PlanBundle:
    d = tmp_path_factory.mktemp("dyn")
    model = save(dynamic_batch_model(), d / "dynconv.onnx")
    # Foundation layout: every chain cut, no measurement (deterministic)
    return build_bundle(model, d / "bundle", candidates="chain", profile=False)


def test_layout_and_manifest(dyn_bundle: PlanBundle) -> None:
    root = dyn_bundle.root
    m = json.loads((root / "manifest.json").read_text())
    assert set(m) == {
        "schema_version", "model_name", "model_sha256", "opset", "inputs", "outputs",
        "partitions", "files", "plan_digest", "planner", "profile", "decision_table",
        "shapes", "sample",
    }
    assert m["profile"] is None and m["decision_table"] is None and not dyn_bundle.has_profile
    assert m["planner"] == {"candidates": "chain", "reference_cuts": 3}
    assert m["schema_version"] == 2 and m["model_name"] == "dynconv" and m["opset"] == 17
    assert m["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 2, 8, 8]}]
    assert m["plan_digest"] == plan_digest(m)
    assert m["shapes"] == [{"x": [1, 2, 8, 8]}] and m["sample"] == {"x": "sample/0.npy"}
    assert set(m["files"]) == {"model.onnx", "sample/0.npy"} | {
        f"partitions/cut-{i}/{part}.onnx" for i in range(1, 7) for part in ("prefix", "suffix")
    }
    for rel in m["files"]:
        assert (root / rel).is_file()
    assert not any(p.name.startswith(".") for p in root.parent.iterdir()), "temp dirs left behind"


def test_partitions(dyn_bundle: PlanBundle) -> None:
    ids = list(dyn_bundle.partitions)
    assert ids == ["cloud"] + [f"cut-{i}" for i in range(1, 7)] + ["device"]
    cloud, device = dyn_bundle.partition("cloud"), dyn_bundle.partition("device")
    assert cloud == Partition(
        "cloud", "cloud", 0, 10, [TensorSpec("x", "FP32", [-1, 2, 8, 8])], None, dyn_bundle.model_path, 2 * 64 * 4
    )
    assert device.prefix_path == dyn_bundle.model_path and device.suffix_path is None
    assert device.cut_tensors == [] and device.device_nodes == device.total_nodes == 10
    cut = dyn_bundle.partition("cut-3")
    assert cut.kind == "split" and cut.device_nodes == 3
    assert cut.cut_tensors == [TensorSpec("p1", "FP32", [-1, 4, 4, 4])]
    assert cut.cut_bytes == 4 * 4 * 4 * 4
    assert cut.prefix_path == dyn_bundle.root / "partitions/cut-3/prefix.onnx"
    sizes = [p.device_nodes for p in dyn_bundle.partitions.values()]
    assert sizes == sorted(sizes)


def test_split_runs_from_bundle_files(dyn_bundle: PlanBundle) -> None:
    full = session(dyn_bundle.model_path)
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 2, 8, 8)).astype(np.float32)
        want = full.run(None, {"x": x})[0]
        for part in dyn_bundle.partitions.values():
            if part.kind != "split":
                continue
            (mid,) = session(part.prefix_path).run(None, {"x": x})
            got = session(part.suffix_path).run(None, {part.cut_tensors[0].name: mid})[0]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=part.id)


def test_unknown_partition_lists_valid_ones(dyn_bundle: PlanBundle) -> None:
    with pytest.raises(NotFound, match="cut-99") as info:
        dyn_bundle.partition("cut-99")
    assert "cloud" in str(info.value) and "cut-1" in str(info.value) and "device" in str(info.value)


def test_round_trip_and_determinism(tmp_path: Path) -> None:
    model = light_model("squeezenet")
    seen: list[str] = []
    kw = {"candidates": "chain", "profile": False}
    a = build_bundle(model, tmp_path / "a", model_name="squeeze", progress=lambda s, d, t: seen.append(s), **kw)
    b = build_bundle(model, tmp_path / "b", model_name="squeeze", **kw)
    assert a.plan_digest == b.plan_digest
    assert a.manifest == b.manifest
    assert {"load model", "find cuts", "extract partitions", "write bundle"} <= set(seen)
    c = load_bundle(tmp_path / "a")
    assert c.manifest == a.manifest and c.model_name == "squeeze"
    assert c.inputs == [TensorSpec("data_0", "FP32", [1, 3, 224, 224])]
    assert len(c.partitions) == 33 + 2
    # rebuilding over an existing bundle replaces it, same digest
    d = build_bundle(model, tmp_path / "a", model_name="squeeze", **kw)
    assert d.plan_digest == a.plan_digest


def test_tampered_file_is_named(tmp_path: Path) -> None:
    model = save(two_io_model(), tmp_path / "two.onnx")
    bundle = build_bundle(model, tmp_path / "bundle")
    suffix = bundle.partition("cut-1").suffix_path
    data = bytearray(suffix.read_bytes())
    data[-1] ^= 0xFF
    suffix.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="partitions/cut-1/suffix.onnx"):
        PlanBundle.load(bundle.root)
    suffix.unlink()
    with pytest.raises(BundleError, match="partitions/cut-1/suffix.onnx"):
        PlanBundle.load(bundle.root)


def test_edited_manifest_is_refused(tmp_path: Path) -> None:
    bundle = build_bundle(save(two_io_model(), tmp_path / "two.onnx"), tmp_path / "bundle")
    path = bundle.root / "manifest.json"
    m = json.loads(path.read_text())
    m["model_name"] = "other"
    path.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="plan_digest"):
        PlanBundle.load(bundle.root)
    path.unlink()
    with pytest.raises(BundleError, match="manifest.json"):
        PlanBundle.load(bundle.root)


def test_two_io_bundle_specs(tmp_path: Path) -> None:
    bundle = build_bundle(save(two_io_model(), tmp_path / "two.onnx"), tmp_path / "bundle", candidates="chain", profile=False)
    assert bundle.inputs == [TensorSpec("x", "FP32", [-1, 3]), TensorSpec("ids", "INT64", [-1, 2])]
    assert bundle.outputs == [TensorSpec("logits", "FP32", [-1, 5]), TensorSpec("score", "FP32", [-1])]
    assert bundle.partition("cloud").cut_tensors == bundle.inputs
    assert bundle.partition("cloud").cut_bytes == 3 * 4 + 2 * 8
    assert [p.cut_tensors[0].name for p in bundle.partitions.values() if p.kind == "split"] == ["h", "t"]


def test_refuses_to_clobber_other_directories(tmp_path: Path) -> None:
    out = tmp_path / "notabundle"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(InvalidArgument, match="refusing"):
        build_bundle(save(two_io_model(), tmp_path / "two.onnx"), out)
    assert (out / "precious.txt").read_text() == "keep me"
    with pytest.raises(InvalidArgument, match="not found"):
        build_bundle(tmp_path / "missing.onnx", tmp_path / "b")
