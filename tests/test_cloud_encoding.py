"""Encoded twins of the ``cloud`` partition (``cloud@int8``...): planned, guarded,
written to the manifest, chosen, and served end to end (grpcio baseline, real ORT)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _models import dynamic_batch_model, save, session, two_io_model

from splitgate.planner import (
    Conditions,
    DeviceProfile,
    PlanBundle,
    build_bundle,
    load_bundle,
    measure_device,
    refit_bundle,
)
from splitgate.planner._accuracy import Guard, check, compare_outputs
from splitgate.planner._encoding import split_id, wire_nbytes
from splitgate.errors import BundleError

FAST = {"repeats": 3, "warmup": 1}
BATCH = 16


def _byte_images(n: int, seed: int = 0) -> np.ndarray:
    """Inputs as images scaled from bytes: k/255 floats (zstd compresses them)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, 2, 8, 8)) / 255.0).astype(np.float32)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> PlanBundle:
    """The conv net at batch 16 (8 KB of fp32 input), byte-image calibration inputs, and a device
    memory limit no prefix fits: the cloud wins everywhere (raw or encoded, the choice under test)."""
    from splitgate.planner import Constraints

    d = tmp_path_factory.mktemp("cloudenc")
    model = save(dynamic_batch_model(), d / "dyn.onnx")
    return build_bundle(model, d / "dyn.bundle", batch=BATCH, device_slowdown=50.0,
                        constraints=Constraints(device_memory_mb=1e-6),
                        calibration={"x": _byte_images(4 * BATCH)}, **FAST)


def test_cloud_twins_are_guarded_and_smaller(bundle: PlanBundle) -> None:
    b = load_bundle(bundle.root)
    twins = {p.id: p for p in b.partitions.values() if p.kind == "cloud" and p.encoding is not None}
    assert {"cloud@int8", "cloud@fp16", "cloud@zstd"} <= set(twins), list(b.partitions)
    cloud = b.partition("cloud")
    measured = b.profile["encodings"]["measured"]
    for pid, p in twins.items():
        assert split_id(pid) == ("cloud", p.encoding)
        assert p.prefix_path is None and p.suffix_path == cloud.suffix_path == b.model_path
        assert p.cut_tensors == cloud.cut_tensors
        assert p.cut_bytes < cloud.cut_bytes, pid
        assert measured[pid]["dropped"] is None
        entry, raw = b.plan_profile.partitions[pid], b.plan_profile.partitions["cloud"]
        assert entry.base == "cloud" and entry.encoding == p.encoding and entry.sends_input
        assert entry.encode_ms > 0 and entry.device_ms == pytest.approx(raw.device_ms + entry.encode_ms, abs=1e-3)
        assert entry.cloud_ms >= raw.cloud_ms
        for bucket in b.plan_profile.buckets:
            assert pid in bucket.partitions
    assert measured["cloud@int8"]["raw_bytes"] / measured["cloud@int8"]["wire_bytes"] == pytest.approx(4.0, rel=0.01)
    assert cloud.cut_bytes / twins["cloud@int8"].cut_bytes == pytest.approx(4.0, rel=0.01)
    assert not any("@" in f for f in b.manifest["files"]), "twins share the full model"
    order = list(b.partitions)
    assert all(order.index("cloud") < order.index(pid) for pid in twins)


def test_choice_takes_a_cloud_twin_on_a_slow_link(bundle: PlanBundle) -> None:
    # CAT1 uplink (the cloud wins: no prefix fits the device): an encoded upload beats the raw one
    # (int8: 6 KB fewer at 0.13 Mbps is ~380 ms, its encode time a few ms here).
    c = Conditions(uplink_mbps=0.13, rtt_ms=50.0)
    pid = bundle.choose(c)
    assert split_id(pid)[0] == "cloud" and pid != "cloud", pid
    assert bundle.estimate(pid, c).latency_ms < bundle.estimate("cloud", c).latency_ms
    assert set(bundle.candidates) > {"cloud", pid}, "raw cloud still wins somewhere (fast links)"
    # The privacy floor excludes every cloud twin too (they send the inputs, encoded): here only the
    # cloud fits, so nothing is left.
    with pytest.raises(BundleError, match="no partition"):
        bundle.choose(Conditions(uplink_mbps=0.13, rtt_ms=50.0, privacy=True))


def test_strict_guard_drops_lossy_cloud_twins(tmp_path: Path) -> None:
    model = save(dynamic_batch_model(), tmp_path / "dyn.onnx")
    b = build_bundle(model, tmp_path / "strict", batch=BATCH, device_slowdown=50.0, output_kind="other",
                     min_cosine=1.0, calibration={"x": _byte_images(2 * BATCH)}, **FAST)
    dropped = b.profile["encodings"]["dropped"]
    for enc in ("fp16", "int8", "int8c"):
        assert "cosine similarity" in dropped[f"cloud@{enc}"]
        assert f"cloud@{enc}" not in b.partitions
    assert "cloud@zstd" in b.partitions, "lossless: exact outputs pass any guard"


def test_integer_inputs_travel_raw(tmp_path: Path) -> None:
    """A float and an int64 input: lossy twins encode the floats only; the int64 ids are sent raw."""
    model = save(two_io_model(), tmp_path / "two.onnx")
    b = build_bundle(model, tmp_path / "two", batch=64, device_slowdown=50.0, **FAST)
    measured = b.profile["encodings"]["measured"]
    x = np.zeros((64, 3), np.float32)
    ids = np.zeros((64, 2), np.int64)
    expected = wire_nbytes({"x": x, "ids": ids}, "int8")
    assert expected == x.size + ids.nbytes
    assert measured["cloud@int8"]["wire_bytes"] == expected


def test_device_profile_times_cloud_twins_and_refit_uses_it(bundle: PlanBundle, tmp_path: Path) -> None:
    """``splitgate profile`` of a bundle times the encoding of the model's inputs per cloud twin;
    a refit (and a plan with that profile) costs a cloud twin that encode time on the device."""
    import shutil

    dp = measure_device(bundle.root, repeats=2, warmup=0)
    twins = {p.encoding for p in bundle.partitions.values() if p.kind == "cloud" and p.encoding}
    [b] = dp.buckets
    assert set(b.input_encode_ms) == twins and all(v > 0 for v in b.input_encode_ms.values())
    assert DeviceProfile.from_dict(dp.to_dict()).to_dict() == dp.to_dict()
    assert dp.partition_ms("cloud") == 0.0
    assert dp.partition_ms("cloud@int8") == pytest.approx(b.input_encode_ms["int8"])
    assert dp.scaled(3.0).encode_ms("cloud@int8") == pytest.approx(3.0 * b.input_encode_ms["int8"])
    copy = tmp_path / "refit.bundle"
    shutil.copytree(bundle.root, copy)
    refit = refit_bundle(copy, dp)
    entry = refit.plan_profile.partitions["cloud@int8"]
    assert entry.encode_ms == pytest.approx(b.input_encode_ms["int8"], abs=1e-3)
    assert entry.device_ms == pytest.approx(entry.encode_ms, abs=1e-3) and entry.device_source == "measured"


@pytest.fixture(scope="module")
def baseline(bundle: PlanBundle) -> Iterator[str]:
    from splitgate.cloud.baseline import start_baseline

    server = start_baseline([str(bundle.root)])
    try:
        yield server.address
    finally:
        server.stop()


@pytest.mark.parametrize("encoding", ["int8", "zstd"])
def test_gateway_sends_cloud_twins_encoded(bundle: PlanBundle, baseline: str, encoding: str) -> None:
    from splitgate.edge import Gateway

    pid = f"cloud@{encoding}"
    x = _byte_images(BATCH, seed=7)
    want = session(bundle.model_path).run(None, {"x": x})[0]
    with Gateway([bundle], cloud=baseline) as gw:
        result = gw.infer(bundle.model_name, {"x": x}, partition=pid)
        raw = gw.infer(bundle.model_name, {"x": x}, partition="cloud")
    assert result.trace.partition == pid and not result.trace.fallback
    got = result.outputs["y"]
    assert result.trace.bytes_sent == wire_nbytes({"x": x}, encoding)
    assert result.trace.bytes_sent < raw.trace.bytes_sent == x.nbytes
    if encoding == "zstd":
        np.testing.assert_array_equal(got, want)
    else:
        guard = Guard(**bundle.profile["encodings"]["guard"])
        metrics = compare_outputs([{"y": want}], [{"y": got}], output_kind=guard.output_kind)
        assert check(metrics, guard) is None, metrics


@pytest.mark.integration
def test_ray_tier_serves_cloud_twins(cloud_tier, zoo_bundle) -> None:
    """The real Ray Serve tier decodes a cloud twin's inputs before the full model."""
    from splitgate.edge import Gateway

    twins = [p for p in zoo_bundle.partitions.values() if p.kind == "cloud" and p.encoding]
    assert twins, list(zoo_bundle.partitions)
    (spec,) = zoo_bundle.inputs
    x = {spec.name: np.random.default_rng(5).standard_normal([d if d >= 0 else 1 for d in spec.shape]).astype(
        np.float32)}
    want = session(zoo_bundle.model_path).run(None, x)
    with Gateway([zoo_bundle], cloud=cloud_tier.address) as gw:
        for p in twins:
            result = gw.infer(zoo_bundle.model_name, x, partition=p.id)
            assert result.trace.partition == p.id and not result.trace.fallback, (p.id, result.trace)
            assert result.trace.bytes_sent == wire_nbytes(x, p.encoding), p.id
            got = list(result.outputs.values())
            for g, w in zip(got, want):
                if p.encoding == "zstd":
                    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
                else:
                    g64, w64 = g.astype(np.float64).ravel(), w.astype(np.float64).ravel()
                    assert g64 @ w64 / (np.linalg.norm(g64) * np.linalg.norm(w64)) > 0.99, p.id


@pytest.mark.parametrize("encoding", ["raw", "fp16", "int8", "zstd", "uint8"])
def test_admission_counts_rows_of_the_decoded_tensor(encoding: str) -> None:
    """A zstd tensor travels as a flat byte string: the replica's admission must
    count the decoded batch rows, not the bytes (it refused every zstd request as
    hundreds of thousands of rows queued ahead)."""
    pytest.importorskip("ray")
    from splitgate.cloud._app import _rows
    from splitgate.planner._encoding import _build

    x = (np.arange(3 * 8 * 8 * 3) % 256 / 255.0).astype(np.float32).reshape(3, 8, 8, 3)
    assert _rows(_build({"x": x}, encoding)) == 3
