"""Staged rollout, A/B and shadow runs (issue 17 item 3).

Unit tests of the I/O-free core (:mod:`splitgate.edge._rollout`) with fakes;
then real Gateways with real onnxruntime bundles of small hand-built
classifiers: a stable version and candidates that differ in weights, fail on
5% of inputs (a Gather whose index comes from the input's value: onnxruntime's
own out-of-bounds error), or only run slower (the same answer after extra
heavy MatMuls); and ``edge serve`` over real gRPC.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from _models import IR_VERSION, OPSET, save
from splitgate import codec, contract
from splitgate.edge import AsyncGateway, Gateway, Rollout, RolloutRule, RolloutStats, VersionStats, judge
from splitgate.edge._rollout import JUDGE_EVERY, outputs_agree, sticky_fraction, version_of
from splitgate.edge._serve import serve_edge
from splitgate.errors import BundleError, FailedPrecondition, InvalidArgument, NotFound
from splitgate.planner import build_bundle
from splitgate.protocol import inference_pb2 as pb
from splitgate.protocol import inference_pb2_grpc as pb_grpc

MODEL = "tiny"
FEATURES, CLASSES = 16, 10
#: The flaky candidate fails when the input's first feature is >= this (5% of U[0, 1)).
FAIL_ABOVE = 0.95


# -- the pure core ----------------------------------------------------------------------


def _stats(stable: dict, candidate: dict, mode: str = "ab") -> RolloutStats:
    return RolloutStats(mode, VersionStats("s", **stable), VersionStats("c", **candidate))


def test_judge_waits_for_min_requests_per_version() -> None:
    rule = RolloutRule(min_requests=100, promote_after=200)
    bad = dict(requests=99, errors=99, p95_ms=50.0)
    verdict, reason = judge(_stats(dict(requests=500, p95_ms=1.0), bad), rule)
    assert verdict is None and "waiting" in reason
    verdict, _ = judge(_stats(dict(requests=99, p95_ms=1.0), dict(requests=500, errors=400, p95_ms=1.0)), rule)
    assert verdict is None


def test_judge_rolls_back_on_error_excess_latency_and_agreement() -> None:
    rule = RolloutRule(min_requests=100, max_error_excess=0.02, max_p95_ratio=1.5, latency_slack_ms=1.0,
                       min_agreement=0.9, promote_after=1000)
    stable = dict(requests=1000, errors=10, p95_ms=10.0)  # 1% errors
    ok = judge(_stats(stable, dict(requests=200, errors=4, p95_ms=15.9, compared=200, agreed=190)), rule)
    assert ok.verdict is None  # 2% errors (1 point worse), p95 within 1.5x + 1 ms, 95% agreement
    errors = judge(_stats(stable, dict(requests=200, errors=7, p95_ms=10.0)), rule)
    assert errors.verdict == "rollback" and "error rate 3.5%" in errors.reason
    slow = judge(_stats(stable, dict(requests=200, p95_ms=16.1)), rule)
    assert slow.verdict == "rollback" and "p95 latency 16.10 ms" in slow.reason
    disagree = judge(_stats(stable, dict(requests=200, p95_ms=10.0, compared=200, agreed=170)), rule)
    assert disagree.verdict == "rollback" and "agreement" in disagree.reason
    # too few comparisons to judge agreement yet; A/B compares none
    assert judge(_stats(stable, dict(requests=200, p95_ms=10.0, compared=50, agreed=0)), rule).verdict is None
    # the slack keeps a tiny model's jitter from being a breach: 0.05 ms vs 0.02 ms
    tiny = judge(_stats(dict(requests=500, p95_ms=0.02), dict(requests=500, p95_ms=0.05)), rule)
    assert tiny.verdict is None


def test_judge_promotes_after_n_requests_without_breach_and_never_when_disabled() -> None:
    rule = RolloutRule(min_requests=50, promote_after=300)
    stable = dict(requests=2000, p95_ms=5.0)
    assert judge(_stats(stable, dict(requests=299, p95_ms=5.0)), rule).verdict is None
    promoted = judge(_stats(stable, dict(requests=300, p95_ms=5.0, compared=300, agreed=300)), rule)
    assert promoted.verdict == "promote" and "300 requests without a breach" in promoted.reason
    never = RolloutRule(min_requests=50, promote_after=None)
    assert judge(_stats(stable, dict(requests=10**6, p95_ms=5.0)), never).verdict is None


@pytest.mark.parametrize("bad", [
    dict(min_requests=0), dict(max_error_excess=-0.1), dict(max_p95_ratio=0.5), dict(min_agreement=1.5),
    dict(promote_after=10, min_requests=100), dict(compare="cosine"), dict(latency_window=3),
    dict(max_p95_ratio=float("nan")),
])
def test_rule_refuses_bad_settings_by_name(bad: dict) -> None:
    name = next(iter(bad)) if "promote_after" not in bad else "promote_after"
    with pytest.raises(InvalidArgument, match=name):
        RolloutRule(**bad).validate()


def test_sticky_assignment_and_share() -> None:
    rollout = Rollout("m", "a" * 64, "b" * 64, share=0.3)
    keys = [f"user-{i}" for i in range(5000)]
    first = [rollout.assign(k) for k in keys]
    assert first == [rollout.assign(k) for k in keys]  # sticky
    assert abs(first.count("candidate") / len(keys) - 0.3) < 0.03
    # the hash is of (caller, model, candidate digest): stable across processes, reshuffled by a new candidate
    assert sticky_fraction("user-1", "m", "b" * 64) == sticky_fraction("user-1", "m", "b" * 64)
    other = Rollout("m", "a" * 64, "c" * 64, share=0.3)
    assert [other.assign(k) for k in keys] != first
    # no caller key: a per-request draw
    draws = iter([0.29, 0.31])
    drawn = Rollout("m", "a" * 64, "b" * 64, share=0.3, draw=lambda: next(draws))
    assert [drawn.assign(None), drawn.assign(None)] == ["candidate", "stable"]
    assert Rollout("m", "a" * 64, "b" * 64, share=0.0).assign("x") == "stable"
    assert Rollout("m", "a" * 64, "b" * 64, share=1.0).assign("x") == "candidate"
    assert Rollout("m", "a" * 64, "b" * 64, share=1.0, mode="shadow").assign("x") == "stable"


@pytest.mark.parametrize("kwargs, needle", [
    (dict(share=1.5), "share"), (dict(share=float("nan")), "share"), (dict(mode="canary"), "mode"),
])
def test_rollout_refuses_bad_settings(kwargs: dict, needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        Rollout("m", "a" * 64, "b" * 64, **kwargs)
    with pytest.raises(InvalidArgument, match="is the stable version"):
        Rollout("m", "a" * 64, "a" * 64)


def test_rollout_counts_and_decides_once() -> None:
    rule = RolloutRule(min_requests=20, promote_after=30, latency_window=20)
    rollout = Rollout("m", "a" * 64, "b" * 64, share=0.5, rule=rule)
    for i in range(40):
        rollout.record("stable", 1.0 + i % 3, fallback=i % 10 == 0)
    for _ in range(29):
        rollout.record("candidate", 1.0)
    stats = rollout.stats()
    assert (stats.stable.requests, stats.stable.fallbacks, stats.stable.p95_ms) == (40, 4, 3.0)
    assert rollout.judge(force=True).verdict is None
    rollout.record("candidate", 1.0, error=False)
    assert rollout.judge().verdict is None  # evaluated once per JUDGE_EVERY runs
    for _ in range(JUDGE_EVERY - 1):
        rollout.record("stable", 1.0)
    assert rollout.judge().verdict == "promote"
    assert rollout.judge(force=True).verdict is None  # decided once; no more candidate traffic
    assert rollout.assign("anyone") == "stable" and rollout.decided is not None
    compared = rollout.stats().candidate.compared
    assert not rollout.record_agreement(True), "a shadow run finishing after the verdict is not recorded"
    assert rollout.stats().candidate.compared == compared
    described = rollout.describe()
    assert described["candidate"]["requests"] == 30 and described["rule"]["promote_after"] == 30


def test_outputs_agree_top1_for_classifiers_allclose_otherwise() -> None:
    logits = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0]], np.float32)
    assert outputs_agree({"y": logits}, {"y": logits * 3})  # same classes
    assert not outputs_agree({"y": logits}, {"y": logits[:, ::-1].copy()})
    assert not outputs_agree({"y": logits}, {"y": logits * 3}, compare="allclose")
    boxes = np.array([1.0, 2.0, 3.0], np.float32)  # 1-D: not classifier-shaped
    assert outputs_agree({"b": boxes}, {"b": boxes + 1e-7})
    assert not outputs_agree({"b": boxes}, {"b": boxes + 0.1})
    assert not outputs_agree({"b": boxes}, {"other": boxes})
    assert not outputs_agree({"y": logits}, {"y": logits[:1]})


# -- real bundles -------------------------------------------------------------------------


def _weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((FEATURES, CLASSES)).astype(np.float32),
            rng.standard_normal(CLASSES).astype(np.float32))


def _classifier(w: np.ndarray, b: np.ndarray, *, flaky: bool = False, heavy: int = 0) -> onnx.ModelProto:
    """logits[N,10] = x[N,16] @ w + b.

    ``flaky``: also Gather from a 19-entry table at floor(20 * x[:, 0]): onnxruntime
    fails with "indices element out of data bounds" when x[:, 0] >= 0.95.
    ``heavy``: also ``heavy`` MatMuls of a [256N, 256] tile of x, summed and
    added times zero: the same answer, much slower.
    """
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["l0"])]
    last = "l0"
    if flaky:
        inits += [
            numpy_helper.from_array(np.zeros(19, np.float32), "table"),
            numpy_helper.from_array(np.array([20.0], np.float32), "twenty"),
            numpy_helper.from_array(np.array([0], np.int64), "i0"),
            numpy_helper.from_array(np.array([1], np.int64), "i1"),
        ]
        nodes += [
            helper.make_node("Slice", ["x", "i0", "i1", "i1"], ["x0"]),
            helper.make_node("Mul", ["x0", "twenty"], ["x20"]),
            helper.make_node("Floor", ["x20"], ["xf"]),
            helper.make_node("Cast", ["xf"], ["idx"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "idx"], ["g"], axis=0),
            helper.make_node("Add", [last, "g"], ["l1"]),
        ]
        last = "l1"
    if heavy:
        rng = np.random.default_rng(1)
        inits += [
            numpy_helper.from_array(np.array([256, 16], np.int64), "reps"),
            numpy_helper.from_array((rng.standard_normal((256, 256)) / 16).astype(np.float32), "B"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ]
        nodes.append(helper.make_node("Tile", ["x", "reps"], ["t0"]))
        for i in range(heavy):
            nodes += [helper.make_node("MatMul", [f"t{i}", "B"], [f"m{i}"]),
                      helper.make_node("Tanh", [f"m{i}"], [f"t{i + 1}"])]
        nodes += [
            helper.make_node("ReduceSum", [f"t{heavy}"], ["s"], keepdims=0),
            helper.make_node("Mul", ["s", "zero"], ["s0"]),
            helper.make_node("Add", [last, "s0"], ["l2"]),
        ]
        last = "l2"
    nodes.append(helper.make_node("Identity", [last], ["logits"]))
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=OPSET, ir_version=IR_VERSION)


def _bundle(root: Path, name: str, model: onnx.ModelProto):
    """Plan ``model`` as ``tiny`` without profiling (device-only Gateways need none)."""
    path = save(model, root / f"{name}.onnx")
    return build_bundle(path, root / f"{name}.bundle", model_name=MODEL, profile=False)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("rollout")
    w, b = _weights(0)
    noise = np.random.default_rng(5).standard_normal(w.shape).astype(np.float32) * 1e-4
    return {
        "stable": _bundle(root, "stable", _classifier(w, b)),
        "close": _bundle(root, "close", _classifier(w + noise, b)),  # other weights, same classes
        "other": _bundle(root, "other", _classifier(*_weights(1))),  # other weights, other classes
        "flaky": _bundle(root, "flaky", _classifier(w, b, flaky=True)),
        "slow": _bundle(root, "slow", _classifier(w, b, heavy=3)),
        "stranger": build_bundle(save(_classifier(w, b), root / "stranger.onnx"), root / "stranger.bundle",
                                 model_name="stranger", profile=False),
    }


def _inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, (n, 1, FEATURES)).astype(np.float32)


def _expected(x: np.ndarray) -> np.ndarray:
    w, b = _weights(0)
    return x @ w + b


def _wait_for(gw: Gateway, state: str, timeout_s: float = 20.0) -> dict:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        status = gw.rollout_status(MODEL)
        if status["state"] == state:
            return status
        time.sleep(0.02)
    raise AssertionError(f"rollout did not reach {state!r}: {gw.rollout_status(MODEL)}")


def _sample(metrics: dict, name: str, **labels: str) -> float:
    key = name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"
    return metrics.get(key, 0.0)


def test_ab_split_of_2000_requests_is_within_3_points_and_sticky(bundles) -> None:
    stable, candidate = bundles["stable"], bundles["close"]
    keep = RolloutRule(promote_after=None, max_p95_ratio=None)  # judge nothing away during the count
    with Gateway([stable.root]) as gw:
        status = gw.stage_candidate(MODEL, candidate.root, share=0.2, rule=keep)
        assert status["state"] == "staged" and status["mode"] == "ab" and status["share"] == 0.2
        xs = _inputs(2000)
        seen: dict[str, str] = {}
        for i, x in enumerate(xs):
            caller = f"user-{i}"
            seen[caller] = gw.infer(MODEL, {"x": x}, caller=caller).trace.version
        share = sum(v == version_of(candidate.plan_digest) for v in seen.values()) / len(seen)
        assert abs(share - 0.2) <= 0.03, share
        assert set(seen.values()) == {version_of(stable.plan_digest), version_of(candidate.plan_digest)}
        for caller in list(seen)[:300]:  # the same version on every later request
            for x in xs[:3]:
                assert gw.infer(MODEL, {"x": x}, caller=caller).trace.version == seen[caller]
        # requests without a caller key: a per-request draw, at the same share
        random.seed(17)
        drawn = [gw.infer(MODEL, {"x": x}).trace.version for x in xs]
        assert abs(drawn.count(version_of(candidate.plan_digest)) / len(drawn) - 0.2) <= 0.03
        status = gw.rollout_status(MODEL)
        assert status["state"] == "staged"
        assert status["candidate"]["requests"] + status["stable"]["requests"] == 2000 + 900 + 2000
        metrics = gw.metrics.snapshot()
        assert _sample(metrics, "splitgate_rollout_requests_total", model=MODEL, role="candidate",
                       version=version_of(candidate.plan_digest)) == status["candidate"]["requests"]
        assert _sample(metrics, "splitgate_rollout_share", model=MODEL,
                       version=version_of(candidate.plan_digest)) == 0.2


def test_candidate_failing_on_5_percent_is_rolled_back_with_no_failed_request(bundles) -> None:
    stable, flaky = bundles["stable"], bundles["flaky"]
    xs = _inputs(2000, seed=3)
    assert 0.03 < float(np.mean(xs[:, 0, 0] >= FAIL_ABOVE)) < 0.07  # the inputs it fails on: ~5%
    rule = RolloutRule(min_requests=100, max_error_excess=0.02, max_p95_ratio=None, promote_after=1000)
    with Gateway([stable.root]) as gw:
        gw.stage_candidate(MODEL, flaky.root, share=0.5, rule=rule)
        versions = []
        for i, x in enumerate(xs):  # every request answers, and right
            result = gw.infer(MODEL, {"x": x}, caller=f"user-{i}")
            np.testing.assert_allclose(result.outputs["logits"], _expected(x), rtol=1e-5, atol=1e-5)
            versions.append(result.trace.version)
        status = gw.rollout_status(MODEL)
        assert status["state"] == "rolled_back", status
        assert status["reason"].startswith("error rate") and status["candidate"]["errors"] >= 1
        assert status["stable"]["errors"] == 0
        assert gw.bundle(MODEL).plan_digest == stable.plan_digest
        # after the rollback every caller gets the stable version
        assert set(versions[-200:]) == {version_of(stable.plan_digest)}
        metrics = gw.metrics.snapshot()
        labels = dict(model=MODEL, version=version_of(flaky.plan_digest))
        assert _sample(metrics, "splitgate_rollout_decisions_total", verdict="rollback", **labels) == 1
        assert _sample(metrics, "splitgate_rollout_errors_total", role="candidate", **labels) == \
            status["candidate"]["errors"]
        assert _sample(metrics, "splitgate_requests_total", model=MODEL, partition="device", outcome="error") == \
            status["candidate"]["errors"]  # the candidate's own runs failed; no request did
        # the bundle of the stable version is untouched; nothing to roll back any more
        with pytest.raises(NotFound, match="no candidate staged"):
            gw.abort_candidate(MODEL)


def test_candidate_only_slower_is_rolled_back_by_the_latency_rule(bundles) -> None:
    stable, slow = bundles["stable"], bundles["slow"]
    rule = RolloutRule(min_requests=50, max_p95_ratio=1.5, latency_slack_ms=1.0, promote_after=400)
    with Gateway([stable.root]) as gw:
        gw.stage_candidate(MODEL, slow.root, share=0.5, rule=rule)
        xs = _inputs(600, seed=4)
        for i, x in enumerate(xs):
            result = gw.infer(MODEL, {"x": x}, caller=f"user-{i}")
            np.testing.assert_allclose(result.outputs["logits"], _expected(x), rtol=1e-5, atol=1e-5)
            if gw.rollout_status(MODEL)["state"] != "staged":
                break
        status = gw.rollout_status(MODEL)
        assert status["state"] == "rolled_back", status
        assert status["reason"].startswith("p95 latency"), status["reason"]
        assert status["candidate"]["errors"] == 0
        assert status["candidate"]["p95_ms"] > 1.5 * status["stable"]["p95_ms"] + 1.0
        assert gw.bundle(MODEL).plan_digest == stable.plan_digest


def test_shadow_mode_compares_off_the_request_path_and_promotes(bundles) -> None:
    stable, close = bundles["stable"], bundles["close"]
    # (shadow runs share the host with the request loop: on a loaded host their p95
    # swings by milliseconds, so the latency rule gets a wide slack; this test's
    # subject is promotion by agreement)
    rule = RolloutRule(min_requests=100, promote_after=300, min_agreement=0.95, max_p95_ratio=3.0,
                       latency_slack_ms=50.0)
    with Gateway([stable.root]) as gw:
        gw.stage_candidate(MODEL, close.root, shadow=True, rule=rule)
        xs = _inputs(3000, seed=5)
        for x in xs:
            result = gw.infer(MODEL, {"x": x}, caller="one-user")
            if result.trace.version == version_of(close.plan_digest):
                break  # promoted: the candidate answers now
            np.testing.assert_array_equal(result.outputs["logits"], _expected(x).astype(np.float32))
        status = _wait_for(gw, "promoted")
        assert status["mode"] == "shadow" and "without a breach" in status["reason"]
        assert status["candidate"]["compared"] >= 300 and status["candidate"]["agreement"] >= 0.95
        assert gw.bundle(MODEL).plan_digest == close.plan_digest
        assert gw.infer(MODEL, {"x": xs[0]}).trace.version == version_of(close.plan_digest)
        metrics = gw.metrics.snapshot()
        labels = dict(model=MODEL, version=version_of(close.plan_digest))
        assert _sample(metrics, "splitgate_rollout_compared_total", **labels) == status["candidate"]["compared"]
        assert _sample(metrics, "splitgate_rollout_decisions_total", verdict="promote", **labels) == 1
        # the old version is kept for rollback_bundle
        assert gw.rollback_bundle(MODEL).plan_digest == stable.plan_digest


def test_shadow_candidate_that_disagrees_or_fails_is_rolled_back_unseen(bundles) -> None:
    stable = bundles["stable"]
    rule = RolloutRule(min_requests=100, promote_after=1000, min_agreement=0.9, max_p95_ratio=None)
    xs = _inputs(1500, seed=6)
    for name, reason in (("other", "agreement"), ("flaky", "error rate")):
        with Gateway([stable.root]) as gw:
            gw.stage_candidate(MODEL, bundles[name].root, shadow=True, rule=rule)
            for x in xs:  # users only ever see the stable version
                result = gw.infer(MODEL, {"x": x})
                assert result.trace.version == version_of(stable.plan_digest)
                if gw.rollout_status(MODEL)["state"] != "staged":
                    break
            status = _wait_for(gw, "rolled_back")
            assert status["reason"].startswith(reason), status["reason"]


def test_promote_abort_and_refusals_by_hand(bundles, tmp_path: Path) -> None:
    stable, close = bundles["stable"], bundles["close"]
    with Gateway([stable.root]) as gw:
        assert gw.rollout_status(MODEL) == {"state": "none", "model": MODEL,
                                            "stable": {"version": version_of(stable.plan_digest)}}
        with pytest.raises(NotFound, match="no candidate staged"):
            gw.promote(MODEL)
        with pytest.raises(NotFound, match="nope"):
            gw.stage_candidate("nope", close.root)
        with pytest.raises(InvalidArgument, match="is model 'stranger'"):
            gw.stage_candidate(MODEL, bundles["stranger"].root)
        with pytest.raises(InvalidArgument, match="stable version's directory"):
            gw.stage_candidate(MODEL, stable.root)
        import shutil

        twin = tmp_path / "twin.bundle"
        shutil.copytree(stable.root, twin)
        with pytest.raises(InvalidArgument, match="is the stable version"):
            gw.stage_candidate(MODEL, twin)
        with pytest.raises(InvalidArgument, match="share"):
            gw.stage_candidate(MODEL, close.root, share=2.0)
        with pytest.raises(InvalidArgument, match="caller must be a string"):
            gw.infer(MODEL, {"x": _inputs(1)[0]}, caller=42)  # type: ignore[arg-type]
        # a tampered candidate is refused; the stable version keeps serving
        bad = tmp_path / "bad.bundle"
        shutil.copytree(close.root, bad)
        (bad / "model.onnx").write_bytes((bad / "model.onnx").read_bytes()[:-8])
        with pytest.raises(BundleError):
            gw.stage_candidate(MODEL, bad)
        assert gw.rollout_status(MODEL)["state"] == "none"

        gw.stage_candidate(MODEL, close.root, share=1.0, rule=RolloutRule(promote_after=None))
        with pytest.raises(FailedPrecondition, match="already has a candidate"):
            gw.stage_candidate(MODEL, bundles["other"].root)
        assert gw.infer(MODEL, {"x": _inputs(1)[0]}, caller="a").trace.version == version_of(close.plan_digest)
        assert gw.abort_candidate(MODEL).plan_digest == stable.plan_digest
        assert gw.rollout_status(MODEL)["state"] == "aborted"
        assert gw.infer(MODEL, {"x": _inputs(1)[0]}, caller="a").trace.version == version_of(stable.plan_digest)

        gw.stage_candidate(MODEL, close.root, share=0.0)
        assert gw.promote(MODEL).plan_digest == close.plan_digest
        assert gw.rollout_status(MODEL)["state"] == "promoted"
        assert gw.infer(MODEL, {"x": _inputs(1)[0]}).trace.version == version_of(close.plan_digest)


def test_two_versions_keep_their_own_cached_results_and_sessions(bundles) -> None:
    stable, other = bundles["stable"], bundles["other"]  # other weights: other answers
    x = _inputs(1, seed=9)[0]
    want_other = x @ _weights(1)[0] + _weights(1)[1]
    with Gateway([stable.root], cache_size=64) as gw:
        gw.stage_candidate(MODEL, other.root, share=0.5, rule=RolloutRule(promote_after=None, max_p95_ratio=None))
        callers = {}
        for i in range(64):
            callers.setdefault(gw.infer(MODEL, {"x": x}, caller=f"u{i}").trace.version, f"u{i}")
        assert len(callers) == 2
        for _ in range(2):  # the second round comes from the result cache, still per version
            on_stable = gw.infer(MODEL, {"x": x}, caller=callers[version_of(stable.plan_digest)])
            on_candidate = gw.infer(MODEL, {"x": x}, caller=callers[version_of(other.plan_digest)])
            np.testing.assert_allclose(on_stable.outputs["logits"], _expected(x), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(on_candidate.outputs["logits"], want_other, rtol=1e-5, atol=1e-5)
        assert on_stable.trace.cached and on_candidate.trace.cached
        sessions = gw._core.sessions._sessions  # noqa: SLF001 - which files have live sessions
        assert {p.resolve().parent for p in sessions} == {stable.root.resolve(), other.root.resolve()}
        gw.abort_candidate(MODEL)  # the candidate's sessions are released, the stable one's kept
        assert {p.resolve().parent for p in sessions} == {stable.root.resolve()}


def test_a_stable_version_replaced_underneath_ends_the_rollout(bundles) -> None:
    with Gateway([bundles["stable"].root]) as gw:
        gw.stage_candidate(MODEL, bundles["close"].root, share=1.0)
        gw.update_bundle(bundles["other"].root)  # e.g. an over-the-air update of the stable version
        result = gw.infer(MODEL, {"x": _inputs(1)[0]}, caller="a")
        assert result.trace.version == version_of(bundles["other"].plan_digest)
        status = gw.rollout_status(MODEL)
        assert status["state"] == "aborted" and "replaced" in status["reason"]


def test_a_request_the_input_fails_is_not_counted_against_the_candidate(bundles) -> None:
    with Gateway([bundles["stable"].root]) as gw:
        gw.stage_candidate(MODEL, bundles["close"].root, share=1.0)
        with pytest.raises(InvalidArgument, match="x"):
            gw.infer(MODEL, {"x": np.zeros((1, 3), np.float32)}, caller="a")
        status = gw.rollout_status(MODEL)
        assert status["candidate"]["requests"] == status["stable"]["requests"] == 0


def test_async_gateway_routes_by_caller(bundles) -> None:
    import asyncio

    async def run() -> tuple[str, str]:
        async with AsyncGateway([bundles["stable"].root]) as gw:
            gw.stage_candidate(MODEL, bundles["close"].root, share=1.0)
            x = _inputs(1)[0]
            return ((await gw.infer(MODEL, {"x": x}, caller="a")).trace.version,
                    gw.rollout_status(MODEL)["candidate"]["version"])

    version, candidate = asyncio.run(run())
    assert version == candidate == version_of(bundles["close"].plan_digest)


def test_edge_serve_takes_the_caller_key_and_names_the_version(bundles) -> None:
    stable, close = bundles["stable"], bundles["close"]
    gw = Gateway([stable.root])
    gw.stage_candidate(MODEL, close.root, share=0.5, rule=RolloutRule(promote_after=None))
    callers = [f"user-{i}" for i in range(40)]
    want = {c: gw.infer(MODEL, {"x": _inputs(1)[0]}, caller=c).trace.version for c in callers}
    assert len(set(want.values())) == 2
    server, port, _ = serve_edge(gw, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL))
            assert list(metadata.versions) == [version_of(stable.plan_digest), version_of(close.plan_digest)]
            for caller in callers:
                by_param = pb.ModelInferRequest(model_name=MODEL)
                codec.add_inputs(by_param, {"x": _inputs(1)[0]})
                codec.set_params(by_param.parameters, {contract.CALLER: caller})
                response = stub.ModelInfer(by_param)
                assert codec.read_params(response.parameters)[contract.VERSION] == want[caller]
                by_metadata = pb.ModelInferRequest(model_name=MODEL)
                codec.add_inputs(by_metadata, {"x": _inputs(1)[0]})
                response = stub.ModelInfer(by_metadata, metadata=((contract.CALLER_METADATA, caller),))
                assert codec.read_params(response.parameters)[contract.VERSION] == want[caller]
            bad = pb.ModelInferRequest(model_name=MODEL)
            codec.add_inputs(bad, {"x": _inputs(1)[0]})
            codec.set_params(bad.parameters, {contract.CALLER: 7})
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(bad)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert contract.CALLER in info.value.details()
    finally:
        server.stop(0)
        gw.close()
