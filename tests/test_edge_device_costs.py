"""Online device costs: the learner on fake samples, and real Gateways on a real
bundle whose device slows down 3x (emulated) and recovers: device-only, and
against the plain grpcio cloud server through a shaping proxy."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest

from splitgate.edge import DeviceCosts, Gateway
from splitgate.planner import Conditions
from splitgate.errors import InvalidArgument
from _models import normal_request

PLANNED = {"cut-3": 20.0, "cut-9": 60.0, "device": 100.0}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _learner(**kwargs) -> tuple[DeviceCosts, FakeClock]:
    clock = FakeClock()
    return DeviceCosts(clock=clock, **kwargs), clock


def _run(d: DeviceCosts, key: str, ratio: float, n: int = 1, model: str = "m") -> list[float]:
    """``n`` device legs of ``key`` at ``ratio`` x planned; the factor after each."""
    out = []
    for _ in range(n):
        d.observe(model, key, PLANNED[key] * ratio, PLANNED[key])
        out.append(d.factor(model))
    return out


def _warm(d: DeviceCosts, *keys: str, n: int = 4) -> None:
    for key in keys:
        assert not d.observe("m", key, 10 * PLANNED[key], PLANNED[key]), "a session's first run is cold"
        _run(d, key, 1.0, n)


def test_a_slowdown_is_believed_within_three_samples_and_a_recovery_too() -> None:
    d, _ = _learner()
    _warm(d, "device")
    assert d.factor("m") == pytest.approx(1.0)
    slow = _run(d, "device", 3.0, 3)
    assert slow[0] < 1.5, "one slow run is not yet a slowdown"
    assert slow[-1] == pytest.approx(3.0, rel=0.05)
    back = _run(d, "device", 1.0, 3)
    assert back[-1] == pytest.approx(1.0, rel=0.05)
    assert d.relative("m", "device") == pytest.approx(1.0, rel=0.05), "the step went to the factor, not the partition"


def test_a_lone_spike_is_ignored_and_small_drift_averaged() -> None:
    d, _ = _learner()
    _warm(d, "device")
    _run(d, "device", 6.0)  # a GC pause, a page fault
    after = _run(d, "device", 1.0, 2)
    assert max(after) == pytest.approx(1.0, rel=0.02)
    drift = _run(d, "device", 1.3, 8)  # a gentler change: averaged in, no jump, mostly the device's
    assert drift[0] < 1.15 and 1.2 < drift[-1] < 1.32
    assert drift[-1] * d.relative("m", "device") == pytest.approx(1.3, rel=0.03)


def test_partitions_own_ratio_is_kept_relative_to_the_device_factor() -> None:
    d, _ = _learner()
    _warm(d, "cut-3", "device")
    _run(d, "cut-9", 1.0)  # cold
    for _ in range(4):  # cut-9 runs 2x slower than planned while the rest runs as planned
        _run(d, "cut-9", 2.0)
        _run(d, "device", 1.0)
    assert d.factor("m") == pytest.approx(1.0, rel=0.1)
    assert d.relative("m", "cut-9") == pytest.approx(2.0, rel=0.1)
    costs = d.adjust("m", {pid: {"device_ms": ms, "cloud_ms": 1.0} for pid, ms in PLANNED.items()})
    assert costs["cut-9"]["device_ms"] == pytest.approx(120.0, rel=0.1)
    assert costs["device"]["device_ms"] == pytest.approx(100.0, rel=0.1)
    # The device slows down 3x; only the small prefix runs: every partition follows
    # the factor, and cut-9 keeps its own 2x on top of it.
    _run(d, "cut-3", 3.0, 3)
    assert d.factor("m") == pytest.approx(3.0, rel=0.1)
    costs = d.adjust("m", {pid: {"device_ms": ms} for pid, ms in PLANNED.items()})
    assert costs["cut-9"]["device_ms"] * d.factor("m") == pytest.approx(360.0, rel=0.15)
    assert costs["device"]["device_ms"] * d.factor("m") == pytest.approx(300.0, rel=0.15)
    unseen = d.adjust("m", {"cut-12": {"device_ms": 80.0}})
    assert unseen["cut-12"]["device_ms"] == 80.0, "a partition never run: the device factor alone"


def test_a_partition_measured_while_slow_recovers_with_the_factor() -> None:
    """The device partition was last run during the slow spell; only a small
    prefix runs afterwards. Its estimate must come back with the recovery."""
    d, _ = _learner()
    _warm(d, "cut-3", "device")
    _run(d, "device", 3.0, 3)
    _run(d, "cut-3", 3.0, 4)
    _run(d, "cut-3", 1.0, 2)  # recovered: seen through the small prefix only
    assert d.factor("m") == pytest.approx(1.0, rel=0.05)
    device_ms = d.adjust("m", {"device": {"device_ms": 100.0}})["device"]["device_ms"]
    assert device_ms * d.factor("m") == pytest.approx(100.0, rel=0.05)


def test_a_stale_relative_ratio_decays_towards_the_device_factor() -> None:
    d, clock = _learner(half_life_s=10.0)
    _warm(d, "device")
    _run(d, "cut-9", 1.0)  # cold
    _run(d, "cut-9", 2.0, 3)
    assert d.relative("m", "cut-9") == pytest.approx(2.0, rel=0.05)
    clock.now += 10.0
    assert d.relative("m", "cut-9") == pytest.approx(2.0**0.5, rel=0.05)
    clock.now += 1000.0
    assert d.relative("m", "cut-9") == pytest.approx(1.0, abs=0.01)


def test_confirmed_probe_steps_at_once_and_probes_are_due_every_few_offloads() -> None:
    d, _ = _learner(probe_every=3)
    _warm(d, "cut-3")
    d.observe("m", "cut-3", 60.0, 20.0, confirmed=True)
    assert d.factor("m") == pytest.approx(3.0)
    assert [d.note_offloaded("m") for _ in range(7)] == [False, False, True, False, False, True, False]
    _run(d, "cut-3", 3.0)  # device work restarts the count
    assert [d.note_offloaded("m") for _ in range(3)] == [False, False, True]
    assert not DeviceCosts(probe_every=0).note_offloaded("m")


def test_what_is_not_learned_from_and_reset() -> None:
    d, _ = _learner(min_planned_ms=1.0)
    _warm(d, "device")
    assert not d.observe("m", "device", float("nan"), 100.0)
    assert not d.observe("m", "device", 5.0, 0.5), "too short to time"
    assert d.factor("m") == pytest.approx(1.0)
    assert d.factor("other") == 1.0
    d.reset("m")
    assert d.factor("m") == 1.0 and d.snapshot("m") == {}


# -- real Gateways on a real bundle ------------------------------------------------

DEVICE_MS = 30.0  # the emulated device runs the model in about this long
# The Gateway's hysteresis in the switching test: the plan margins a link can give
# this bundle are narrow, and emulated device legs sleep to their planned time, so
# they vary little.
HYSTERESIS = 0.03
MARGIN = 1.08  # each plan margin the shaped link must give: the hysteresis plus 5% for noise


@pytest.fixture(scope="module")
def drift_bundle(zoo_model, slow_device_factor, tmp_path_factory):
    """The zoo mobilenet planned for a ~30 ms device (``mobilenet_drift``)."""
    from splitgate.planner import build_bundle

    return build_bundle(
        zoo_model, tmp_path_factory.mktemp("drift") / "mobilenet_drift.bundle", model_name="mobilenet_drift",
        device_slowdown=slow_device_factor * DEVICE_MS / 200.0,
        encodings=("raw",),  # device learning under test: raw partitions keep the plan's margins clear
    )


@pytest.fixture(scope="module")
def baseline(drift_bundle) -> Iterator[str]:
    from splitgate.cloud.baseline import start_baseline

    with start_baseline([str(drift_bundle.root)]) as server:
        yield server.address


def _x(bundle) -> dict[str, np.ndarray]:
    return normal_request(bundle)


def _margins(bundle, c: Conditions) -> tuple[str, float, float, float]:
    """(the best partition at 3x; how much the device beats the rest at 1x; how much
    that partition beats the device at 3x; how much it beats the best partition of
    another offloading kind at 3x, e.g. a split beating cloud)."""
    def est(factor: float) -> dict[str, float]:
        at = Conditions(uplink_mbps=c.uplink_mbps, downlink_mbps=c.downlink_mbps, rtt_ms=c.rtt_ms,
                        device_factor=factor)
        return {p: bundle.estimate(p, at).latency_ms for p in bundle.candidates}

    one, three = est(1.0), est(3.0)
    winner = min(three, key=three.__getitem__)
    kind = bundle.partition(winner).kind
    rivals = [v for p, v in three.items() if bundle.partition(p).kind not in (kind, "device")]
    return (winner, min(v for p, v in one.items() if p != "device") / one["device"],
            three["device"] / three[winner], min(rivals, default=math.inf) / three[winner])


def _settle_link(gw, link, bundle, slow_winner: str) -> Conditions:
    """Set the shaped link to one where, as the Gateway measures it (its probe sees
    the proxy's and gRPC's overheads too: a few ms of RTT), the device wins at 1x
    and a ``slow_winner``-kind partition at 3x, over the device and over the
    other offloading kind, each by >= MARGIN in the plan
    (the Gateway's hysteresis is HYSTERESIS). Grid links are ranked by their plan
    margins with the RTT overhead the last probe showed; the best untried one is
    probed. The grid is fine because the window is narrow: for this bundle's
    split the best link gives its three margins only ~1.19 (its prefix is ~0.4 of
    the device's time), and a coarse grid missed it on a loaded CI machine."""
    from splitgate.netsim import LinkConditions

    overhead, tried = 0.0, []
    for _ in range(8):
        ranked = []
        for up in np.round(np.geomspace(0.5, 32.0, 37), 2):
            for rtt in range(0, 80):
                if any(t[:2] == (up, rtt) for t in tried):
                    continue
                c = Conditions(uplink_mbps=up, downlink_mbps=up, rtt_ms=rtt + overhead)
                winner, *margins = _margins(bundle, c)
                if bundle.partition(winner).kind == slow_winner:
                    ranked.append((min(margins), up, rtt))
        if not ranked:
            break
        _, up, rtt = max(ranked)
        link.set(LinkConditions(uplink_mbps=float(up), downlink_mbps=float(up), rtt_ms=float(rtt)))
        gw.probe(reset=True)
        seen = gw.conditions()
        overhead = max(seen.rtt_ms - rtt, 0.0)
        winner, *margins = _margins(bundle, seen)
        shown = " ".join(f"{m:.2f}" for m in margins)
        tried.append((up, rtt, f"-> {seen.uplink_mbps:.2f}/{seen.rtt_ms:.0f}: {winner} {shown}"))
        if bundle.partition(winner).kind == slow_winner and min(margins) >= MARGIN:
            return seen
    pytest.fail(f"no link where the device wins at 1x and a {slow_winner} at 3x: tried {tried}")


def test_device_only_gateway_learns_the_slowdown_and_the_recovery(drift_bundle) -> None:
    bundle, x = drift_bundle, _x(drift_bundle)
    model = bundle.model_name
    with Gateway([bundle], device_time_from_profile=True) as gw:
        for _ in range(4):
            gw.infer(model, x)
        assert gw.conditions().device_factor == pytest.approx(1.0, abs=0.3)
        gw.set_device_slowdown(3.0)
        seen = [gw.infer(model, x).trace.device_factor for _ in range(4)]
        assert seen[-1] == pytest.approx(3.0, rel=0.2), f"factor after 3 slow requests: {seen}"
        assert gw.conditions(model=model).device_factor == pytest.approx(3.0, rel=0.2)
        gauge = gw.metrics.snapshot()[f"splitgate_device_factor{{model={model}}}"]
        assert gauge == pytest.approx(3.0, rel=0.2)
        gw.set_device_slowdown(1.0)
        seen = [gw.infer(model, x).trace.device_factor for _ in range(4)]
        assert seen[-1] == pytest.approx(1.0, abs=0.3), f"factor after 3 requests at normal speed: {seen}"
        with pytest.raises(InvalidArgument, match="slowdown"):
            gw.set_device_slowdown(0.5)
    with Gateway([bundle], device_time_from_profile=True, learn_device=False) as off:
        off.infer(model, x)
        off.set_device_slowdown(3.0)
        assert {off.infer(model, x).trace.device_factor for _ in range(3)} == {1.0}
        assert off.conditions().device_factor == 1.0


@pytest.mark.parametrize("slow_winner", ["split", "cloud"])
def test_the_choice_leaves_the_slow_device_and_comes_back(drift_bundle, baseline, slow_winner) -> None:
    """Against the real cloud (grpcio baseline) through a shaped link. With a
    split winning at 3x its prefix shows the recovery; with ``cloud`` winning
    nothing runs on the device and the device probe must."""
    from splitgate.netsim import LinkConditions, ShapingProxy

    bundle, x = drift_bundle, _x(drift_bundle)
    model = bundle.model_name
    with ShapingProxy(baseline, LinkConditions(rtt_ms=10.0)) as link, Gateway(
        [bundle], cloud=link.address, device_time_from_profile=True, probe_interval_s=60.0,
        hysteresis=HYSTERESIS,
    ) as gw:
        for pid in bundle.candidates:  # warm sessions
            gw.infer(model, x, partition=pid)
        seen = _settle_link(gw, link, bundle, slow_winner)
        normal = [gw.infer(model, x).trace.partition for _ in range(4)]
        assert normal[-1] == "device", f"at 1x on {seen}: {normal}"
        gw.set_device_slowdown(3.0)
        slow = [gw.infer(model, x).trace.partition for _ in range(8)]
        left = next((i for i, p in enumerate(slow) if p != "device"), None)
        assert left is not None and left <= 3, f"after the slowdown: {slow}"
        assert bundle.partition(slow[-1]).kind == slow_winner, f"after the slowdown: {slow}"
        gw.set_device_slowdown(1.0)
        back = [gw.infer(model, x).trace.partition for _ in range(8)]
        returned = next((i for i, p in enumerate(back) if p == "device"), None)
        assert returned is not None and returned <= 5, f"after the recovery: {back}"
        assert back[-1] == "device", f"after the recovery: {back}"


def test_config_file_switch_and_edge_serve_reports_the_factor(drift_bundle, tmp_path) -> None:
    import grpc

    from splitgate.edge import GatewayConfig
    from splitgate.edge._serve import serve_edge
    from splitgate import codec
    from splitgate.protocol import inference_pb2 as pb
    from splitgate.protocol import inference_pb2_grpc as pb_grpc

    path = tmp_path / "edge.toml"
    path.write_text("[edge]\nlearn_device = false\ndevice_probe_every = 5\n")
    config = GatewayConfig.from_file(path)
    assert config.learn_device is False and config.device_probe_every == 5

    bundle, x = drift_bundle, _x(drift_bundle)
    gw = Gateway([bundle], device_time_from_profile=True)
    server, port, _ = serve_edge(gw, port=0)
    try:
        gw.set_device_slowdown(2.0)
        for _ in range(4):
            gw.infer(bundle.model_name, x)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = pb.ModelInferRequest(model_name=bundle.model_name)
            codec.add_inputs(request, x)
            response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
        factor = codec.read_params(response.parameters)["splitgate.device_factor"]
        assert factor == pytest.approx(2.0, rel=0.2)
    finally:
        server.stop(0)
        gw.close()
