"""The seeded torch model zoo: exports load in onnxruntime, keep a dynamic batch, split exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from _models import check_cuts, session

pytest.importorskip("torch")

from splitgate.planner import ModelGraph, build_bundle, chain_cuts  # noqa: E402
from splitgate.planner.zoo import ZOO_MODELS, export_zoo_model  # noqa: E402
from splitgate.errors import InvalidArgument  # noqa: E402


def _images(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 64, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("zoo")
    for name in ZOO_MODELS:
        export_zoo_model(name, d / f"{name}.onnx")
    return d


def test_zoo_names() -> None:
    assert {"mobilenet", "resnet18", "vggchain"} <= set(ZOO_MODELS)
    with pytest.raises(InvalidArgument, match="unknown zoo model"):
        export_zoo_model("gpt5", "/tmp/never.onnx")


@pytest.mark.parametrize("name", ["mobilenet", "resnet18", "vggchain"])
def test_export_runs_with_dynamic_batch(zoo_dir: Path, name: str) -> None:
    path = zoo_dir / f"{name}.onnx"
    g = ModelGraph.load(path)
    assert g.inputs[0].name == "input" and g.inputs[0].shape == [-1, 3, 64, 64]
    assert g.outputs[0].name == "logits" and g.outputs[0].shape == [-1, 10]
    sess = session(path)
    one = sess.run(None, {"input": _images(1)})[0]
    three = sess.run(None, {"input": _images(3)})[0]
    assert one.shape == (1, 10) and three.shape == (3, 10)
    np.testing.assert_allclose(three[:1], one, rtol=1e-4, atol=1e-5)
    assert three.std() > 1e-3, "outputs should not be degenerate"
    assert np.abs(three[0] - three[1]).max() > 1e-3, "different images give different logits"
    assert chain_cuts(g), f"{name} should have chain cuts"


def test_seed_is_deterministic(tmp_path: Path, zoo_dir: Path) -> None:
    again = export_zoo_model("vggchain", tmp_path / "v.onnx")
    other = export_zoo_model("vggchain", tmp_path / "w.onnx", seed=1)
    x = {"input": _images(2)}
    base = session(zoo_dir / "vggchain.onnx").run(None, x)[0]
    np.testing.assert_array_equal(session(again).run(None, x)[0], base)
    assert not np.allclose(session(other).run(None, x)[0], base)


def test_fixed_batch_export(tmp_path: Path) -> None:
    path = export_zoo_model("vggchain", tmp_path / "fixed.onnx", batch_dynamic=False)
    dim0 = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_value == 1


@pytest.mark.slow
def test_dynamo_exporter(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    path = export_zoo_model("vggchain", tmp_path / "dynamo.onnx", exporter="dynamo")
    g = ModelGraph.load(path)
    assert g.inputs[0].shape == [-1, 3, 64, 64]
    out = session(path).run(None, {"input": _images(3)})[0]
    assert out.shape == (3, 10)


def test_mobilenet_every_cut_is_exact_at_batch_1_and_3(zoo_dir: Path) -> None:
    g = ModelGraph.load(zoo_dir / "mobilenet.onnx")
    cuts = chain_cuts(g)
    # inverted residual blocks with a skip are atomic; cuts sit between blocks and layers
    assert len(cuts) >= 17
    feeds = [{"input": _images(1, seed=1)}, {"input": _images(3, seed=2)}]
    assert check_cuts(g, cuts, feeds) == 2 * len(cuts)


def test_resnet18_bundle(zoo_dir: Path, tmp_path: Path) -> None:
    bundle = build_bundle(zoo_dir / "resnet18.onnx", tmp_path / "bundle")
    splits = [p for p in bundle.partitions.values() if p.kind == "split"]
    assert splits and all(p.cut_tensors[0].shape[0] == -1 for p in splits)
    x = _images(3)
    want = session(bundle.model_path).run(None, {"input": x})[0]
    part = splits[len(splits) // 2]
    (mid,) = session(part.prefix_path).run(None, {"input": x})
    got = session(part.suffix_path).run(None, {part.cut_tensors[0].name: mid})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_mobilenet_default_bundle_has_profile_and_middle_splits(zoo_bundle) -> None:
    splits = [p for p in zoo_bundle.partitions.values() if p.kind == "split"]
    assert len(splits) >= 3  # reference chain cuts stay, whatever wins
    assert zoo_bundle.has_profile and {"device", "cloud"} <= set(zoo_bundle.candidates)
    assert zoo_bundle.manifest["planner"]["candidates"] == "optimal"
    from splitgate.planner import Conditions

    assert zoo_bundle.choose(Conditions(uplink_mbps=5.85, rtt_ms=50)) in zoo_bundle.candidates
