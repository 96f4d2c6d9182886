"""Quantized device prefixes (``cut-K~int8``, ``device~int8``): built with onnxruntime's
quantization tools, guarded against the fp32 full model, recorded in the manifest and
profile, chosen jointly with the cut and the wire encoding, and run through a real
Gateway and a real cloud tier (grpcio + the same SuffixService + onnxruntime)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from _models import IR_VERSION, OPSET, save, session
from onnx import TensorProto, helper, numpy_helper
from splitgate.planner import (
    Conditions,
    Constraints,
    PlanBundle,
    build_bundle,
    load_bundle,
)
from splitgate.planner._accuracy import Guard, check, compare_outputs
from splitgate.planner._encoding import split_id
from splitgate.planner._quantize import (
    candidate_parts,
    quantization_method,
    quantized_id,
)

FAST = {"repeats": 3, "warmup": 1}
CALIBRATION = 24


def test_candidate_ids() -> None:
    assert quantized_id("cut-9") == "cut-9~int8" and quantized_id("cut-9", "fp32") == "cut-9"
    assert candidate_parts("cut-9~int8@fp16") == ("cut-9", "int8", "fp16")
    assert candidate_parts("device~int8") == ("device", "int8", "raw")
    assert candidate_parts("cloud@int8") == ("cloud", "fp32", "int8")
    assert candidate_parts("dag-2") == ("dag-2", "fp32", "raw")
    assert split_id("cut-9~int8@fp16") == ("cut-9~int8", "fp16"), "the encoded twin's raw twin is the int8 one"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """The trained small resnet18 (gratings10) and held-out calibration images."""
    pytest.importorskip("torch")
    from splitgate.planner.zoo import calibration_inputs, export_zoo_model

    model = export_zoo_model("resnet18", tmp_path_factory.mktemp("q") / "resnet18.onnx", trained=True)
    return model, calibration_inputs(CALIBRATION)["input"]


@pytest.fixture(scope="module")
def bundle(trained: tuple[Path, np.ndarray]) -> PlanBundle:
    """Planned with int8 twins, for a device 20x slower than here with 1.5 MB for the prefix:
    the fp32 full model (2.9 MB) does not fit, its int8 twin (0.9 MB) does."""
    model, images = trained
    return build_bundle(model, model.parent / "r18q.bundle", quantize=True, device_slowdown=20.0,
                        constraints=Constraints(device_memory_mb=1.5), calibration={"input": images}, **FAST)


def test_int8_twins_pass_the_guard_and_are_recorded(bundle: PlanBundle) -> None:
    b = load_bundle(bundle.root)  # verifies every file and the digest
    quant = b.profile["quantization"]
    assert quant["method"] == "static" and quant["calibration"]["source"] == "arrays"
    assert any(f"on {CALIBRATION} calibration samples" in n for n in b.profile["notes"]), "too few to claim 99%"
    refs = [p.id for p in b.partitions.values() if p.kind == "split" and b.plan_profile.partitions[p.id].reference
            and candidate_parts(p.id)[1] == "fp32"]
    assert len(refs) == 3, list(b.partitions)
    for pid in [*refs, "device"]:
        twin = quantized_id(pid)
        r = quant["measured"][twin]
        assert r["dropped"] is None and twin in b.partitions, (twin, r)
        assert r["accuracy"]["logits"]["top1_agreement"] >= 0.99
        assert 0 < r["int8_bytes"] < r["fp32_bytes"]
        assert r["int8_ms"] > 0 and r["fp32_ms"] > 0
    # profile entries: the int8 twin's own measured time, the fp32 cut's bytes, less device memory
    prof = b.plan_profile.partitions
    for pid in refs:
        fp32, int8 = prof[pid], prof[quantized_id(pid)]
        assert int8.precision == "int8" and fp32.precision is None
        assert int8.tensors == fp32.tensors and int8.up_bytes == fp32.up_bytes
        assert int8.device_mem_bytes < fp32.device_mem_bytes
        assert int8.device_timing is not None and int8.device_timing != fp32.device_timing
    assert prof["device~int8"].device_mem_bytes < 1.5e6 < prof["device"].device_mem_bytes
    assert b.plan_profile.excluded and "device" in b.plan_profile.excluded
    # an int8 prefix's encoded twins are guarded against the fp32 full model, not the int8 prefix's
    # raw answers: their worst cosine carries the quantization error (fp16 alone adds ~1e-7)
    for pid in refs:
        q_cos = quant["measured"][quantized_id(pid)]["accuracy"]["logits"]["cosine_min"]
        enc_cos = b.profile["encodings"]["measured"][f"{quantized_id(pid)}@fp16"]["accuracy"]["logits"]["cosine_min"]
        assert q_cos < 1 - 1e-5 and 1 - enc_cos > 0.5 * (1 - q_cos), (pid, q_cos, enc_cos)
    # estimate errors compare per-node sums of the fp32 model with fp32 sessions only
    rows = b.profile["estimate_error"]["device"]["partitions"]
    assert rows and not any("~" in r["id"] for r in rows)


def test_manifest_records_precision_and_encoding(bundle: PlanBundle) -> None:
    manifest = json.loads((bundle.root / "manifest.json").read_text())
    assert manifest["planner"]["quantize"] is True
    for entry in manifest["partitions"]:
        base, precision, encoding = candidate_parts(entry["id"])
        assert entry["encoding"] == encoding, entry["id"]
        assert entry["prefix_precision"] == (None if entry["kind"] == "cloud" else precision), entry["id"]
    parts = bundle.partitions
    for pid, p in parts.items():
        base, precision, encoding = candidate_parts(pid)
        assert p.prefix_precision == (None if p.kind == "cloud" else precision)
        if precision == "int8" and p.kind == "split":
            own = quantized_id(base)
            assert p.prefix_path == bundle.root / "partitions" / own / "prefix.onnx"
            assert p.suffix_path == bundle.root / "partitions" / base / "suffix.onnx", "shares the fp32 suffix"
            assert p.device_nodes == parts[base].device_nodes if base in parts else p.device_nodes > 0
    assert parts["device~int8"].prefix_path == bundle.root / "partitions" / "device~int8" / "prefix.onnx"
    assert parts["device~int8"].suffix_path is None and parts["device"].prefix_path == bundle.model_path
    files = manifest["files"]
    assert not any(f.startswith("partitions/") and "~int8" in f and f.endswith("suffix.onnx") for f in files)
    assert not any("@" in f for f in files), "encoded twins have no files of their own"


def test_choice_is_joint_over_precision(bundle: PlanBundle) -> None:
    """The fp32 model does not fit the device's memory: offline (a link too slow to send
    even 1 KB in time) the plan answers with the int8 full model."""
    assert "device~int8" in bundle.candidates
    assert bundle.choose(Conditions(uplink_mbps=0.05, rtt_ms=300.0)) == "device~int8"
    assert bundle.estimate("device~int8", Conditions(uplink_mbps=1.0)).latency_ms > 0
    assert bundle.offline_partition() == "device~int8", "what to run without the cloud"


def test_gateway_without_a_cloud_runs_the_int8_model(bundle: PlanBundle, trained: tuple[Path, np.ndarray]) -> None:
    """Offline (no cloud address, and with the breaker open) the Gateway runs the plan's
    offline partition: the int8 full model, the only one that fits the device's memory."""
    from splitgate.edge import Gateway

    _, images = trained
    with Gateway([bundle]) as gw:
        result = gw.infer(bundle.model_name, {"input": images[:1]})
    assert result.trace.partition == "device~int8"
    with Gateway([bundle], cloud="127.0.0.1:9", breaker_failures=1, breaker_reset_s=60.0) as gw:
        gw._core.breaker.record_failure()  # noqa: SLF001 - open it without waiting for a dead address
        result = gw.infer(bundle.model_name, {"input": images[:1]}, partition="cloud")
    assert (result.trace.partition, result.trace.fallback) == ("device~int8", "breaker-open")


def test_plans_without_quantize_are_unchanged(trained: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    model, _ = trained
    b = build_bundle(model, tmp_path / "plain", profile=False)
    manifest = json.loads((b.root / "manifest.json").read_text())
    assert "quantize" not in manifest["planner"]
    assert not any("prefix_precision" in e or "~" in e["id"] for e in manifest["partitions"])
    assert {p.prefix_precision for p in b.partitions.values() if p.kind != "cloud"} == {"fp32"}
    assert b.offline_partition() == "device"


def _wide_range_model() -> object:
    """A tiny conv net whose one activation tensor holds a channel 10^5 times larger than the
    other, and whose class is decided by the small one: per-tensor int8 ranges erase it."""
    w = np.zeros((2, 2, 1, 1), np.float32)
    w[0, 0], w[1, 1] = 1000.0, 0.01
    fc = np.array([[0.0, 0.0, 1e-6, 0.0], [100.0, -100.0, 0.0, 0.0]], np.float32)  # [2 features, 4 classes]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"]),
        helper.make_node("Conv", ["h", "w2"], ["h2"]),
        helper.make_node("GlobalAveragePool", ["h2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["logits"]),
    ]
    w2 = np.eye(2, dtype=np.float32).reshape(2, 2, 1, 1)
    graph = helper.make_graph(
        nodes, "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(fc, "fc")],
    )
    return helper.make_model(graph, opset_imports=OPSET, ir_version=IR_VERSION)


def test_guard_refuses_an_activation_that_quantizes_badly(tmp_path: Path) -> None:
    model = save(_wide_range_model(), tmp_path / "wide.onnx")
    x = np.random.default_rng(0).standard_normal((32, 2, 4, 4)).astype(np.float32)
    assert quantization_method(onnx.load(model)) == "static"
    b = build_bundle(model, tmp_path / "wide", quantize=True, calibration={"x": x}, **FAST)
    quant = b.profile["quantization"]
    assert quant["dropped"], quant
    for pid, reason in quant["dropped"].items():
        assert "top-1 agreement" in reason, (pid, reason)
        assert quant["measured"][pid]["accuracy"]["logits"]["top1_agreement"] < 0.99
        assert pid not in b.partitions
    assert "device~int8" in quant["dropped"]
    assert not any("~" in pid for pid in b.partitions)
    # the fp32 model itself is fine: its own sessions agree exactly
    want = session(b.model_path).run(None, {"x": x})[0]
    assert len(set(want.argmax(axis=1))) > 1, "the test model must not be constant"


@pytest.fixture(scope="module")
def tier(bundle: PlanBundle) -> Iterator[str]:
    """A real cloud tier for the bundle: grpcio + the cloud's SuffixService + onnxruntime."""
    from splitgate.cloud.baseline import start_baseline

    server = start_baseline([str(bundle.root)])
    try:
        yield server.address
    finally:
        server.stop()


def test_gateway_runs_int8_twins_within_the_guard(bundle: PlanBundle, trained: tuple[Path, np.ndarray],
                                                  tier: str) -> None:
    """Every int8 twin (splits and their encoded twins through the cloud, device~int8 on the
    device) answers the calibration images through a real Gateway as the guard measured:
    top-1 agreement with the fp32 full model at or above the guard."""
    from splitgate.edge import Gateway

    _, images = trained
    fp32 = session(bundle.model_path)
    want = [{"logits": fp32.run(None, {"input": images[i:i + 1]})[0]} for i in range(len(images))]
    guard = Guard(**bundle.profile["quantization"]["guard"])
    int8 = [pid for pid in bundle.partitions if candidate_parts(pid)[1] == "int8"]
    assert any(bundle.partitions[pid].kind == "split" for pid in int8), int8
    with Gateway([bundle], cloud=tier) as gw:
        for pid in int8:
            part = bundle.partitions[pid]
            got = []
            for i in range(len(images)):
                result = gw.infer(bundle.model_name, {"input": images[i:i + 1]}, partition=pid)
                assert result.trace.partition == pid and not result.trace.fallback, (pid, result.trace)
                assert (result.trace.bytes_sent > 0) == (part.kind == "split"), (pid, result.trace)
                got.append({"logits": result.outputs["logits"]})
            metrics = compare_outputs(want, got)
            assert check(metrics, guard) is None, (pid, metrics)
            assert metrics["logits"]["cosine_min"] < 1.0, f"{pid} ran the fp32 prefix"


def test_models_without_convolutions_get_dynamic_int8() -> None:
    """A MatMul model (no Conv): dynamic int8 (weights int8, activations per request), no calibration."""
    from splitgate.planner._accuracy import Calibration
    from splitgate.planner._quantize import PrefixQuantizer

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((256, 64)) / 16).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=IR_VERSION)
    assert quantization_method(model) == "dynamic"
    requests = [{"x": rng.standard_normal((4, 256)).astype(np.float32)} for _ in range(4)]
    guard = Guard(min_cosine=0.99, output_kind="other")
    with PrefixQuantizer(model, Calibration(requests, "arrays", 16), guard) as q:
        int8, result = q.quantize("device", None, None)
        assert q.calibration_s == 0.0, "dynamic int8 needs no calibration pass"
    assert int8 is not None and result.method == "dynamic" and result.dropped is None, result
    assert result.int8_bytes < result.fp32_bytes / 2
    assert {n.op_type for n in int8.graph.node} & {"MatMulInteger", "DynamicQuantizeLinear"}
    assert 0.99 <= result.accuracy["y"]["cosine_min"] < 1.0


def test_a_model_below_opset_13_gets_per_tensor_int8_that_loads(tmp_path: Path) -> None:
    """Per-channel QDQ needs DequantizeLinear's ``axis`` (opset 13): a conv net exported at
    opset 11, as the YOLOX detector users bring is, gets per-tensor int8 twins that
    onnxruntime can load, instead of every twin dropped as an invalid graph."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((8, 8, 3, 3)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["y"])]
    graph = helper.make_graph(
        nodes, "old_opset", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=IR_VERSION),
                 tmp_path / "old.onnx")
    x = rng.random((16, 3, 16, 16)).astype(np.float32)
    b = build_bundle(model, tmp_path / "old", quantize=True, calibration={"x": x}, **FAST)
    quant = b.profile["quantization"]
    assert quant["per_channel"] is False
    measured = quant["measured"]
    assert measured and not any("invalid" in (m.get("dropped") or "").lower() for m in measured.values()), measured
    assert any(m["int8_bytes"] > 0 and m["accuracy"] for m in measured.values()), measured


def _token_classifier(path: Path) -> Path:
    """Integer tokens -> one-hot over a 16-symbol vocabulary -> MatMul -> logits: a
    byte/token classifier in miniature (dynamic batch, INT64 input)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8 * 16, 5)).astype(np.float32), "w")
    depth = numpy_helper.from_array(np.array(16, dtype=np.int64), "depth")
    values = numpy_helper.from_array(np.array([0.0, 1.0], dtype=np.float32), "values")
    flat = numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "flat")
    nodes = [
        helper.make_node("OneHot", ["tokens", "depth", "values"], ["hot"], axis=-1),
        helper.make_node("Reshape", ["hot", "flat"], ["rows"]),
        helper.make_node("MatMul", ["rows", "w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tokens", [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["n", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 5])], [w, depth, values, flat])
    return save(helper.make_model(graph, opset_imports=OPSET, ir_version=IR_VERSION),
                path)


def test_quantize_or_cascade_on_integer_inputs_needs_real_calibration(tmp_path: Path) -> None:
    """Generated integer inputs are all 1: the guard would compare one request with
    itself. --quantize / --cascade int8 are refused before any measuring, with the fix;
    with real calibration inputs they plan."""
    from splitgate.errors import InvalidArgument

    model = _token_classifier(tmp_path / "tokens.onnx")
    for options in ({"quantize": True}, {"cascade": "int8"}):
        with pytest.raises(InvalidArgument, match=r"integer inputs \(tokens \(INT64\)\).*--calibration"):
            build_bundle(model, tmp_path / "refused", input_shapes={"tokens": [(4, 8)]}, **options, **FAST)
    tokens = np.random.default_rng(1).integers(0, 16, size=(CALIBRATION, 8), dtype=np.int64)
    b = build_bundle(model, tmp_path / "planned", input_shapes={"tokens": [(4, 8)]}, quantize=True,
                     calibration={"tokens": tokens}, **FAST)
    assert b.profile["quantization"]["calibration"]["source"] != "random"


def test_generated_integer_inputs_are_noted_for_the_wire_encodings_guard(tmp_path: Path) -> None:
    model = _token_classifier(tmp_path / "tokens.onnx")
    b = build_bundle(model, tmp_path / "gen", input_shapes={"tokens": [(4, 8)]}, **FAST)
    assert any("integer inputs (tokens (INT64)) are all 1" in n for n in b.plan_profile.notes), b.plan_profile.notes
    tokens = np.random.default_rng(1).integers(0, 16, size=(CALIBRATION, 8), dtype=np.int64)
    b = build_bundle(model, tmp_path / "real", input_shapes={"tokens": [(4, 8)]}, calibration={"tokens": tokens},
                     **FAST)
    assert not any("are all 1" in n for n in b.plan_profile.notes), b.plan_profile.notes
