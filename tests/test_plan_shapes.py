"""Planning at the user's shapes: --input-shape, --sample, shape buckets, shape-generic bundles.

The models are the zoo's dynamic-axes exports (planner.zoo.DYNAMIC_MODELS),
generated here; every check runs real onnxruntime sessions.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from splitgate.planner import Conditions, DynamicShapeError, PlanBundle, build_bundle, parse_input_shapes
from splitgate.planner._shapes import load_samples, resolve_shapes
from splitgate.errors import InvalidArgument

pytest.importorskip("torch")
from splitgate.planner.zoo import DYNAMIC_MODELS, export_zoo_model  # noqa: E402

FAST = {"repeats": 2, "warmup": 1, "encodings": ("raw",)}


def _shape_flags(shapes_list: list[dict[str, tuple[int, ...]]]) -> list[str]:
    return [f"{k}={'x'.join(map(str, v))}" for shapes in shapes_list for k, v in shapes.items() if v]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dynzoo")
    return {name: export_zoo_model(name, root / f"{name}.onnx") for name in ("crnn_dyn", "detector_dyn", "if_value")}


@pytest.fixture(scope="module")
def crnn_bundle(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> PlanBundle:
    case = DYNAMIC_MODELS["crnn_dyn"]
    return build_bundle(models["crnn_dyn"], tmp_path_factory.mktemp("b") / "crnn",
                        input_shapes=_shape_flags(case.planned), **FAST)


# -- shapes and their errors ----------------------------------------------------


def test_parse_input_shape_and_its_errors() -> None:
    assert parse_input_shapes(["x=1x3x64x64", "x=1x3x32x32", "n=scalar"]) == {
        "x": [(1, 3, 64, 64), (1, 3, 32, 32)], "n": [()],
    }
    for bad in ("x", "=1x2", "x=1xa", "x=-1x3"):
        with pytest.raises(InvalidArgument, match="--input-shape"):
            parse_input_shapes([bad])


def test_shared_symbols_fill_other_inputs_and_must_agree() -> None:
    declared = {"tokens": ["batch", "seq"], "mask": ["batch", "seq"]}
    types = {"tokens": "INT64", "mask": "INT64"}
    buckets, notes = resolve_shapes(declared, types, {"tokens": [(2, 16), (2, 64)]})
    assert [b.shapes for b in buckets] == [
        {"tokens": (2, 16), "mask": (2, 16)}, {"tokens": (2, 64), "mask": (2, 64)},
    ]
    assert notes == []
    with pytest.raises(InvalidArgument, match="'seq' is 16 in one input and 8"):
        resolve_shapes(declared, types, {"tokens": [(1, 16)], "mask": [(1, 8)]})
    with pytest.raises(InvalidArgument, match="same number"):
        resolve_shapes(declared, types, {"tokens": [(1, 16), (1, 32)], "mask": [(1, 16), (1, 32), (1, 64)]})
    with pytest.raises(InvalidArgument, match="fixed at 3"):
        resolve_shapes({"x": [None, 3, "h", "w"]}, {"x": "FP32"}, {"x": [(1, 4, 8, 8)]})


def test_dynamic_batch_defaults_to_one_and_says_so() -> None:
    buckets, notes = resolve_shapes({"x": ["N", 2048]}, {"x": "INT32"})
    assert buckets[0].shapes == {"x": (1, 2048)}
    assert notes == ["input 'x': dynamic batch dimension N planned at 1"]


def test_dynamic_non_batch_dims_without_sizes_name_each_input_and_the_flag() -> None:
    declared = {"image": ["B", 3, "H", "W"], "scale": [1]}
    with pytest.raises(DynamicShapeError) as err:
        resolve_shapes(declared, {"image": "FP32", "scale": "FP32"})
    msg = str(err.value)
    assert "\n" not in msg
    assert "'image' [B,3,H,W] dims 2 (H), 3 (W)" in msg
    assert "--input-shape image=Dx3xDxD" in msg and "--sample" in msg and "scale" not in msg


def test_samples_stacked_or_as_batch_rows(tmp_path: Path) -> None:
    from splitgate.planner import TensorSpec

    inputs = [TensorSpec("x", "FP32", [-1, 4]), TensorSpec("n", "INT64", [])]
    path = tmp_path / "s.npz"
    np.savez(path, x=np.ones((3, 1, 4), np.float32), n=np.array([2, 4, 6]))
    reqs = load_samples(path, inputs)
    assert len(reqs) == 3 and reqs[1]["x"].shape == (1, 4) and int(reqs[1]["n"]) == 4
    assert isinstance(reqs[1]["n"], np.ndarray) and reqs[1]["n"].shape == ()  # onnxruntime refuses numpy scalars
    rows = load_samples({"x": np.ones((5, 4), np.float32), "n": np.arange(5)}, inputs)
    assert len(rows) == 5 and rows[0]["x"].shape == (1, 4)
    with pytest.raises(InvalidArgument, match="same nonzero number"):
        load_samples({"x": np.ones((5, 4), np.float32), "n": np.arange(3)}, inputs)
    with pytest.raises(InvalidArgument, match="lack"):
        load_samples({"x": np.ones((5, 4), np.float32)}, inputs)


def test_cli_plan_without_shapes_is_one_line_exit_2(models: dict[str, Path], tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "splitgate", "plan", str(models["crnn_dyn"]), "-o", str(tmp_path / "b")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("splitgate: error:"), proc.stderr
    assert "'image'" in lines[0] and "--input-shape image=" in lines[0] and "Traceback" not in proc.stderr


def test_value_sensitive_model_asks_for_samples_then_plans_from_them(models: dict[str, Path], tmp_path: Path) -> None:
    case = DYNAMIC_MODELS["if_value"]
    with pytest.raises(InvalidArgument, match="pass real ones with --sample"):
        build_bundle(models["if_value"], tmp_path / "b", input_shapes=["x=1x256"], **FAST)
    samples = case.write_samples(case.planned[0], tmp_path / "s.npz")
    bundle = build_bundle(models["if_value"], tmp_path / "b", samples=samples, **FAST)
    assert bundle.profile["buckets"][0]["from_sample"] is True
    smoke = bundle.sample_inputs()
    assert int(smoke["n"]) >= 2  # a real sample, not a generated 0 or 1
    ort.InferenceSession(str(bundle.model_path)).run(None, smoke)


# -- shape-generic bundles -----------------------------------------------------


def _run_partition(bundle: PlanBundle, pid: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    part = bundle.partition(pid)
    cut = dict(feeds)
    if part.prefix_path is not None:
        pre = ort.InferenceSession(str(part.prefix_path))
        cut = dict(zip([o.name for o in pre.get_outputs()], pre.run(None, {i.name: feeds[i.name] for i in pre.get_inputs()})))
    if part.suffix_path is None:
        return [cut[o.name] for o in bundle.outputs]
    suf = ort.InferenceSession(str(part.suffix_path))
    return suf.run([o.name for o in bundle.outputs], {i.name: cut[i.name] for i in suf.get_inputs()})


@pytest.mark.parametrize("name", ["crnn_dyn", "detector_dyn"])
def test_every_partition_runs_at_every_shape_and_equals_the_original(
    name: str, models: dict[str, Path], tmp_path: Path
) -> None:
    case = DYNAMIC_MODELS[name]
    bundle = build_bundle(models[name], tmp_path / name, input_shapes=_shape_flags(case.planned[:1]), **FAST)
    original = ort.InferenceSession(str(models[name]))
    splits = [p for p in bundle.partitions.values() if p.kind == "split"]
    assert splits, "the model should have split partitions"
    for shapes in [case.planned[0], *case.other]:
        feeds = case.make_inputs(shapes, seed=3)
        expected = original.run([o.name for o in bundle.outputs], feeds)
        for pid in bundle.partitions:
            got = _run_partition(bundle, pid, feeds)
            for g, e in zip(got, expected):
                np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4, err_msg=f"{pid} at {shapes}")


def test_bundle_models_keep_the_dynamic_dims(crnn_bundle: PlanBundle) -> None:
    import onnx

    full = onnx.load(str(crnn_bundle.model_path), load_external_data=False)
    assert len(full.graph.value_info) == 0
    dims = full.graph.input[0].type.tensor_type.shape.dim
    assert not dims[3].HasField("dim_value")  # the width stays dynamic
    for part in crnn_bundle.partitions.values():
        if part.kind == "split":
            suffix = onnx.load(str(part.suffix_path))
            assert len(suffix.graph.value_info) == 0
            for vi in suffix.graph.input:  # every cut tensor's size follows the width
                assert any(not d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim), part.id


# -- shape buckets ---------------------------------------------------------------


def test_one_profile_and_table_per_bucket(crnn_bundle: PlanBundle) -> None:
    buckets = crnn_bundle.profile["buckets"]
    assert [b["shapes"] for b in buckets] == [{"image": [1, 1, 32, 128]}, {"image": [1, 1, 32, 256]}]
    assert len(crnn_bundle.decision_tables) == 2
    small, large = (b["partitions"] for b in buckets)
    assert large["cloud"]["up_bytes"] == 2 * small["cloud"]["up_bytes"] == 2 * 32 * 128 * 4
    assert large["device"]["device_ms"] > small["device"]["device_ms"]


def test_costs_use_the_requests_own_bytes_and_the_nearest_bucket_scaled(crnn_bundle: PlanBundle) -> None:
    planned = crnn_bundle.costs({"image": (1, 1, 32, 256)})
    assert planned["cloud"]["up_bytes"] == 32 * 256 * 4 and planned["cloud"]["scale"] == 1.0
    assert planned["device"]["bucket"] == 1
    four = crnn_bundle.costs({"image": (1, 1, 32, 1024)})  # 4x the largest bucket
    assert four["cloud"]["up_bytes"] == 4 * planned["cloud"]["up_bytes"]
    assert four["device"]["bucket"] == 1 and four["device"]["scale"] == 4.0
    assert four["device"]["device_ms"] == pytest.approx(4 * planned["device"]["device_ms"])
    for pid, entry in four.items():
        if crnn_bundle.partition(pid).kind == "split":
            assert entry["up_bytes"] == 4 * planned[pid]["up_bytes"], pid
    # the choice for the large request is made on its own figures
    c = Conditions(uplink_mbps=5.0, rtt_ms=20.0)
    assert crnn_bundle.estimate("cloud", c, costs=four).transfer_ms > crnn_bundle.estimate("cloud", c, costs=planned).transfer_ms
    # ... and follows them: the argmin of the given entries (full battery: latency), whatever they say
    best = min(crnn_bundle.candidates, key=lambda pid: crnn_bundle.estimate(pid, c, costs=four).latency_ms)
    assert crnn_bundle.choose(c, costs=four) == best
    slow_device = {pid: {**e, "device_ms": e["device_ms"] * 1e4} for pid, e in four.items()}
    assert crnn_bundle.choose(c, costs=slow_device) == "cloud"
    huge_upload = {pid: {**e, "up_bytes": e["up_bytes"] * 10**6} for pid, e in four.items()}
    assert crnn_bundle.choose(c, costs=huge_upload) == "device"
