"""The confident-on-device cascade (issue 16.3): planning, calibration, and the Gateway's use of it.

The full model is the zoo's trained resnet18 (gratings10, cached weights). The
small model is an early exit of it, built here in a second without training: the
full model's first half (up to a Relu about halfway through), global average
pooling, and a linear head fitted by ridge regression to the full model's
logits on gratings10 samples from a stream the calibration set never uses. It
takes the full model's inputs and produces its output, runs in about 60 % of its
time, agrees on most inputs and is unsure of some (and of noise), so the
threshold, the exits and the fall-through all have something to do.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from splitgate import codec, contract
from splitgate.edge import DecisionCore, Gateway, GatewayConfig
from splitgate.edge._cascade import ExitRates, cascade_expected_ms, is_confident
from splitgate.edge._serve import serve_edge
from splitgate.errors import BundleError, InvalidArgument
from splitgate.planner import PlanBundle, build_bundle, load_bundle
from splitgate.planner._cascade import calibrate_threshold, confidence, confidence_kind
from splitgate.protocol import inference_pb2 as pb
from splitgate.protocol import inference_pb2_grpc as pb_grpc

pytest.importorskip("torch")

MODEL = "resnet18"
#: the plan's device is this much slower than this machine (phone-class against a server core):
#: offline the small model pays for itself; against a loopback cloud it does not
SLOWDOWN = 200.0


def _session(path: Path | str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _early_exit(full: Path, out: Path) -> Path:
    """A cheap early-exit head on the first half of the trained model (the zoo's)."""
    from splitgate.planner.zoo import export_early_exit

    return export_early_exit(full, out)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from splitgate.planner.zoo import export_zoo_model

    d = tmp_path_factory.mktemp("cascade")
    full = export_zoo_model(MODEL, d / f"{MODEL}.onnx", trained=True)
    return full, _early_exit(full, d / "small.onnx")


@pytest.fixture(scope="module")
def calibration() -> np.ndarray:
    from splitgate.planner.zoo import calibration_inputs

    return calibration_inputs(64)["input"]


@pytest.fixture(scope="module")
def bundle(models: tuple[Path, Path], calibration: np.ndarray) -> PlanBundle:
    full, small = models
    return build_bundle(full, full.parent / "cascade.bundle", cascade=small, calibration={"input": calibration},
                        encodings=("raw",), repeats=3, warmup=1, max_candidates=2, reference_cuts=1,
                        device_slowdown=SLOWDOWN)


def _held_out(n: int, seed: int = 11) -> np.ndarray:
    from splitgate.planner.zoo import calibration_inputs

    return calibration_inputs(n, seed=seed)["input"]


def _noise(n: int) -> np.ndarray:
    return np.random.default_rng(0).normal(0.0, 1.0, (n, 1, 3, 64, 64)).astype(np.float32)


# -- calibration ---------------------------------------------------------------------------


def test_calibrate_threshold_takes_the_most_exits_the_guard_allows() -> None:
    conf = np.array([0.99, 0.95, 0.95, 0.9, 0.8, 0.6, 0.5])
    agree = np.array([True, True, True, True, False, True, False])
    assert calibrate_threshold(conf, agree, 0.99) == (0.9, 4 / 7, 1.0)
    t, rate, agreement = calibrate_threshold(conf, agree, 0.8)  # 5 of 6 agree down to 0.6
    assert (t, rate) == (0.6, 6 / 7) and agreement == pytest.approx(5 / 6)
    # a tie admits both samples at its value: 0.95 cannot exit without its disagreeing twin
    assert calibrate_threshold(np.array([0.99, 0.95, 0.95]), np.array([True, True, False]), 0.99)[:2] == (0.99, 1 / 3)
    assert calibrate_threshold(np.array([0.9, 0.8]), np.array([False, True]), 0.99) == (float("inf"), 0.0, 1.0)


def test_confidence_of_logits_and_of_probabilities() -> None:
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    assert confidence_kind(logits) == "softmax"
    np.testing.assert_allclose(confidence(logits, "softmax"), [np.e**2 / (np.e**2 + 2), 1 / 3])
    probs = np.array([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]], np.float32)
    assert confidence_kind(probs) == "probability"
    np.testing.assert_allclose(confidence(probs, "probability"), [0.7, 0.4], rtol=1e-6)


def test_threshold_keeps_agreement_with_the_full_model_at_the_guard(bundle: PlanBundle, models,
                                                                    calibration: np.ndarray) -> None:
    spec = bundle.cascade
    assert spec is not None and spec.source == "small.onnx" and spec.output == "logits"
    assert spec.min_top1_agreement == 0.99 and spec.samples == 64 and spec.confidence == "softmax"
    assert spec.agreement >= 0.99 and 0.5 < spec.exit_rate < 1.0  # (the early exit is unsure of some)
    assert spec.device_ms is not None and spec.full_device_ms is not None
    assert 0 < spec.device_ms < spec.full_device_ms  # measured: the first half of the network, and a head
    # independently: the bundle's small model against the full model on the calibration images
    full = _session(models[0]).run(None, {"input": calibration})[0]
    small = _session(bundle.cascade_path).run(None, {"input": calibration})[0]
    conf = confidence(small, "softmax")
    agree = full.argmax(1) == small.argmax(1)
    exits = conf >= spec.threshold
    assert exits.mean() == pytest.approx(spec.exit_rate) and agree[exits].mean() >= 0.99
    # the lowest such threshold: admitting the next less confident samples breaks the guard
    below = conf[~exits].max()
    assert agree[conf >= below].mean() < 0.99


def test_cascade_files_are_plan_data(bundle: PlanBundle, tmp_path: Path) -> None:
    files = bundle.manifest["files"]
    assert bundle.manifest["cascade"] == "cascade/cascade.json" and {"cascade/cascade.json", "cascade/model.onnx"} <= set(files)
    import json
    import shutil

    copy = Path(shutil.copytree(bundle.root, tmp_path / "b"))
    doc = json.loads((copy / "cascade/cascade.json").read_text())
    doc["threshold"] = 0.0  # answer everything on the device: a tampered bundle
    (copy / "cascade/cascade.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="cascade/cascade.json"):
        load_bundle(copy)


def test_int8_cascade_is_the_planners_own_int8_model(models, calibration: np.ndarray) -> None:
    full, _ = models
    b = build_bundle(full, full.parent / "int8.bundle", cascade="int8", calibration={"input": calibration},
                     profile=False)
    spec = b.cascade
    assert spec is not None and spec.source == "int8" and spec.device_ms is None  # (no profiling: no times)
    assert spec.agreement >= 0.99 and spec.exit_rate >= 0.9  # int8 agrees with fp32 on nearly everything
    ops = {n.op_type for n in onnx.load(str(b.cascade_path)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def _classifier(path: Path, *, name: str = "input", size: int = 64, out: str = "logits", classes: int = 10) -> Path:
    """A tiny hand-built classifier: global average pooling and a linear layer."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", [name], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"]),
         helper.make_node("Gemm", ["flat", "w", "b"], [out])],
        "tiny",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(rng.normal(size=(3, classes)).astype(np.float32), "w"),
         numpy_helper.from_array(np.zeros(classes, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "image"}, "inputs ['image'] are not the model's ['input']"),
    ({"size": 32}, "input 'input' is FP32[-1, 3, 32, 32], the model's is FP32[-1, 3, 64, 64]"),
    ({"out": "scores"}, "lacks the model's output 'logits'"),
    ({"classes": 5}, "output 'logits' is FP32[-1, 5], the model's is FP32[-1, 10]"),
])
def test_a_cascade_model_that_does_not_match_is_refused_in_one_line(models, tmp_path: Path, kwargs: dict,
                                                                    message: str) -> None:
    small = _classifier(tmp_path / "bad.onnx", **kwargs)
    with pytest.raises(InvalidArgument) as info:
        build_bundle(models[0], tmp_path / "b", cascade=small, profile=False)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "b").exists()


def test_plan_cli_refuses_a_mismatched_cascade(models, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from splitgate.cli import main

    small = _classifier(tmp_path / "bad.onnx", size=32)
    assert main(["plan", str(models[0]), "-o", str(tmp_path / "b"), "--no-profile", "--cascade", str(small)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cascade model" in err[0] and "32, 32" in err[0]


def test_zoo_cli_writes_an_early_exit_model_that_plans_as_a_cascade(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from splitgate.cli import main

    assert main(["zoo", "lstm", "-o", str(tmp_path / "l.onnx"), "--early-exit", str(tmp_path / "s.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image classifiers" in err[0] and not (tmp_path / "l.onnx").exists()
    full, small, cal = tmp_path / "m.onnx", tmp_path / "small.onnx", tmp_path / "cal.npz"
    assert main(["zoo", "mobilenet", "-o", str(full), "--early-exit", str(small), "--calibration-out", str(cal),
                 "--calibration-samples", "8"]) == 0
    out = capsys.readouterr().out
    assert f"--cascade {small}" in out and f"--calibration {cal}" in out
    assert np.load(cal)["input"].shape == (8, 3, 64, 64)
    b = build_bundle(full, tmp_path / "b", cascade=small, calibration=str(cal), profile=False)
    assert b.cascade is not None and 0.0 <= b.cascade.threshold


# -- the edge ----------------------------------------------------------------------------------


def test_offline_gateway_exits_on_confident_inputs_and_falls_through_on_unsure_ones(bundle: PlanBundle,
                                                                                  models) -> None:
    spec = bundle.cascade
    full = _session(models[0])
    small = _session(bundle.cascade_path)
    images = _held_out(24)
    confident = [x[None] for x in images if is_confident({"logits": small.run(None, {"input": x[None]})[0]}, spec)]
    unsure = list(_noise(3))
    assert len(confident) >= 12 and all(not is_confident(dict(zip(["logits"], small.run(None, {"input": x}))), spec)
                                        for x in unsure)
    # no cloud: the path is the full model on the device. The plan's figures decide (learning
    # this machine's speed would weigh sub-millisecond runs whose ratio is session overhead)
    with Gateway([bundle.root], config=GatewayConfig(learn_device=False)) as gw:
        for x in confident:
            r = gw.infer(MODEL, {"input": x})
            assert (r.trace.cascade, r.trace.partition) == ("exit", "cascade")
            np.testing.assert_array_equal(r.outputs["logits"], small.run(None, {"input": x})[0])
            assert r.outputs["logits"].argmax() == full.run(None, {"input": x})[0].argmax()
        for x in unsure:
            r = gw.infer(MODEL, {"input": x})
            assert (r.trace.cascade, r.trace.partition) == ("through", "device")
            np.testing.assert_allclose(r.outputs["logits"], full.run(None, {"input": x})[0], rtol=1e-4, atol=1e-5)
        # a partition asked for runs as asked: no cascade in front of it
        assert gw.infer(MODEL, {"input": confident[0]}, partition="device").trace.cascade is None
        snap = gw.metrics.snapshot()
        assert snap[f"splitgate_cascade_total{{model={MODEL},outcome=exit}}"] == len(confident)
        assert snap[f"splitgate_cascade_total{{model={MODEL},outcome=through}}"] == len(unsure)
        assert b"splitgate_cascade_total" in gw.metrics.prometheus()


def test_a_gateway_does_not_run_a_tampered_cascade(bundle: PlanBundle, models, tmp_path: Path) -> None:
    """The Gateway loads a bundle with corrupt files (refusing what they hold): a small model
    changed on disk is not run, the path answers."""
    import shutil

    copy = Path(shutil.copytree(bundle.root, tmp_path / "b"))
    shutil.copy(models[0], copy / "cascade/model.onnx")  # another model in the small model's place
    x = _held_out(1)
    with Gateway([copy], config=GatewayConfig(learn_device=False)) as gw:
        r = gw.infer(MODEL, {"input": x})
        assert (r.trace.cascade, r.trace.partition) == (None, "device")
        assert gw.metrics.snapshot()[f"splitgate_cascade_total{{model={MODEL},outcome=error}}"] == 1


def test_edge_serve_answers_the_cascade_parameter(bundle: PlanBundle) -> None:
    spec = bundle.cascade
    small = _session(bundle.cascade_path)
    sure = next(x[None] for x in _held_out(16) if is_confident(
        {"logits": small.run(None, {"input": x[None]})[0]}, spec))
    with Gateway([bundle.root], config=GatewayConfig(learn_device=False)) as gw:
        server, port, _ = serve_edge(gw, port=0)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                said = []
                for x in (sure, _noise(1)[0]):
                    request = pb.ModelInferRequest(model_name=MODEL)
                    codec.add_inputs(request, {"input": x})
                    params = codec.read_params(stub.ModelInfer(request).parameters)
                    said.append((params[contract.CASCADE], params[contract.PARTITION]))
        finally:
            server.stop(0)
    assert said == [("exit", "cascade"), ("through", "device")]


def test_the_cascade_is_skipped_where_it_does_not_pay(bundle: PlanBundle) -> None:
    """A fast (loopback) cloud and a slow device: the small model costs more than sending the input."""
    from splitgate.cloud.baseline import start_baseline

    # the device runs as slow as planned (device legs padded to the plan's times), whatever the load here
    config = GatewayConfig(device_time_from_profile=True, learn_device=False)
    with start_baseline([str(bundle.root)]) as server, Gateway([bundle.root], cloud=server.address,
                                                               config=config) as gw:
        x = _held_out(4)
        traces = [gw.infer(MODEL, {"input": xi[None]}).trace for xi in x]
        assert all(t.partition != "device" and t.cascade is None and t.fallback is None for t in traces), traces
        choice = gw._core.decisions.cascade_choice(  # noqa: SLF001 - what the core weighed
            gw.bundle(MODEL), traces[-1].partition, gw._core.request_costs(gw.bundle(MODEL), {"input": x[:1]}))
        assert not choice.run and choice.why == "does not pay" and choice.expected_ms > choice.path_ms
        snap = gw.metrics.snapshot()
        assert snap[f"splitgate_cascade_total{{model={MODEL},outcome=skipped}}"] == len(x)
    # the same plan and device offline: the path is the slow full model, and the cascade pays
    with Gateway([bundle.root], config=GatewayConfig(device_time_from_profile=True, learn_device=False)) as gw:
        assert gw.infer(MODEL, {"input": x[:1]}).trace.cascade in ("exit", "through")


def _core_with_link(uplink_mbps: float, rtt_ms: float) -> DecisionCore:
    """A decision core whose link monitor measured this link (one probe)."""
    now = [0.0]
    core = DecisionCore(GatewayConfig(), clock=lambda: now[0])
    spec = core.probe_started()
    send_ms = rtt_ms + spec.send_bytes * 8 / (uplink_mbps * 1e3)
    core.probe_measured(spec, [rtt_ms] * spec.round_trips, [send_ms] * spec.sends)
    core.probe_ended()
    return core


def test_decision_core_weighs_the_cascade_against_the_path(bundle: PlanBundle) -> None:
    costs = bundle.costs()
    # CAT1-like link: the device runs the full model, and the cascade pays (exits skip most of it)
    slow = _core_with_link(0.13, 300.0)
    pid = slow.choose(bundle, costs).partition
    choice = slow.cascade_choice(bundle, pid, costs)
    assert choice.run and choice.why == "pays"
    assert choice.expected_ms == pytest.approx(cascade_expected_ms(choice.small_ms, choice.exit_rate, choice.path_ms))
    # a LAN: the cloud answers faster than the small model runs
    fast = _core_with_link(1000.0, 0.5)
    pid = fast.choose(bundle, costs).partition
    assert bundle.partition(pid).kind != "device"
    assert not fast.cascade_choice(bundle, pid, costs).run
    # offline the path is the device, whatever the link
    assert fast.cascade_choice(bundle, "device", costs).run


def test_the_live_exit_rate_turns_the_cascade_off_when_it_stops_exiting(bundle: PlanBundle) -> None:
    rates = ExitRates(prior_requests=10)
    assert rates.rate("m", "d", 0.8) == 0.8
    for _ in range(10):
        rates.observe("m", "d", False)
    assert rates.rate("m", "d", 0.8) == pytest.approx(0.4)
    core = _core_with_link(0.13, 300.0)
    costs = bundle.costs()
    assert core.cascade_choice(bundle, "device", costs).run
    for _ in range(200):  # the small model no longer answers anything (drifted inputs)
        core.cascade_done(bundle, False, 1.0, None)
    choice = core.cascade_choice(bundle, "device", costs)
    assert choice.exit_rate < 0.1 and not choice.run and choice.why == "does not pay"
    core.forget(MODEL)  # a new plan: the planned rate again
    assert core.cascade_choice(bundle, "device", costs).exit_rate == pytest.approx(bundle.cascade.exit_rate)


def test_a_cascade_turned_off_by_its_live_rate_is_still_tried_and_comes_back(bundle: PlanBundle) -> None:
    """Skipped for a low live exit rate, the cascade would never run again and its rate
    never recover: every EXPLORE_EVERY-th skip runs it; once inputs are sure again it pays."""
    from splitgate.edge._cascade import EXPLORE_EVERY
    from splitgate.planner import Conditions

    core = _core_with_link(0.13, 300.0)
    costs = bundle.costs()
    for _ in range(200):  # the small model stops answering (drifted inputs)
        core.cascade_done(bundle, False, 1.0, None)
    whys = [core.cascade_choice(bundle, "device", costs).why for _ in range(2 * EXPLORE_EVERY)]
    assert whys.count("explore") == 2 and whys[EXPLORE_EVERY - 1] == whys[-1] == "explore", whys
    assert set(whys) == {"does not pay", "explore"}
    tries = 0
    while (c := core.cascade_choice(bundle, "device", costs)).why != "pays":  # inputs are sure again: each try exits
        if c.run:
            core.cascade_done(bundle, True, 1.0, None)
            tries += 1
        assert tries < 400, f"the live rate never recovered: {c}"  # (~RATE_WINDOW exits: the window)
    assert core.cascade_choice(bundle, "device", costs).run
    # an oracle's weighing (conditions given: the analytic engine, benchmarks) never explores
    oracle = Conditions(uplink_mbps=0.13, rtt_ms=300.0)
    for _ in range(200):
        core.cascade_done(bundle, False, 1.0, None)
    assert {core.cascade_choice(bundle, "device", costs, conditions=oracle).why
            for _ in range(2 * EXPLORE_EVERY)} == {"does not pay"}


# -- the device's own time for the small model (splitgate profile / refit) ------------------------


def _with_cascade_ms(dp, ms: float):
    """``dp`` with its small-model timing replaced by one of ``ms`` (a device on which the
    cascade model runs that fast or slow against the rest: a slowdown on the cascade model alone)."""
    import copy

    from splitgate.planner import Timing

    out = copy.deepcopy(dp)
    for b in out.buckets:
        scale = b.elements / out.buckets[0].elements
        b.cascade = Timing(ms * scale, ms * scale, ms * scale, b.cascade.runs, ms * scale)
    return out


def test_profile_times_the_cascade_and_refit_applies_it(bundle: PlanBundle, tmp_path: Path) -> None:
    import shutil

    from splitgate.planner import measure_device, refit_bundle
    from splitgate.planner._refit import refit_table

    copy = Path(shutil.copytree(bundle.root, tmp_path / "b"))
    dp = measure_device(copy, threads=1, warmup=1, repeats=3)
    assert dp.cascade_sha256 == bundle.manifest["files"]["cascade/model.onnx"]
    assert all(b.cascade is not None and b.cascade.median_ms > 0 for b in dp.buckets)
    full_ms = dp.partition_ms("device")
    core = DecisionCore(GatewayConfig(learn_device=False), clock=lambda: 0.0)

    def offline_choice(b: PlanBundle):
        return core.cascade_choice(b, "device", b.costs())

    # the device runs the small model at a tenth of the full model's time: the cascade pays offline
    fast = refit_bundle(copy, _with_cascade_ms(dp, 0.1 * full_ms))
    assert fast.plan_digest == bundle.plan_digest and fast.profile["cascade"]["source"] == "measured"
    choice = offline_choice(fast)
    assert choice.planned_small_ms == pytest.approx(0.1 * full_ms, abs=1e-4)  # the device's time, not the plan's
    assert choice.run and choice.why == "pays"
    # the same device, the small model slowed 3x past the full model: it no longer pays
    slow = refit_bundle(copy, _with_cascade_ms(dp, 3.0 * full_ms))
    choice = offline_choice(slow)
    assert choice.planned_small_ms == pytest.approx(3.0 * full_ms, rel=1e-3, abs=1e-4)
    assert not choice.run and choice.why == "does not pay"
    table = refit_table(fast, slow)
    row = table.columns[0]._cells.index("cascade")
    was, now, source = (c._cells[row] for c in table.columns[1:4])
    # (the table prints 3 decimals of the refit's stored, rounded times: compare as numbers)
    assert (float(was), float(now), source) == (
        pytest.approx(0.1 * full_ms, abs=2e-3), pytest.approx(3.0 * full_ms, abs=2e-3), "measured")
    # the Gateway weighs it too: offline, a slowed small model is skipped
    with Gateway([copy], config=GatewayConfig(learn_device=False)) as gw:
        assert gw.infer(MODEL, {"input": _held_out(1)}).trace.cascade is None
        assert gw.metrics.snapshot()[f"splitgate_cascade_total{{model={MODEL},outcome=skipped}}"] == 1


def test_plan_with_a_device_profile_takes_the_devices_cascade_time(bundle: PlanBundle, models, calibration,
                                                                    tmp_path: Path) -> None:
    """``plan --device-profile`` of a profile that timed this small model (``splitgate
    profile`` of a bundle carrying it) plans with the device's own time for it; a
    profile that did not says so in a note and keeps this machine's ratio."""
    from splitgate.planner import measure_device

    dp = measure_device(bundle.root, threads=1, warmup=1, repeats=3)
    full_ms = dp.partition_ms("device")
    timed = _with_cascade_ms(dp, 0.05 * full_ms).save(tmp_path / "timed.json")
    kwargs = dict(cascade=models[1], calibration={"input": calibration}, encodings=("raw",), repeats=3, warmup=1,
                  max_candidates=2, reference_cuts=1)
    b = build_bundle(models[0], tmp_path / "timed.bundle", device_profile=timed, **kwargs)
    assert b.cascade.device_ms == pytest.approx(0.05 * full_ms, abs=1e-4)  # (stored rounded to 4 decimals)
    assert not any("no timing of this cascade model" in n for n in b.plan_profile.notes)
    doc = dp.to_dict()  # the same device, timed before cascades were: no entry
    del doc["model"]["cascade_sha256"]
    for bucket in doc["buckets"]:
        bucket.pop("cascade", None)
    (tmp_path / "untimed.json").write_text(json.dumps(doc))
    b = build_bundle(models[0], tmp_path / "untimed.bundle", device_profile=tmp_path / "untimed.json", **kwargs)
    assert any("no timing of this cascade model" in n for n in b.plan_profile.notes), b.plan_profile.notes
    assert b.cascade.device_ms != pytest.approx(0.05 * full_ms, abs=1e-4)


def test_refit_with_a_profile_without_the_cascade_keeps_the_plan_ratio(bundle: PlanBundle, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    from splitgate.planner import DeviceProfile, measure_device, refit_bundle
    from splitgate.planner._refit import refit_table

    copy = Path(shutil.copytree(bundle.root, tmp_path / "b"))
    dp = measure_device(copy, threads=1, warmup=1, repeats=3)
    refit_bundle(copy, _with_cascade_ms(dp, 0.1 * dp.partition_ms("device")))  # (a measured entry to replace)
    before = load_bundle(copy)
    doc = dp.to_dict()  # as written before cascades were timed: no keys
    del doc["model"]["cascade_sha256"]
    for b in doc["buckets"]:
        del b["cascade"]
    with caplog.at_level("WARNING", logger="splitgate.planner._refit"):
        after = refit_bundle(copy, DeviceProfile.from_dict(doc))
    assert after.plan_digest == bundle.plan_digest and "cascade" not in after.profile
    spec = after.cascade
    costs = after.costs()
    choice = DecisionCore(GatewayConfig(learn_device=False)).cascade_choice(after, "device", costs)
    assert choice.planned_small_ms == pytest.approx(spec.device_ms * costs["device"]["device_ms"] / spec.full_device_ms)
    notes = [n for n in after.profile["notes"] if "cascade" in n]
    assert len(notes) == 1 and "has no cascade measurement" in notes[0] and "\n" not in notes[0]
    assert "splitgate profile" in notes[0] and notes[0] in caplog.text
    table = refit_table(before, after)
    assert table.caption == notes[0]
    row = table.columns[0]._cells.index("cascade")
    assert table.columns[3]._cells[row] == "plan ratio"
    # a profile that timed another cascade model is not this one's either
    dp.cascade_sha256 = "0" * 64
    again = refit_bundle(copy, dp)
    assert "cascade" not in again.profile
    assert any("timed another cascade model" in n for n in again.profile["notes"])


# -- per-row exits -------------------------------------------------------------------------


def _rows_by_confidence(bundle: PlanBundle, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Held-out images the small model is clearly sure of, alone, and noise it is clearly unsure of."""
    spec = bundle.cascade
    small = _session(bundle.cascade_path)

    def conf(x: np.ndarray) -> float:
        return float(confidence(small.run(None, {"input": x[None]})[0], spec.confidence)[0])

    sure = [x for x in _held_out(48) if conf(x) >= spec.threshold + 0.02][:n]
    unsure = [x[0] for x in _noise(8) if conf(x[0]) < spec.threshold - 0.02][:n]
    assert len(sure) == n and len(unsure) == n
    return sure, unsure


def _alone(path: Path | str, x: np.ndarray) -> np.ndarray:
    return _session(path).run(None, {"input": x[None]})[0][0]


def test_a_batch_exits_row_by_row(bundle: PlanBundle, models) -> None:
    """A batch of sure and unsure rows: the sure ones are the small model's, the others the path's,
    in the request's order, each as that row alone through its route."""
    sure, unsure = _rows_by_confidence(bundle, 3)
    order = ["s", "u", "s", "s", "u", "u"]
    it = {"s": iter(sure), "u": iter(unsure)}
    rows = [next(it[k]) for k in order]
    batch = np.stack(rows)
    with Gateway([bundle.root], config=GatewayConfig(learn_device=False)) as gw:
        r = gw.infer(MODEL, {"input": batch})
        t = r.trace
        assert (t.cascade, t.cascade_rows_exited, t.partition) == ("partial", 3, "device")
        assert r.outputs["logits"].shape == (6, 10)
        for i, (kind, x) in enumerate(zip(order, rows)):
            want = _alone(bundle.cascade_path if kind == "s" else models[0], x)
            np.testing.assert_allclose(r.outputs["logits"][i], want, rtol=1e-4, atol=1e-4, err_msg=f"row {i} ({kind})")
        # the small model's time is in the device time, with the path's on the 3 unsure rows
        assert t.device_ms > 0
        # all sure, none sure: as before
        r = gw.infer(MODEL, {"input": np.stack(sure)})
        assert (r.trace.cascade, r.trace.cascade_rows_exited, r.trace.partition) == ("exit", 3, "cascade")
        r = gw.infer(MODEL, {"input": np.stack(unsure)})
        assert (r.trace.cascade, r.trace.cascade_rows_exited, r.trace.partition) == ("through", 0, "device")
        np.testing.assert_allclose(r.outputs["logits"], _session(models[0]).run(None, {"input": np.stack(unsure)})[0],
                                   rtol=1e-4, atol=1e-4)
        snap = gw.metrics.snapshot()
        for outcome in ("partial", "exit", "through"):
            assert snap[f"splitgate_cascade_total{{model={MODEL},outcome={outcome}}}"] == 1, outcome
        # the live exit rate counts rows: 3 of 6, 3 of 3, 0 of 3
        assert gw._core.decisions.cascade_rates.runs(MODEL, bundle.plan_digest) == (12, 6)


def test_edge_serve_says_partial(bundle: PlanBundle) -> None:
    sure, unsure = _rows_by_confidence(bundle, 1)
    with Gateway([bundle.root], config=GatewayConfig(learn_device=False)) as gw:
        server, port, _ = serve_edge(gw, port=0)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                request = pb.ModelInferRequest(model_name=MODEL)
                codec.add_inputs(request, {"input": np.stack([unsure[0], sure[0]])})
                reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
        finally:
            server.stop(0)
    params = codec.read_params(reply.parameters)
    assert (params[contract.CASCADE], params[contract.PARTITION]) == ("partial", "device")
    assert codec.read_outputs(reply)["logits"].shape == (2, 10)


def test_exit_rates_count_rows() -> None:
    rates = ExitRates(prior_requests=10)
    rates.observe("m", "d", False, rows=10, rows_exited=5)
    rates.observe("m", "d", True, rows=4)
    assert rates.runs("m", "d") == (14, 9)
    assert rates.rate("m", "d", 0.5) == pytest.approx((10 * 0.5 + 9) / 24)
    assert cascade_expected_ms(2.0, 0.75, 40.0) == pytest.approx(12.0)  # a quarter of the rows go on


def _not_batch_major(path: Path, scale: float) -> Path:
    """A classifier with a second output that is not batch-major: the batch's mean logits ``[1, 10]``."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(3, 10)).astype(np.float32) * scale
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"]),
         helper.make_node("Gemm", ["flat", "w", "b"], ["logits"]),
         helper.make_node("ReduceMean", ["logits"], ["batch_mean"], axes=[0], keepdims=1)],
        "not_batch_major",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10]),
         helper.make_tensor_value_info("batch_mean", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(10, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_a_model_that_is_not_batch_major_exits_all_or_nothing(tmp_path: Path) -> None:
    """Its second output mixes the rows: the unsure rows cannot be answered alone, so a batch
    with one unsure row takes the path whole (and exits whole when every row is sure)."""
    full = _not_batch_major(tmp_path / "full.onnx", 1.0)
    small = _not_batch_major(tmp_path / "small.onnx", 2.0)  # same argmax, sharper: a different answer
    rng = np.random.default_rng(5)
    cal = (rng.normal(size=(32, 3, 8, 8)) + rng.choice([-4.0, 4.0], size=(32, 3, 1, 1))).astype(np.float32)
    b = build_bundle(full, tmp_path / "b", cascade=small, calibration={"input": cal}, profile=False)
    assert b.cascade.exit_rate == 1.0 and b.cascade.threshold <= 1.0
    sure, unsure = cal[:2], np.zeros((1, 3, 8, 8), np.float32)  # zeros: uniform logits, confidence 0.1
    with Gateway([b.root], config=GatewayConfig(learn_device=False)) as gw:
        mixed = np.concatenate([sure[:1], unsure, sure[1:]])
        r = gw.infer("full", {"input": mixed})
        assert (r.trace.cascade, r.trace.cascade_rows_exited, r.trace.partition) == ("through", 0, "device")
        want = _session(full).run(None, {"input": mixed})
        np.testing.assert_allclose(r.outputs["logits"], want[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r.outputs["batch_mean"], want[1], rtol=1e-5, atol=1e-5)
        r = gw.infer("full", {"input": sure})
        assert (r.trace.cascade, r.trace.cascade_rows_exited, r.trace.partition) == ("exit", 2, "cascade")
        np.testing.assert_allclose(r.outputs["batch_mean"], _session(small).run(None, {"input": sure})[1], rtol=1e-5)
        assert gw._core.decisions.cascade_rates.runs("full", b.plan_digest) == (5, 2)


def test_partial_exit_sends_only_the_unsure_rows_to_the_cloud(bundle: PlanBundle, models,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The path is the loopback cloud (where the cascade would not pay: the choice is forced to run
    it, the rest is real): the unsure rows travel over gRPC as a smaller batch."""
    from dataclasses import replace

    from splitgate.cloud.baseline import start_baseline

    sure, unsure = _rows_by_confidence(bundle, 2)
    rows = [unsure[0], sure[0], sure[1], unsure[1]]
    config = GatewayConfig(learn_device=False)
    with start_baseline([str(bundle.root)]) as server, Gateway([bundle.root], cloud=server.address,
                                                               config=config) as gw:
        core = gw._core.decisions
        weigh = core.cascade_choice
        monkeypatch.setattr(core, "cascade_choice", lambda *a, **k: replace(weigh(*a, **k), run=True))
        r = gw.infer(MODEL, {"input": np.stack(rows)})
        t = r.trace
        assert (t.cascade, t.cascade_rows_exited) == ("partial", 2) and t.partition != "device"
        whole = gw.infer(MODEL, {"input": np.stack(rows)}, partition=t.partition)  # (asked for: no cascade)
        assert whole.trace.cascade is None and whole.trace.fallback is None
        assert t.fallback is None and 0 < t.bytes_sent < whole.trace.bytes_sent  # two rows' worth, not four
        for i, x in enumerate(rows):
            want = _alone(bundle.cascade_path if i in (1, 2) else models[0], x)
            np.testing.assert_allclose(r.outputs["logits"][i], want, rtol=1e-4, atol=1e-4, err_msg=f"row {i}")
