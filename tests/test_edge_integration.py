"""The edge Gateway against a real Ray Serve tier over real gRPC, through a
real shaping TCP proxy: split switching, fallbacks, the circuit breaker."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
import pytest

from splitgate.edge import Gateway
from splitgate.netsim import LinkConditions, ShapingProxy
from splitgate.planner import Conditions

pytestmark = pytest.mark.integration

# DADS's WiFi and 3G uplinks (Mbps); downlinks and RTTs typical of each (see netsim).
WIFI = LinkConditions(uplink_mbps=18.88, downlink_mbps=50.0, rtt_ms=10.0)
THREE_G = LinkConditions(uplink_mbps=1.1, downlink_mbps=2.0, rtt_ms=100.0)
SLOW_3G = LinkConditions(uplink_mbps=0.6, downlink_mbps=1.2, rtt_ms=100.0)
SLOWER_3G = LinkConditions(uplink_mbps=0.3, downlink_mbps=0.6, rtt_ms=100.0)


def _input(bundle, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    (spec,) = bundle.inputs
    shape = [d if d >= 0 else batch for d in spec.shape]
    return {spec.name: np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def _expected(bundle, inputs):
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def test_switches_to_new_best_partition_within_three_requests(switch_bundle, cloud_tier) -> None:
    bundle = switch_bundle
    model = bundle.model_name
    x = _input(bundle)
    hysteresis = 0.05
    # The device runs exactly as planned, so the plan's trade-off is the real one.
    # Calibration (pessimism after the surprise of the step) is tested on its own.
    with ShapingProxy(cloud_tier.address, WIFI) as link, Gateway(
        [bundle], cloud=link.address, device_time_from_profile=True, hysteresis=hysteresis, calibrate=False
    ) as gw:
        gw.probe()  # an idle-time probe, as the gateway does when estimates age
        for _ in range(6):  # settle on WiFi
            wifi_choice = gw.infer(model, x).trace.partition
        rtt = gw.conditions().rtt_ms
        wifi = Conditions(uplink_mbps=18.88, downlink_mbps=50.0, rtt_ms=rtt)
        assert _near_best(bundle, wifi_choice, wifi, hysteresis)
        # The step: 3G, or a slower 3G where the bundle (planned on this machine,
        # perhaps under load) still near-ties the WiFi choice on plain 3G.
        steps = [(step, Conditions(uplink_mbps=step.uplink_mbps, downlink_mbps=step.downlink_mbps, rtt_ms=rtt + 90))
                 for step in (THREE_G, SLOW_3G, SLOWER_3G)]
        step, three_g = next(((s, c) for s, c in steps if not _near_best(bundle, wifi_choice, c, hysteresis)),
                             (None, None))
        assert step is not None, "the step must change the best partition for this test to mean anything"
        best_3g = bundle.choose(three_g)
        # No probe in flight across the step: one that measured its RTT on WiFi
        # and its sends on 3G would hand the edge a WiFi RTT with a 3G
        # bandwidth (a known limit, README "Notes and known limits").
        gw.probe()
        link.set(step)
        chosen, seen = [], []
        for _ in range(3):
            chosen.append(gw.infer(model, x).trace.partition)
            seen.append(gw.conditions())
        assert _near_best(bundle, chosen[-1], three_g, hysteresis), (
            f"after WiFi->3G the gateway ran {chosen}, best is {best_3g}; it saw "
            + "; ".join(f"{c.uplink_mbps:.2f} Mbps, {c.rtt_ms:.0f} ms" for c in seen)
        )
        est = gw.conditions()
        assert est.uplink_mbps < 5, f"uplink estimate {est.uplink_mbps} did not follow the step"


def test_a_probe_stuck_in_an_outage_keeps_the_next_request_on_the_device(switch_bundle, cloud_tier) -> None:
    bundle = switch_bundle
    model = bundle.model_name
    x = _input(bundle)
    with ShapingProxy(cloud_tier.address, WIFI) as link, Gateway(
        [bundle], cloud=link.address, device_time_from_profile=True
    ) as gw:
        gw.probe()
        for _ in range(3):
            on_wifi = gw.infer(model, x).trace
        assert on_wifi.partition != "device" and on_wifi.fallback is None, "offloading must win on WiFi here"
        link.set(LinkConditions(uplink_mbps=18.88, downlink_mbps=50.0, rtt_ms=10.0, outage=True))  # a tunnel
        t0 = time.perf_counter()
        gw.probe()  # ServerLive times out after 2 s
        assert time.perf_counter() - t0 >= 1.5
        assert gw.conditions().rtt_ms >= 1500, "a probe stuck until its timeout says the link is at least that slow"
        in_tunnel = gw.infer(model, x).trace
        assert in_tunnel.partition == "device" and in_tunnel.fallback is None, (
            f"the request after the stuck probe ran {in_tunnel.partition} ({in_tunnel.fallback})"
        )


def test_a_reported_network_change_moves_an_edge_on_the_device_to_the_better_link(switch_bundle, cloud_tier) -> None:
    """On the device over a slow link the edge sends nothing, so it cannot see
    the link get better; the OS's report of the handover (``network_changed``)
    makes it measure at once."""
    bundle = switch_bundle
    model = bundle.model_name
    x = _input(bundle)
    slow = LinkConditions(uplink_mbps=0.13, downlink_mbps=0.5, rtt_ms=300.0)  # CAT1 (DADS)
    assert bundle.choose(Conditions(uplink_mbps=0.13, downlink_mbps=0.5, rtt_ms=300.0)) == "device"
    with ShapingProxy(cloud_tier.address, slow) as link, Gateway(
        [bundle], cloud=link.address, device_time_from_profile=True, probe_interval_s=120.0, calibrate=False
    ) as gw:
        gw.probe()
        assert [gw.infer(model, x).trace.partition for _ in range(2)] == ["device", "device"]
        link.set(WIFI)
        assert gw.infer(model, x).trace.partition == "device", "unannounced, the better link goes unseen"
        gw.network_changed()
        deadline = time.monotonic() + 10.0
        while gw.conditions().uplink_mbps < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        seen = gw.conditions()
        assert seen.uplink_mbps >= 5, f"no probe after the report: {seen.uplink_mbps:.2f} Mbps"
        after = gw.infer(model, x).trace.partition
        wifi = Conditions(uplink_mbps=18.88, downlink_mbps=50.0, rtt_ms=seen.rtt_ms)
        assert after != "device" and _near_best(bundle, after, wifi, 0.1), (
            f"after the reported change the gateway ran {after}; best on WiFi is {bundle.choose(wifi)}"
        )


def test_a_reported_network_change_abandons_the_probe_measuring_the_old_link(switch_bundle, cloud_tier) -> None:
    """A probe under way on CAT1 when the OS reports the handover records
    nothing (its samples straddle two links); a fresh probe measures WiFi."""
    import threading

    slow = LinkConditions(uplink_mbps=0.13, downlink_mbps=0.5, rtt_ms=300.0)
    with ShapingProxy(cloud_tier.address, slow) as link, Gateway(
        [switch_bundle], cloud=link.address, probe_interval_s=120.0, probe_bytes=16 * 1024
    ) as gw:
        gw.probe()
        assert gw.conditions().uplink_mbps < 0.5
        monitor = gw.link
        recorded: list[list[float]] = []
        observe_probe = monitor.observe_probe

        def spy(rtts, *args, **kwargs):  # the real method, noting each probe it records
            recorded.append(list(rtts))
            return observe_probe(rtts, *args, **kwargs)

        monitor.observe_probe = spy
        sent_before = link.bytes_up
        old = threading.Thread(target=gw.probe, daemon=True)
        old.start()
        # Wait for the probe's 16 KB send to reach the link (after its ~0.3 s round
        # trips, far more than their few hundred bytes); it takes ~1 s to cross.
        deadline = time.monotonic() + 10.0
        while link.bytes_up - sent_before < 8 * 1024 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert link.bytes_up - sent_before >= 8 * 1024, "the probe never started its send"
        link.set(WIFI)
        gw.network_changed()
        old.join(timeout=10.0)
        deadline = time.monotonic() + 10.0
        while not recorded and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)                  # (a second record, if any, would land by now)
        assert len(recorded) == 1, f"probes recorded after the report: {recorded}"
        assert max(recorded[0]) < 150, f"the recorded probe measured the old link: RTTs {recorded[0]} ms"
        assert gw.conditions().uplink_mbps >= 5 and gw.conditions().rtt_ms < 150


def _near_best(bundle, partition: str, c: Conditions, hysteresis: float) -> bool:
    """Is ``partition`` predicted within the policy's hysteresis of the table's best?

    Two encodings of one cut (cut-10@fp16 vs cut-10@int8) can be near-tied;
    the policy rightly keeps either.
    """
    best = bundle.estimate(bundle.choose(c), c).latency_ms
    return bundle.estimate(partition, c).latency_ms <= best * (1 + hysteresis) + 1e-9


def test_cloud_killed_mid_run_loses_nothing_and_the_open_breaker_skips_the_cloud(zoo_bundle, cloud_tier) -> None:
    """The cloud app is deleted mid-run: every request is still answered, right,
    and after ``breaker_failures`` failed calls the breaker opens and the rest
    run device-only without a call (nothing sent, no network or cloud time).
    What that saves in latency (open-breaker vs device-only, paired medians) is
    measured by ``benchmarks/bench_faults.py --only breaker_latency``."""
    from ray import serve

    from splitgate.cloud import build_app

    model = zoo_bundle.model_name
    x = _input(zoo_bundle)
    want = _expected(zoo_bundle, x)
    cut = [p.id for p in zoo_bundle.partitions.values() if p.kind == "split"][0]
    results, errors = [], []
    with Gateway([zoo_bundle], cloud=cloud_tier.address, breaker_failures=3, breaker_reset_s=60) as gw:
        for _ in range(3):
            assert gw.infer(model, x, partition=cut).trace.fallback is None
        serve.delete(cloud_tier.config.app_name)  # the cloud dies mid-run
        try:
            for _ in range(40):
                try:
                    results.append(gw.infer(model, x, partition=cut))
                except Exception as exc:  # noqa: BLE001 - counted, the assert says what failed
                    errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            # Bring the cloud back for the tests after this one.
            serve.run(build_app(cloud_tier.config), name=cloud_tier.config.app_name, route_prefix="/")
        assert len(results) == 40, f"{len(errors)} of 40 requests raised: {errors[:3]}"
        for r in results:
            np.testing.assert_allclose(r.outputs[next(iter(r.outputs))], want, rtol=1e-4, atol=1e-5)
        reasons = [r.trace.fallback for r in results]
        assert all(reasons), f"every request after the kill must have fallen back: {reasons}"
        assert gw.breaker_state == "open"
        assert "breaker-open" in reasons, reasons
        opened = reasons.index("breaker-open")
        assert reasons[opened:] == ["breaker-open"] * (40 - opened), f"the breaker closed again: {reasons}"
        assert 40 - opened >= 30, f"the breaker opened only after {opened} failed calls: {reasons}"
        for r in results[opened:]:
            t = r.trace
            assert (t.partition, t.bytes_sent, t.network_ms, t.cloud_ms) == ("device", 0, 0.0, 0.0), (
                f"an open-breaker request touched the cloud: {t}"
            )
        snap = gw.metrics.snapshot()
        assert snap[f"splitgate_fallbacks_total{{model={model},partition=device,reason=breaker-open}}"] == 40 - opened


def test_deadline_falls_back_to_local_suffix(slow_device_bundle, cloud_tier) -> None:
    bundle = slow_device_bundle
    model = bundle.model_name
    x = _input(bundle)
    want = _expected(bundle, x)
    with ShapingProxy(cloud_tier.address, LinkConditions(rtt_ms=10)) as link, Gateway(
        [bundle], cloud=link.address, breaker_failures=100
    ) as gw:
        gw.infer(model, x, partition="cloud")
        link.set(outage=True)  # a black hole: the call hangs until its deadline
        start = time.perf_counter()
        r = gw.infer(model, x, partition="cloud", deadline_ms=1500)
        elapsed = time.perf_counter() - start
        link.set(outage=False)
    np.testing.assert_allclose(r.outputs[next(iter(r.outputs))], want, rtol=1e-4, atol=1e-5)
    assert r.trace.fallback in ("hedged", "deadline_exceeded")
    assert elapsed < 5.0  # bounded by the deadline, not by a TCP timeout


def test_gateway_errors_are_typed(zoo_bundle, cloud_tier) -> None:
    from splitgate.errors import InvalidArgument, NotFound

    model = zoo_bundle.model_name
    x = _input(zoo_bundle)
    (name,) = x
    with Gateway([zoo_bundle], cloud=cloud_tier.address) as gw:
        with pytest.raises(InvalidArgument, match="unknown input 'nope'"):
            gw.infer(model, {"nope": x[name]})
        with pytest.raises(InvalidArgument, match=f"input '{name}' has datatype FP64"):
            gw.infer(model, {name: x[name].astype(np.float64)})
        with pytest.raises(InvalidArgument, match="dimension 1 must be"):
            gw.infer(model, {name: x[name][:, :1]})
        with pytest.raises(NotFound, match="not loaded"):
            gw.infer("missing", x)
        with pytest.raises(NotFound, match="cut-999"):
            gw.infer(model, x, partition="cut-999")
        with pytest.raises(InvalidArgument, match="private"):
            gw.infer(model, x, partition="cloud", private=True)
        # ...and it still serves.
        assert gw.infer(model, x, partition="cloud").trace.fallback is None


@pytest.mark.parametrize("encoding", ["fp16", "int8", "int8c", "zstd"])
def test_compressed_cut_tensors_through_ray_serve(zoo_bundle, cloud_tier, encoding) -> None:
    model = zoo_bundle.model_name
    x = _input(zoo_bundle)
    want = _expected(zoo_bundle, x)
    cut = [p.id for p in zoo_bundle.partitions.values() if p.kind == "split"][0]
    with Gateway([zoo_bundle], cloud=cloud_tier.address) as raw_gw, Gateway(
        [zoo_bundle], cloud=cloud_tier.address, encoding=encoding
    ) as gw:
        raw = raw_gw.infer(model, x, partition=cut)
        r = gw.infer(model, x, partition=cut)
    assert r.trace.fallback is None
    out = next(iter(r.outputs.values()))
    if encoding == "zstd":
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
        assert r.trace.bytes_sent < raw.trace.bytes_sent
    else:
        # Lossy, but the classifier's answer must survive.
        assert np.array_equal(out.argmax(axis=-1), want.argmax(axis=-1))
        ratio = raw.trace.bytes_sent / r.trace.bytes_sent
        assert ratio >= (1.9 if encoding == "fp16" else 3.5), f"{encoding} saved only {ratio:.2f}x"
