"""The planner's (cut, encoding) candidates: bytes, guard, shared files, choice, on real onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _models import dynamic_batch_model, save

from splitgate.planner import Conditions, PlanBundle, build_bundle, load_bundle
from splitgate.planner._accuracy import Guard, check, compare_outputs, load_calibration
from splitgate.planner._encoding import candidate_id, split_id
from splitgate.planner._graph import TensorSpec
from splitgate.errors import InvalidArgument

FAST = {"repeats": 3, "warmup": 1}


def test_candidate_ids() -> None:
    assert candidate_id("cut-12", "raw") == "cut-12" and candidate_id("cut-12", "int8") == "cut-12@int8"
    assert split_id("cut-12@int8") == ("cut-12", "int8") and split_id("dag-2") == ("dag-2", "raw")


def test_guard_metrics() -> None:
    ref = [{"logits": np.array([[1.0, 2.0, 0.0]]), "emb": np.array([[1.0, 0.0]])} for _ in range(4)]
    flipped = [{"logits": np.array([[2.1, 2.0, 0.0]]), "emb": np.array([[1.0, 0.01]])}] + ref[1:]
    m = compare_outputs(ref, flipped)
    assert m["logits"]["kind"] == "classifier" and m["logits"]["top1_agreement"] == 0.75
    assert m["emb"]["kind"] == "classifier"  # rank-2, 2 columns: auto calls it logits
    m = compare_outputs(ref, flipped, output_kind="other")
    assert m["emb"]["kind"] == "other" and 0.9999 < m["emb"]["cosine_min"] < 1.0
    assert m["emb"]["max_rel_error"] == pytest.approx(0.01)
    emb = {"emb": m["emb"]}
    assert "cosine" in check(emb, Guard(min_cosine=0.99999))
    assert check(emb, Guard(min_cosine=0.9, max_rel_error=0.2)) is None
    assert "relative error" in check(emb, Guard(min_cosine=0.9, max_rel_error=0.001))
    assert "top-1" in check(compare_outputs(ref, flipped), Guard())
    with pytest.raises(InvalidArgument):
        Guard(output_kind="regression").validate()


def test_calibration_inputs(tmp_path: Path) -> None:
    spec = [TensorSpec("x", "FP32", [-1, 3])]
    c = load_calibration({"x": np.ones((5, 3))}, spec, batch=2)
    assert len(c.requests) == 2 and c.requests[0]["x"].shape == (2, 3) and c.requests[0]["x"].dtype == np.float32
    np.savez(tmp_path / "cal.npz", x=np.ones((3, 3), np.float32))
    assert load_calibration(tmp_path / "cal.npz", spec).samples == 3
    with pytest.raises(InvalidArgument, match="lack"):
        load_calibration({"y": np.ones((2, 3))}, spec)
    assert load_calibration(None, spec, samples=4).source == "random"


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("enc")
    return save(dynamic_batch_model(), d / "dyn.onnx")


def test_guard_drops_lossy_encodings_and_raw_only_planning(small: Path) -> None:
    # An impossible cosine bar on every output: only the lossless zstd survives.
    b = build_bundle(small, small.parent / "strict", device_slowdown=2000.0, output_kind="other",
                     min_cosine=1.0, **FAST)
    enc = b.profile["encodings"]
    assert enc["guard"]["min_cosine"] == 1.0 and enc["calibration"]["source"] == "random"
    assert enc["dropped"] and all(split_id(pid)[1] in ("fp16", "int8", "int8c", "uint8") for pid in enc["dropped"])
    assert all("not applicable" in why for pid, why in enc["dropped"].items() if pid.endswith("@uint8"))
    assert not any(split_id(pid)[1] in ("fp16", "int8", "int8c") for pid in b.partitions)
    raw = build_bundle(small, small.parent / "raw", encodings=("raw",), **FAST)
    assert not any("@" in pid for pid in raw.partitions) and raw.profile["encodings"]["measured"] == {}
    # no profile: no encoded candidates, no encoding keys in the manifest (older readers unaffected)
    plain = build_bundle(small, small.parent / "plain", profile=False)
    assert all("encoding" not in p for p in plain.manifest["partitions"])
    assert all(p.encoding is None and p.wire_encoding == "raw" for p in plain.partitions.values())


def test_bad_encoding_option(small: Path) -> None:
    with pytest.raises(InvalidArgument, match="unknown encodings"):
        build_bundle(small, small.parent / "bad", encodings=("raw", "int4"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> PlanBundle:
    """Trained resnet18 (gratings10, cached), planned for a phone-class device with real calibration inputs."""
    pytest.importorskip("torch")
    from splitgate.planner.zoo import calibration_inputs, export_zoo_model

    d = tmp_path_factory.mktemp("trained")
    model = export_zoo_model("resnet18", d / "resnet18.onnx", trained=True)
    cal = calibration_inputs(64)
    return build_bundle(model, d / "resnet18.bundle", device_slowdown=600.0,
                        calibration={"input": cal["input"]}, **FAST)


def test_int8_quarter_bytes_same_answers(trained: PlanBundle) -> None:
    measured = trained.profile["encodings"]["measured"]
    int8 = {pid: m for pid, m in measured.items() if split_id(pid)[1] == "int8"}
    assert int8, "every split is measured in int8"
    assert trained.profile["encodings"]["calibration"]["samples"] == 64
    for pid, m in int8.items():
        assert m["raw_bytes"] / m["wire_bytes"] >= 3.5, pid
        assert m["accuracy"]["logits"]["top1_agreement"] >= 0.99, pid
        assert m["dropped"] is None
        assert m["encode_timing"]["median_ms"] > 0 and m["decode_timing"]["median_ms"] > 0


def test_encoded_candidates_share_their_twins_files(trained: PlanBundle) -> None:
    b = load_bundle(trained.root)
    encoded = [p for p in b.partitions.values() if p.encoding is not None]
    assert encoded, "some encoded candidate wins somewhere"
    files = set(b.manifest["files"])
    for p in encoded:
        base, enc = split_id(p.id)
        twin = b.partition(base)
        assert p.encoding == enc and twin.encoding is None
        assert p.prefix_path == twin.prefix_path and p.suffix_path == twin.suffix_path
        assert p.cut_bytes < twin.cut_bytes
        entry, raw = b.profile["partitions"][p.id], b.profile["partitions"][base]
        assert entry["device_ms"] >= raw["device_ms"] and entry["cloud_ms"] >= raw["cloud_ms"]
    assert not any("@" in f for f in files), "no files of their own"
    order = list(b.partitions)
    assert all(order.index(split_id(p.id)[0]) < order.index(p.id) for p in encoded), "raw twin listed first"


def test_planner_picks_compressed_cuts_where_they_win(trained: PlanBundle) -> None:
    # Low bandwidth (3G and below, DADS's uplinks): an int8 cut wins somewhere, and beats its raw twin there.
    low = [u for u in trained.decision_table.grid.uplink_mbps if u <= 5.85]
    picks = {u: trained.choose(Conditions(uplink_mbps=u, rtt_ms=50.0)) for u in low}
    int8 = {u: p for u, p in picks.items() if split_id(p)[1] in ("int8", "int8c")}
    assert int8, picks
    for u, pid in int8.items():
        c = Conditions(uplink_mbps=u, rtt_ms=50.0)
        assert trained.estimate(pid, c).latency_ms < trained.estimate(split_id(pid)[0], c).latency_ms
    # High bandwidth, low RTT: compression cannot pay for its encode/decode time.
    assert "@" not in trained.choose(Conditions(uplink_mbps=1000.0, rtt_ms=1.0))
