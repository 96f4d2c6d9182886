"""The analytic engine's cascade and ``joint`` policy (issue 16.4).

A hand-built classifier stands in for a real one so that this runs in seconds:
the full model is a chain of 512-wide MatMul+Relu layers (identity weights on
non-negative inputs, so it computes exactly its last Gemm) and then a linear
head; the small model is that head alone with perturbed weights, so it agrees
with the full model except on inputs whose top two logits are close -- the
ones the calibrated threshold keeps on the path. Planned for a device 200x
slower than this machine, the chain costs tens of ms there and the head next
to nothing, so at a slow uplink the cascade pays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from splitgate.experiments._records import summarize
from splitgate.experiments.analytic import CASCADE_PARTITION, simulate_policy
from splitgate.experiments.runner import reproduction_rows, run_experiments
from splitgate.experiments.spec import ExperimentSpec, build_trace
from splitgate.planner import Conditions, PlanBundle, build_bundle

WIDTH, CLASSES, LAYERS = 512, 10, 6


def _head(rng: np.random.Generator) -> np.ndarray:
    return (rng.normal(0.0, 1.0, (WIDTH, CLASSES)) / np.sqrt(WIDTH)).astype(np.float32)


def _classifier(path: Path, head: np.ndarray, layers: int) -> Path:
    """``x [batch, WIDTH] >= 0`` -> ``layers`` identity MatMul+Relu -> Gemm(head) -> ``logits``."""
    nodes, inits, cur = [], [numpy_helper.from_array(head, "head")], "input"
    eye = np.eye(WIDTH, dtype=np.float32)
    for i in range(layers):
        inits.append(numpy_helper.from_array(eye, f"w{i}"))
        nodes += [helper.make_node("MatMul", [cur, f"w{i}"], [f"m{i}"]), helper.make_node("Relu", [f"m{i}"], [f"r{i}"])]
        cur = f"r{i}"
    nodes.append(helper.make_node("MatMul", [cur, "head"], ["logits"]))
    graph = helper.make_graph(
        nodes, path.stem, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> PlanBundle:
    d = tmp_path_factory.mktemp("joint")
    rng = np.random.default_rng(0)
    head = _head(rng)
    full = _classifier(d / "full.onnx", head, LAYERS)
    small = _classifier(d / "small.onnx", (head + 0.05 * _head(rng)).astype(np.float32), 0)
    calibration = rng.uniform(0.0, 4.0, (256, WIDTH)).astype(np.float32)
    return build_bundle(full, d / "full.bundle", model_name="joint", cascade=small,
                        calibration={"input": calibration}, encodings=("raw",), repeats=3, warmup=1,
                        reference_cuts=1, max_candidates=2, device_slowdown=200.0)


def _spec(profile: str, policies: list[str], seconds: float = 60.0, **link: float) -> ExperimentSpec:
    trace = build_trace({"kind": "constant", "profile": profile, "duration_s": seconds, **link})
    return ExperimentSpec(name=f"joint_{profile}", model="joint.onnx", trace=trace,
                          policies=policies, interval_ms=0.0, gateway={"hedge": False, "deadline_ms": 60000})


def test_the_bundle_has_a_cascade_that_exits_on_some_inputs(bundle: PlanBundle) -> None:
    spec = bundle.cascade
    assert spec is not None and 0.2 < spec.exit_rate < 1.0, spec
    assert spec.agreement >= 0.99


def test_joint_runs_the_cascade_where_the_decision_core_says_it_pays(bundle: PlanBundle) -> None:
    from splitgate.edge import DecisionCore

    spec = _spec("cat1", ["mincut", "joint", "adaptive"])
    mincut = simulate_policy(spec, bundle, "mincut")
    joint = simulate_policy(spec, bundle, "joint")
    adaptive = simulate_policy(spec, bundle, "adaptive")
    assert all(r.partition != CASCADE_PARTITION for r in mincut)
    exits = [r for r in joint if r.partition == CASCADE_PARTITION]
    through = [r for r in joint if r.partition != CASCADE_PARTITION]
    assert exits and through  # some answered on the device, the others took the path after the small model
    assert abs(len(exits) / len(joint) - bundle.cascade.exit_rate) < 0.15
    assert {r.partition for r in through} == {r.partition for r in mincut}  # the same path behind it
    # an exit costs the small model's time, a request it did not answer that time more than the path
    small = max(r.latency_ms for r in exits)
    assert small < min(r.latency_ms for r in mincut)
    assert min(r.latency_ms for r in through) >= min(r.latency_ms for r in mincut)
    # what the core weighed at the true link: the same arithmetic as the simulated mean
    link = Conditions(uplink_mbps=spec.trace.at(0).uplink_mbps, downlink_mbps=spec.trace.at(0).downlink_mbps,
                      rtt_ms=spec.trace.at(0).rtt_ms)
    path = mincut[0].partition
    choice = DecisionCore().cascade_choice(bundle, path, bundle.costs(), conditions=link)
    assert choice.run and choice.why == "pays" and choice.expected_ms < choice.path_ms
    assert summarize(joint)[0].mean_ms < summarize(mincut)[0].mean_ms
    assert summarize(joint)[0].mean_ms == pytest.approx(choice.expected_ms, rel=0.2)
    # adaptive runs it too (the Gateway's rule under its own link estimate)
    assert any(r.partition == CASCADE_PARTITION for r in adaptive)


def test_joint_skips_the_cascade_where_it_does_not_pay(bundle: PlanBundle) -> None:
    """A LAN: the cloud answers sooner than the small model's expected saving."""
    from splitgate.edge import DecisionCore

    spec = _spec("wifi", ["mincut", "joint"], seconds=5.0, uplink_mbps=1000.0, downlink_mbps=1000.0, rtt_ms=0.5,
                 jitter_ms=0.0)
    link = spec.trace.at(0)
    path = bundle.choose(Conditions(uplink_mbps=link.uplink_mbps, downlink_mbps=link.downlink_mbps,
                                    rtt_ms=link.rtt_ms))
    choice = DecisionCore().cascade_choice(
        bundle, path, bundle.costs(),
        conditions=Conditions(uplink_mbps=link.uplink_mbps, downlink_mbps=link.downlink_mbps, rtt_ms=link.rtt_ms))
    if choice.run:
        pytest.skip(f"the cascade pays even on this link here ({choice})")
    joint = simulate_policy(spec, bundle, "joint")
    mincut = simulate_policy(spec, bundle, "mincut")
    assert [r.partition for r in joint] == [r.partition for r in mincut]
    assert CASCADE_PARTITION not in {r.partition for r in joint}


def test_reproduction_rows_carry_the_joint_column(bundle: PlanBundle) -> None:
    spec = _spec("cat1", ["device", "cloud", "mincut", "joint"], seconds=30.0)
    records = [r for p in spec.policies for r in simulate_policy(spec, bundle, p)]
    (row,) = reproduction_rows({"cat1": summarize(records)}, "analytic")
    assert row["joint_ms"] is not None and row["joint_ms"] < row["split_ms"]
    assert "cascade" in row["joint_partition"]
    assert row["joint_speedup_vs_edge"] == pytest.approx(row["edge_ms"] / row["joint_ms"], rel=0.02)


def test_the_live_engine_refuses_the_joint_policy(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="analytic engine only"):
        run_experiments([_spec("cat1", ["device", "joint"])], engines=("live",), out_dir=tmp_path)


def test_an_int8_cascade_is_timed_as_the_device_int8_partition_it_is(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``--cascade int8`` with a kept ``device~int8``: one model, one planned time; so the cascade
    never "pays" in front of ``device~int8`` itself (it would run the same model twice)."""
    from splitgate.edge import DecisionCore

    rng = np.random.default_rng(1)
    full = _classifier(tmp_path / "full.onnx", _head(rng), LAYERS)
    b = build_bundle(full, tmp_path / "q.bundle", model_name="q", quantize=True, cascade="int8",
                     calibration={"input": rng.uniform(0.0, 4.0, (64, WIDTH)).astype(np.float32)},
                     encodings=("raw",), repeats=3, warmup=1, reference_cuts=1, max_candidates=1,
                     device_slowdown=200.0, min_top1_agreement=0.9)  # (int8 flips a near tie of random logits)
    assert "device~int8" in b.partitions, sorted(b.partitions)
    planned = b.profile["partitions"]
    assert b.cascade.device_ms == pytest.approx(planned["device~int8"]["device_ms"], rel=1e-3)
    assert b.cascade.full_device_ms == pytest.approx(planned["device"]["device_ms"], rel=1e-3)
    c = Conditions(uplink_mbps=0.13, rtt_ms=150.0)
    assert not DecisionCore().cascade_choice(b, "device~int8", b.costs(), conditions=c).run
    # even where it answers every input: the same model, the same time, a tie
    from dataclasses import replace

    every = replace(b.cascade, exit_rate=1.0)
    monkeypatch.setattr(type(b), "cascade", property(lambda self: every))
    assert not DecisionCore().cascade_choice(b, "device~int8", b.costs(), conditions=c).run
    # the analytic engine runs device~int8 on the device alone (no cloud leg), at its planned time
    from splitgate.experiments import analytic

    monkeypatch.setattr(analytic._Sim, "_choose", lambda self: ("device~int8", 0.0))
    recs = simulate_policy(_spec("cat1", ["mincut"], seconds=5.0), b, "mincut")
    assert recs and all(r.partition == "device~int8" and r.bytes_sent == 0 and r.network_ms == 0.0 for r in recs)
    assert recs[0].latency_ms == pytest.approx(planned["device~int8"]["device_ms"])
