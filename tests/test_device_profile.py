"""The device measures itself: ``splitgate profile``, plans from its output, ``splitgate refit``.

Real onnxruntime throughout; the venv test installs the project (no extras)
into a fresh virtualenv and runs ``splitgate profile`` there, as on a device.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from splitgate.planner import DeviceProfile, NodeProfile, Timing, build_bundle, load_bundle, measure_device, refit_bundle
from splitgate.planner._bundle import plan_digest
from splitgate.planner._device import SCHEMA, BucketTimes, PartitionTimes
from splitgate.planner._refit import refit_stats
from splitgate.cli import main as cli_main
from splitgate.errors import InvalidArgument

from _models import IR_VERSION, OPSET, dynamic_batch_model, save

FAST = {"repeats": 3, "warmup": 1}
REPO = Path(__file__).resolve().parents[1]


def conv_chain_model(channels: int = 32, size: int = 64, depth: int = 4, seed: int = 0) -> onnx.ModelProto:
    """x[N,3,S,S] -> depth x (Conv 3x3 -> Relu) -> GlobalAveragePool -> Flatten -> y[N,C]:
    a small input and ~0.3 GFLOP (milliseconds per run on one core), so the
    device's speed moves the decision table between device and cloud."""
    rng = np.random.default_rng(seed)
    inits, nodes, prev, cin = [], [], "x", 3
    for i in range(depth):
        w = (rng.standard_normal((channels, cin, 3, 3)) * 0.1).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        prev, cin = f"r{i}", channels
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["g"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["g"], ["y"], name="flat"))
    graph = helper.make_graph(
        nodes, "convchain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels])],
        inits,
    )
    return helper.make_model(graph, opset_imports=OPSET, ir_version=IR_VERSION)


def dynamic_width_model() -> onnx.ModelProto:
    """x[1,2,H,W] with dynamic H and W: needs --input-shape."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "dynhw",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, "H", "W"])],
    )
    return helper.make_model(graph, opset_imports=OPSET, ir_version=IR_VERSION)


@pytest.fixture(scope="module")
def conv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The conv chain model, its plan bundle, and this machine's device profile of the bundle."""
    d = tmp_path_factory.mktemp("devprof")
    model = save(conv_chain_model(), d / "conv.onnx")
    bundle = build_bundle(model, d / "conv.bundle", encodings=("raw", "fp16"), **FAST)
    dp = measure_device(bundle.root, repeats=5, warmup=1)
    return {"dir": d, "model": model, "bundle": bundle.root, "device": dp.save(d / "device.json")}


# -- unit: the format ---------------------------------------------------------------


def _timing(ms: float) -> Timing:
    return Timing(ms, ms * 0.9, ms * 1.2, 5, ms * 0.95)


def _profile() -> DeviceProfile:
    small = BucketTimes({"x": (1, 4)}, 4, _timing(2.0), {"a": 1.0, "b": 1.0},
                        partitions=[PartitionTimes("device", "device", [], _timing(2.0)),
                                    PartitionTimes("dag-1", "split", ["t2", "t1"], _timing(1.0), _timing(0.5),
                                                   {"int8": 0.25})])
    big = BucketTimes({"x": (1, 16)}, 16, _timing(8.0), {"a": 4.0, "b": 4.0})
    return DeviceProfile({"cpu": "test-cpu", "threads": 1}, "m", "ab" * 32, None, [small, big], {"threads": 1})


def test_format_round_trip_and_lookup(tmp_path: Path) -> None:
    dp = _profile()
    again = DeviceProfile.load(dp.save(tmp_path / "d.json"))
    assert again.to_dict() == dp.to_dict() and again.to_dict()["schema"] == SCHEMA
    # exact bucket; nearest by elements, scaled by the elements ratio
    assert dp.node_profile({"x": (1, 4)}).node_ms == {"a": 1.0, "b": 1.0}
    assert dp.node_profile({"x": (1, 32)}).node_ms == pytest.approx({"a": 8.0, "b": 8.0})
    assert dp.model_ms({"x": (1, 8)}) == pytest.approx(_timing(8.0).typical_ms * 0.5)
    # partitions match by cut (any plan's id), or by id; encoded twins add the measured encode time
    assert dp.partition_ms("device", {"x": (1, 4)}) == pytest.approx(1.9)
    assert dp.partition_ms("dag-7", {"x": (1, 4)}, tensors=["t1", "t2"]) == pytest.approx(0.95)
    assert dp.partition_ms("dag-1@int8", {"x": (1, 4)}) == pytest.approx(1.2)
    assert dp.partition_ms("dag-1@fp16", {"x": (1, 4)}) is None
    assert dp.partition_ms("dag-2", {"x": (1, 4)}, tensors=["other"]) is None
    assert dp.partition_ms("cloud") == 0.0
    assert dp.suffix_ms("dag-1", {"x": (1, 2)}) == pytest.approx(0.475 / 2)
    slow = dp.scaled(5.0)
    assert slow.partition_ms("dag-1@int8", {"x": (1, 4)}) == pytest.approx(5 * 1.2)
    assert slow.node_profile({"x": (1, 16)}).sum(["a", "b"]) == pytest.approx(40.0)


def test_format_errors_and_legacy_node_profile(tmp_path: Path) -> None:
    legacy = NodeProfile({"a": 3.0}, 3.0, 2, source="phone").save(tmp_path / "legacy.json")
    dp = DeviceProfile.load(legacy)
    assert dp.node_profile({"x": (9, 9)}).node_ms == {"a": 3.0} and dp.partition_ms("device") is None
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**_profile().to_dict(), "version": 99}))
    with pytest.raises(InvalidArgument, match="version 99 is not supported"):
        DeviceProfile.load(bad)
    bad.write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(InvalidArgument, match="not a device profile"):
        DeviceProfile.load(bad)
    with pytest.raises(InvalidArgument, match="cannot read device profile"):
        DeviceProfile.load(tmp_path / "missing.json")
    with pytest.raises(InvalidArgument, match="does not match"):
        _profile().check_model("cd" * 32)
    with pytest.raises(InvalidArgument, match="times none of the nodes"):
        dp.check_model(None, nodes=["x", "y"])
    dp.check_model(None, nodes=["a", "z"])


def test_refit_stats_measured_node_sum_and_encoded_twins() -> None:
    """Unit: which figure each kind of entry gets (hand-written entries)."""
    dp = _profile()
    stats = {
        "cloud": {"kind": "cloud", "device_ms": 0.0},
        "device": {"kind": "device", "device_ms": 20.0, "device_timing": _timing(1.0).to_dict(), "est_device_ms": 0.5},
        "cut-1": {"kind": "split", "tensors": ["t1", "t2"], "device_ms": 10.0},
        "cut-2": {"kind": "split", "tensors": ["u"], "device_ms": 12.0, "device_timing": _timing(1.0).to_dict(),
                  "est_device_ms": 0.5},
        "cut-2@fp16": {"kind": "split", "tensors": ["u"], "base": "cut-2", "device_ms": 13.0, "encode_ms": 1.0},
        "cut-1@int8": {"kind": "split", "tensors": ["t1", "t2"], "base": "cut-1", "device_ms": 11.0, "encode_ms": 1.0},
    }
    new = refit_stats(stats, dp, {"x": (1, 4)}, lambda pid: ["a"] if pid == "cut-2" else ["a", "b"])
    assert list(new) == list(stats) and new["cloud"]["device_ms"] == 0.0
    assert new["device"]["device_ms"] == pytest.approx(1.9) and new["device"]["device_source"] == "measured"
    assert new["cut-1"]["device_ms"] == pytest.approx(0.95) and new["cut-1"]["device_suffix_ms"] == pytest.approx(0.475)
    # not measured: the device's node sum x this machine's measured/estimated ratio (0.95 / 0.5)
    assert new["cut-2"]["device_source"] == "node-sum"
    assert new["cut-2"]["device_ms"] == pytest.approx(1.0 * 0.95 / 0.5)
    assert new["cut-1@int8"]["device_ms"] == pytest.approx(0.95 + 0.25)
    # encode time not measured on the device: the planned one x the device's speed vs the plan (1.9 / 20)
    assert new["cut-2@fp16"]["encode_ms"] == pytest.approx(1.0 * 1.9 / 20.0, rel=1e-3)
    twin = new["cut-2@fp16"]
    assert twin["device_ms"] == pytest.approx(new["cut-2"]["device_ms"] + twin["encode_ms"], rel=1e-3)
    assert new["cut-2"]["planned_device_ms"] == 12.0


# -- real measurement ----------------------------------------------------------------


def test_profile_a_bundle_measures_every_candidate(conv: dict[str, Path]) -> None:
    bundle = load_bundle(conv["bundle"])
    dp = DeviceProfile.load(conv["device"])
    assert dp.model_sha256 == bundle.model_sha256 and dp.plan_digest == bundle.plan_digest
    ident = dp.device
    assert ident["cpu"] and ident["cores"] >= 1 and ident["threads"] == 1
    assert "CPUExecutionProvider" in ident["providers"] and ident["onnxruntime"] and ident["arch"]
    [b] = dp.buckets
    assert b.shapes == {"x": (1, 3, 64, 64)} and b.elements == 3 * 64 * 64
    nodes = {n.name for n in onnx.load(str(bundle.model_path)).graph.node}
    assert b.node_ms and set(b.node_ms) <= nodes and sum(b.node_ms.values()) > 0 and b.model.median_ms > 0
    raw = {p.id for p in bundle.partitions.values() if p.kind != "cloud" and p.encoding is None}
    assert {p.id for p in b.partitions} == raw
    for p in b.partitions:
        assert p.device.runs == 5 and p.device.p10_ms <= p.device.median_ms <= p.device.p90_ms
        if p.kind == "split":
            assert p.cut == [t.name for t in bundle.partitions[p.id].cut_tensors] and p.suffix is not None
    for p in bundle.partitions.values():
        if p.encoding is not None:
            assert dp.partition_ms(p.id) is not None  # the encode time was measured


def test_profile_a_model_at_shape_buckets(tmp_path: Path) -> None:
    model = save(dynamic_batch_model(), tmp_path / "dyn.onnx")
    dp = measure_device(model, input_shapes={"x": [(1, 2, 8, 8), (4, 2, 8, 8)]}, repeats=3, warmup=1)
    assert [b.shapes["x"] for b in dp.buckets] == [(1, 2, 8, 8), (4, 2, 8, 8)]
    assert all(b.node_ms and b.partitions[0].id == "device" for b in dp.buckets)
    assert dp.partition_ms("device", {"x": (4, 2, 8, 8)}) == pytest.approx(dp.buckets[1].model.typical_ms)


def test_cli_profile_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dyn = save(dynamic_width_model(), tmp_path / "dynhw.onnx")
    cases = [
        ([str(tmp_path / "missing.onnx")], "no such ONNX file or plan bundle"),
        ([str(dyn)], "--input-shape x="),
        ([str(dyn), "--input-shape", "x=1x2"], "rank"),
        ([str(dyn), "--input-shape", "x=1x2xfoo"], "integers"),
        ([str(dyn), "--input-shape", "y=1x2x3x4"], "names no input"),
        ([str(dyn), "--sample", str(tmp_path / "none.npz")], "cannot read samples"),
    ]
    for argv, needle in cases:
        assert cli_main(["profile", *argv, "-o", str(tmp_path / "d.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "d.json").exists()
    model = save(dynamic_batch_model(), tmp_path / "dyn.onnx")
    for out, needle in ((tmp_path / "no" / "such" / "d.json", "cannot write device profile"),
                        (tmp_path, "cannot write device profile")):
        assert cli_main(["profile", str(model), "--repeats", "1", "-o", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert cli_main(["profile", str(dyn), "--input-shape", "x=1x2x4x6", "--repeats", "2", "-o",
                     str(tmp_path / "d.json")]) == 0
    assert DeviceProfile.load(tmp_path / "d.json").buckets[0].shapes == {"x": (1, 2, 4, 6)}


# -- plans and refits from a device profile ------------------------------------------


def _device_cells(bundle) -> int:
    return bundle.decision_table.wins().get("device", 0)


def test_refit_keeps_digest_and_follows_the_measured_times(conv: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    fast = DeviceProfile.load(conv["device"])
    slow_path = fast.scaled(5.0).save(tmp_path / "slow.json")
    a, b = tmp_path / "a.bundle", tmp_path / "b.bundle"
    shutil.copytree(conv["bundle"], a)
    shutil.copytree(conv["bundle"], b)
    before = load_bundle(a)
    table_before = (a / "decision_table.json").read_bytes()

    on_fast = refit_bundle(a, conv["device"])
    assert cli_main(["refit", str(b), "--device-profile", str(slow_path)]) == 0
    assert "unchanged" in capsys.readouterr().out
    on_slow = load_bundle(b)  # verifies every file and the digest
    for refit in (on_fast, on_slow):
        assert refit.plan_digest == before.plan_digest == plan_digest(refit.manifest)
        assert refit.manifest["device"]["identity"]["cpu"] == fast.device["cpu"]
        assert refit.profile["device"]["source"].startswith("device:")
        assert {k: v for k, v in refit.manifest["files"].items() if not k.endswith(".json")} == {
            k: v for k, v in before.manifest["files"].items() if not k.endswith(".json")}
    assert (a / "decision_table.json").read_bytes() != table_before
    # device times follow the measurement: the x5 device is 5x slower on every partition
    for pid, entry in on_fast.profile["partitions"].items():
        if entry["kind"] == "cloud":
            continue
        assert entry["device_source"].startswith("measured")
        slow_ms = on_slow.profile["partitions"][pid]["device_ms"]
        assert slow_ms == pytest.approx(5 * entry["device_ms"], rel=0.01), pid
    for refit in (on_fast, on_slow):
        buckets = refit.profile.get("buckets")
        if buckets:
            assert buckets[0]["partitions"] == refit.profile["partitions"]
    # and the slower device's table moves toward the cloud
    assert _device_cells(on_slow) < _device_cells(on_fast)
    # a second refit is idempotent in its planned figures
    again = refit_bundle(a, conv["device"])
    for pid, entry in again.profile["partitions"].items():
        if entry["kind"] != "cloud":
            assert entry["planned_device_ms"] == before.profile["partitions"][pid]["device_ms"]


def test_refit_refuses_another_models_profile_and_unprofiled_bundles(conv: dict[str, Path], tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    other = measure_device(save(dynamic_batch_model(), tmp_path / "dyn.onnx"), repeats=2, warmup=0)
    path = other.save(tmp_path / "other.json")
    assert cli_main(["refit", str(conv["bundle"]), "--device-profile", str(path)]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "Traceback" not in err
    bare = build_bundle(conv["model"], tmp_path / "bare.bundle", profile=False)
    with pytest.raises(InvalidArgument, match="no profile"):
        refit_bundle(bare.root, conv["device"])


def test_plans_from_device_profiles_differ_as_measured(conv: dict[str, Path], tmp_path: Path) -> None:
    """splitgate plan --device-profile: a 20x slower device's plan has 20x device times
    (the device partition is the device's own measurement) and moves toward the cloud
    (by far more grid cells than the two plans' own cloud-time noise can move)."""
    fast = DeviceProfile.load(conv["device"])
    slow_path = fast.scaled(20.0).save(tmp_path / "slow.json")
    raw = {"encodings": ("raw",), **FAST}
    on_fast = build_bundle(conv["model"], tmp_path / "fast.bundle", device_profile=conv["device"], **raw)
    on_slow = build_bundle(conv["model"], tmp_path / "slow.bundle", device_profile=slow_path, **raw)
    dev_fast = on_fast.profile["partitions"]["device"]["device_ms"]
    dev_slow = on_slow.profile["partitions"]["device"]["device_ms"]
    assert dev_slow / dev_fast == pytest.approx(20.0, rel=1e-3), (dev_fast, dev_slow)
    assert dev_fast == pytest.approx(fast.partition_ms("device", kind="device"), rel=1e-3)
    cells = (_device_cells(on_fast), _device_cells(on_slow))
    assert cells[1] < cells[0], (cells, dev_fast, dev_slow)


# -- the device's own install ----------------------------------------------------------


@pytest.fixture(scope="session")
def device_venv() -> Path:
    """The virtualenv holding only ``pip install .`` (no extras): what a device has.

    ``make test`` (or ``make device-env``) builds it at ``.venv/device`` before the
    tests run, from the current sources; ``SPLITGATE_DEVICE_VENV`` points elsewhere.
    Nothing is installed at test time.
    """
    root = Path(os.environ.get("SPLITGATE_DEVICE_VENV", REPO / ".venv" / "device"))
    py = root / "bin" / "python"
    if not (root / ".installed").is_file() or not py.is_file():
        pytest.skip(f"no plain-install virtualenv at {root}: build it with `make device-env` (make test does)")
    return py


def test_profile_runs_in_a_plain_install(device_venv: Path, conv: dict[str, Path], tmp_path: Path) -> None:
    py = device_venv
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    for heavy in ("torch", "ray"):
        r = subprocess.run([str(py), "-c", f"import {heavy}"], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert r.returncode != 0 and "No module named" in r.stderr, f"{heavy} is importable in the plain install"
    splitgate = py.parent / "splitgate"
    for source, out in ((conv["model"], tmp_path / "model.json"), (conv["bundle"], tmp_path / "bundle.json")):
        r = subprocess.run([str(splitgate), "profile", str(source), "--repeats", "3", "--warmup", "1", "-o", str(out)],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        dp = DeviceProfile.load(out)
        assert dp.model_sha256 == load_bundle(conv["bundle"]).model_sha256
        assert dp.device["splitgate"] == version("splitgate") and dp.buckets[0].node_ms
    bundle_dp = DeviceProfile.load(tmp_path / "bundle.json")
    assert {p.id for p in bundle_dp.buckets[0].partitions} >= {"device"}
    assert len(bundle_dp.buckets[0].partitions) > 1
    # the plain install's module list: nothing heavy was imported to profile
    script = (
        "import sys, splitgate.cli as c\n"
        "c.main(['profile', sys.argv[1], '--repeats', '1', '--warmup', '0', '-o', sys.argv[2]])\n"
        "heavy = ('torch', 'ray', 'onnxscript', 'matplotlib', 'locust')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    r = subprocess.run([str(py), "-c", script, str(conv["model"]), str(tmp_path / "m2.json")], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "[]", r.stderr[-2000:]


def test_plain_install_is_one_package_and_names_missing_extras(device_venv: Path, conv: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """The wheel installs one top-level name, ships its data files and py.typed,
    and a command whose extra is missing says which one to install, in one line."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    script = (
        "import importlib.util as u, pathlib, splitgate\n"
        "root = pathlib.Path(splitgate.__file__).parent\n"
        "print([n for n in ('planner', 'edge', 'cloud', 'netsim', 'experiments', 'loadtests') if u.find_spec(n)])\n"
        "print(all((root / p).is_file() for p in ('py.typed', 'cloud/serve_config.yaml', 'netsim/traces/riiser_tram_synthetic.log',"
        " 'experiments/specs/commute.yaml')))\n"
    )
    r = subprocess.run([str(device_venv), "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.split() == ["[]", "True"], (r.stdout, r.stderr[-1500:])
    splitgate = device_venv.parent / "splitgate"
    for args, extra in ((["cloud", "serve", str(conv["bundle"]), "--insecure"], "cloud"), (["zoo", "mobilenet", "-o", "m.onnx"], "zoo")):
        r = subprocess.run([str(splitgate), *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-1500:]
        assert f"pip install 'splitgate[{extra}]'" in lines[0] and "Traceback" not in r.stderr


def test_shape_buckets_profile_and_refit(tmp_path: Path) -> None:
    """A bundle planned at two shape buckets: profiled at both by default (or at
    the user's shapes), refitted bucket by bucket."""
    from splitgate.planner._device import _time_encodings

    model = save(conv_chain_model(channels=8, size=32), tmp_path / "small.onnx")
    bundle = build_bundle(model, tmp_path / "b", input_shapes={"x": [(1, 3, 32, 32), (4, 3, 32, 32)]},
                          encodings=("raw",), **FAST)
    dp = measure_device(bundle.root, repeats=3, warmup=1)
    assert [b.shapes["x"] for b in dp.buckets] == [(1, 3, 32, 32), (4, 3, 32, 32)]
    at = measure_device(bundle.root, input_shapes={"x": [(2, 3, 32, 32)]}, repeats=2, warmup=0)
    assert [b.shapes["x"] for b in at.buckets] == [(2, 3, 32, 32)] and len(at.buckets[0].partitions) > 1
    refit = refit_bundle(bundle.root, dp.scaled(3.0))
    assert refit.plan_digest == bundle.plan_digest
    buckets = refit.profile["buckets"]
    assert len(buckets) == 2 == len(json.loads((refit.root / "decision_table.json").read_text())["buckets"])
    for i, b in enumerate(buckets):
        want = dp.partition_ms("device", {"x": tuple(b["shapes"]["x"])}) * 3.0
        assert b["partitions"]["device"]["device_ms"] == pytest.approx(want, rel=0.01), i
    assert refit.profile["partitions"] == buckets[0]["partitions"]
    # the encode time of a real prefix's cut tensors, per encoding
    split = next(p for p in bundle.partitions.values() if p.kind == "split")
    feeds = {"x": np.ones((1, 3, 32, 32), np.float32)}
    enc = _time_encodings(split.prefix_path, [t.name for t in split.cut_tensors], ["fp16", "int8"], feeds, 1, 0, 2)
    assert set(enc) == {"fp16", "int8"} and all(v > 0 for v in enc.values())


# -- int8 device prefixes (--quantize) and cloud@uint8 ---------------------------------------


def test_refit_stats_int8_twins_never_take_the_fp32_time() -> None:
    """Unit: an int8 twin gets its own measurement; without one (a profile of a bundle planned
    without --quantize), the device's fp32 time x this machine's int8/fp32 ratio; its encoded
    twin the fp32 cut's measured encode time (the same tensors)."""
    from splitgate.planner._refit import INT8_RATIO_SOURCE

    plain = _profile()  # device + dag-1 (t1|t2), fp32 only
    stats = {
        "device": {"kind": "device", "device_ms": 2.0, "device_timing": _timing(2.0).to_dict()},
        "device~int8": {"kind": "device", "device_ms": 3.0, "device_timing": _timing(3.0).to_dict(),
                        "precision": "int8"},
        "cut-1~int8": {"kind": "split", "tensors": ["t1", "t2"], "device_ms": 0.5, "precision": "int8",
                       "device_timing": _timing(0.5).to_dict()},
        "cut-1": {"kind": "split", "tensors": ["t1", "t2"], "device_ms": 1.0, "device_timing": _timing(1.0).to_dict()},
        "cut-1~int8@int8": {"kind": "split", "tensors": ["t1", "t2"], "base": "cut-1~int8", "device_ms": 0.6,
                            "encode_ms": 0.1, "precision": "int8"},
    }
    new = refit_stats(stats, plain, {"x": (1, 4)}, lambda pid: ["a"])
    assert list(new) == list(stats)
    assert new["cut-1"]["device_ms"] == pytest.approx(0.95) and new["cut-1"]["device_source"] == "measured"
    assert new["cut-1~int8"]["device_source"] == INT8_RATIO_SOURCE
    assert new["cut-1~int8"]["device_ms"] == pytest.approx(0.95 * 0.5, rel=1e-3)  # the plan ran int8 in 0.5x
    assert new["device~int8"]["device_ms"] == pytest.approx(1.9 * 1.5, rel=1e-3)
    assert new["cut-1~int8"]["device_suffix_ms"] == pytest.approx(0.475), "the fp32 suffix it shares"
    twin = new["cut-1~int8@int8"]
    assert twin["encode_ms"] == pytest.approx(0.25) and twin["device_ms"] == pytest.approx(0.95 * 0.5 + 0.25, rel=1e-3)
    # a profile with the int8 prefix measured: that time, not the fp32 one nor a ratio
    int8 = PartitionTimes("cut-7~int8", "split", ["t1", "t2"], _timing(3.0), None, {"int8": 0.5}, "int8")
    plain.buckets[0].partitions.append(int8)
    assert int8.key != plain.buckets[0].partitions[1].key
    assert PartitionTimes.from_dict({k: v for k, v in int8.to_dict().items() if k != "precision"}).key == int8.key, \
        "a profile written before precisions were recorded: the precision from the id"
    new = refit_stats(stats, plain, {"x": (1, 4)}, lambda pid: ["a"])
    assert new["cut-1~int8"]["device_ms"] == pytest.approx(2.85) and new["cut-1~int8"]["device_source"] == "measured"
    assert new["cut-1~int8@int8"]["encode_ms"] == pytest.approx(0.5)
    assert new["device~int8"]["device_source"] == INT8_RATIO_SOURCE


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The trained small zoo resnet18 planned with --quantize and without, each profiled here."""
    pytest.importorskip("torch")
    from splitgate.planner.zoo import calibration_inputs, export_zoo_model

    d = tmp_path_factory.mktemp("devq")
    model = export_zoo_model("resnet18", d / "resnet18.onnx", trained=True)
    calibration = {"input": calibration_inputs(24)["input"]}
    q = build_bundle(model, d / "q.bundle", quantize=True, calibration=calibration, **FAST)
    plain = build_bundle(model, d / "plain.bundle", calibration=calibration, **FAST)
    return {"dir": d, "q": q, "plain": plain, "q_device": measure_device(q.root, **FAST),
            "plain_device": measure_device(plain.root, **FAST)}


def _int8_ids(bundle) -> list[str]:
    return [pid for pid, p in bundle.partitions.items() if p.prefix_precision == "int8" and p.encoding is None]


def test_profile_times_every_int8_prefix_itself(quantized: dict[str, Any]) -> None:
    q, dp = quantized["q"], quantized["q_device"]
    int8 = _int8_ids(q)
    assert "device~int8" in int8 and len(int8) >= 4, list(q.partitions)
    [b] = dp.buckets
    by_id = {p.id: p for p in b.partitions}
    assert set(int8) <= set(by_id), "device~int8 and every cut-K~int8 are measured"
    for pid in int8:
        fp32 = by_id[pid.split("~")[0]]
        own = by_id[pid]
        assert own.precision == "int8" and own.key != fp32.key and own.device != fp32.device
        tensors = [t.name for t in q.partitions[pid].cut_tensors] or None
        ms = dp.partition_ms(pid, kind=q.partitions[pid].kind, tensors=tensors)
        assert ms == pytest.approx(own.device.typical_ms) and ms != pytest.approx(fp32.device.typical_ms)
        if own.kind == "split":  # the shared fp32 suffix is timed once, and answers for the twin
            assert own.suffix is None and dp.suffix_ms(pid, tensors=tensors) == pytest.approx(fp32.suffix.typical_ms)
    assert DeviceProfile.from_dict(dp.to_dict()).to_dict() == dp.to_dict()


def test_refit_int8_twins_to_their_own_times(quantized: dict[str, Any], tmp_path: Path) -> None:
    q, dp = quantized["q"], quantized["q_device"]
    for factor in (1.0, 5.0):  # 5.0: an emulated device five times slower scales the int8 twins too
        copy = shutil.copytree(q.root, tmp_path / f"x{factor:g}")
        refit = refit_bundle(copy, dp.scaled(factor))
        assert refit.plan_digest == q.plan_digest
        prof = refit.plan_profile.partitions
        for pid in _int8_ids(q):
            own = factor * dp.partition_ms(pid, tensors=[t.name for t in q.partitions[pid].cut_tensors] or None,
                                           kind=q.partitions[pid].kind)
            fp32 = prof[pid.split("~")[0]].device_ms
            assert prof[pid].device_source == "measured" and prof[pid].device_ms == pytest.approx(own, abs=1e-3)
            assert abs(prof[pid].device_ms - fp32) > 1e-3, (pid, "took the fp32 prefix's time")
        assert not any(n.startswith("refit: ") for n in refit.profile["notes"])


def test_plan_with_a_device_profile_costs_int8_twins_at_their_own_times(quantized: dict[str, Any]) -> None:
    """``plan --device-profile`` takes an int8 twin's device time from the profile's own
    int8 measurement, as refit does (not the per-node sum of its fp32 nodes)."""
    from splitgate.planner.zoo import calibration_inputs

    q, dp = quantized["q"], quantized["q_device"].scaled(5.0)
    planned = build_bundle(q.model_path, quantized["dir"] / "q_dev.bundle", quantize=True, device_profile=dp,
                           calibration={"input": calibration_inputs(24)["input"]}, **FAST)
    prof = planned.plan_profile.partitions
    ids = [pid for pid in _int8_ids(planned) if pid in prof]
    assert ids, list(prof)
    for pid in ids:
        part = planned.partitions[pid]
        own = dp.partition_ms(pid, tensors=[t.name for t in part.cut_tensors] or None, kind=part.kind)
        assert prof[pid].device_ms == pytest.approx(own, abs=1e-3), pid


def test_refit_with_a_profile_without_int8_scales_by_the_plan_ratio(quantized: dict[str, Any],
                                                                    tmp_path: Path) -> None:
    from splitgate.planner._refit import INT8_RATIO_SOURCE

    q, plain_dp = quantized["q"], quantized["plain_device"]
    assert not any(p.precision == "int8" for p in plain_dp.buckets[0].partitions)
    copy = shutil.copytree(q.root, tmp_path / "legacy")
    planned = q.plan_profile.partitions
    refit = refit_bundle(copy, plain_dp.scaled(5.0))
    prof = refit.plan_profile.partitions
    for pid in _int8_ids(q):
        base = pid.split("~")[0]
        ratio = planned[pid].device_timing.typical_ms / planned[base].device_timing.typical_ms
        assert prof[base].device_source == "measured"
        assert prof[pid].device_source == INT8_RATIO_SOURCE
        assert prof[pid].device_ms == pytest.approx(prof[base].device_ms * ratio, rel=1e-3, abs=1e-3)
    [note] = [n for n in refit.profile["notes"] if n.startswith("refit: ")]
    assert "no int8 measurements" in note and "device~int8" in note
    # refitting again with the device's int8 measurements replaces the estimate and the note
    again = refit_bundle(copy, quantized["q_device"])
    assert all(again.plan_profile.partitions[pid].device_source == "measured" for pid in _int8_ids(q))
    assert not any(n.startswith("refit: ") for n in again.profile["notes"]) and again.plan_digest == q.plan_digest


def test_cloud_uint8_encode_time_is_timed_on_8bit_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cloud@uint8`` is kept for 8-bit inputs; the bundle's saved request is random normal, so
    the encode time is taken on byte-derived data of the input's shape (not the raw fallback)."""
    from splitgate.planner import Constraints, _device

    from splitgate.encoding import encoded_nbytes, uint8_codes

    model = save(dynamic_batch_model(), tmp_path / "dyn.onnx")
    images = (np.random.default_rng(0).integers(0, 256, size=(64, 2, 8, 8)) / 255.0).astype(np.float32)
    b = build_bundle(model, tmp_path / "u8.bundle", batch=16, device_slowdown=50.0, encodings=("raw", "uint8"),
                     constraints=Constraints(device_memory_mb=1e-6), calibration={"x": images}, **FAST)
    assert "cloud@uint8" in b.partitions, list(b.partitions)
    sample = b.sample_inputs()["x"]
    assert uint8_codes(sample) is None, "the saved request is not 8-bit: timing it would time raw"
    timed: dict[str, dict[str, np.ndarray]] = {}
    real = _device._encode_times

    def spy(arrays: Any, encodings: Any, warmup: int, repeats: int) -> dict[str, float]:
        timed.update({e: dict(arrays) for e in encodings})
        return real(arrays, encodings, warmup, repeats)

    monkeypatch.setattr(_device, "_encode_times", spy)
    dp = measure_device(b.root, **FAST)
    assert dp.buckets[0].input_encode_ms["uint8"] > 0
    x = timed["uint8"]["x"]
    assert x.shape == sample.shape and x.dtype == sample.dtype
    assert uint8_codes(x) is not None and encoded_nbytes(x, "uint8") * 3 < x.nbytes, "timed the 8-bit path"
    # already 8-bit inputs and integer inputs are timed as given
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    same = _device._byte_derived({"x": images[:16], "ids": ids})
    assert np.array_equal(same["x"], images[:16]) and np.array_equal(same["ids"], ids)
    assert same["ids"].dtype == np.int64


def test_cascade_timing_round_trip_match_and_scale(tmp_path: Path) -> None:
    """A bundle planned with --cascade: the profile times its small model per bucket, keyed by its sha256."""
    dp = _profile()
    dp.buckets[0].cascade = _timing(0.5)
    dp.buckets[1].cascade = _timing(2.0)
    dp.cascade_sha256 = "cd" * 32
    again = DeviceProfile.load(dp.save(tmp_path / "d.json"))
    assert again.to_dict() == dp.to_dict() and again.cascade_sha256 == "cd" * 32
    assert again.cascade_ms("cd" * 32, {"x": (1, 4)}) == pytest.approx(0.475)
    assert again.cascade_ms(None, {"x": (1, 32)}) == pytest.approx(_timing(2.0).typical_ms * 2)  # nearest, scaled
    assert again.cascade_ms("ef" * 32, {"x": (1, 4)}) is None, "another cascade model's time is not this one's"
    assert dp.scaled(4.0).cascade_ms("cd" * 32, {"x": (1, 4)}) == pytest.approx(4 * 0.475)
    # a profile from before cascades were timed (no keys) reads as "not timed"
    doc = dp.to_dict()
    del doc["model"]["cascade_sha256"]
    for b in doc["buckets"]:
        del b["cascade"]
    old = DeviceProfile.from_dict(doc)
    assert old.cascade_sha256 is None and old.cascade_ms(None) is None and old.cascade_ms("cd" * 32) is None
    assert "cascade" not in json.dumps(_profile().to_dict()), "profiles without a cascade keep their old form"
