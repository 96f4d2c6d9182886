"""Experiment specs, the analytic engine, and the engines-agree check (real Ray Serve tier,
real gRPC, real ShapingProxy, real Gateways)."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from splitgate.experiments import ExperimentSpec, load_spec
from splitgate.experiments.analytic import run_analytic, simulate_policy
from splitgate.experiments.policies import chain_partitions, cloud_only_choice, neurosurgeon_choice
from splitgate.netsim import traces
from splitgate.planner import Conditions

SPECS = sorted((Path(__file__).resolve().parents[1] / "experiments" / "specs").glob("*.yaml"))


def _spec(bundle, trace, **kw) -> ExperimentSpec:
    base = dict(name="t", model=bundle.model_name, trace=trace, device_slowdown=1.0,
                nominal=Conditions(uplink_mbps=0.4, downlink_mbps=1.0, rtt_ms=300.0), analytic_repeats=2)
    base.update(kw)
    return ExperimentSpec(**base)


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_bundled_specs_parse(path: Path) -> None:
    spec = load_spec(path)
    assert spec.trace.duration_s > 0 and spec.policies
    assert spec.trace.duration_s <= 100, "keep bundled live runs short"


def test_analytic_on_a_constant_link_is_the_plan_estimate(slow_device_bundle) -> None:
    b = slow_device_bundle
    tr = traces.constant("3g", 20, uplink_mbps=2.0, downlink_mbps=2.0, rtt_ms=80.0, jitter_ms=0.0)
    spec = _spec(b, tr, interval_ms=500)
    c = Conditions(uplink_mbps=2.0, downlink_mbps=2.0, rtt_ms=80.0)
    # cloud-only: the best guarded cloud encoding for the nominal link; cloud-raw: the raw fp32 upload
    for policy, pid in (("device", "device"), ("cloud", cloud_only_choice(b, spec.nominal)), ("cloud-raw", "cloud"),
                        ("dads", b.choose(spec.nominal))):
        recs = simulate_policy(spec, b, policy)
        assert {r.partition for r in recs} == {pid}
        want = b.estimate(pid, c).latency_ms
        # the only difference: a few hundred bytes of gRPC/HTTP2 framing per request
        assert statistics.fmean(r.latency_ms for r in recs) == pytest.approx(want, rel=0.02, abs=2.0)
        assert all(r.energy_mj > 0 for r in recs)


def test_chain_scan_uses_chain_cuts_only_and_adaptive_follows_steps(slow_device_bundle) -> None:
    b = slow_device_bundle
    chain = chain_partitions(b)
    assert all(p in ("device", "cloud") or p.startswith(("cut-", "cloud@")) for p in chain)
    for up in (0.13, 1.1, 5.85, 18.88, 100.0):
        assert neurosurgeon_choice(b, Conditions(uplink_mbps=up, rtt_ms=50)) in chain
    tr = traces.steps([("wifi", 15), ("cat1", 15)])
    spec = _spec(b, tr, interval_ms=300, gateway={"probe_interval_s": 2})
    recs = simulate_policy(spec, b, "adaptive")
    late_wifi = [r.partition for r in recs if 8 < r.t_s < 15]
    late_cat1 = [r.partition for r in recs if r.t_s > 24]
    best = lambda p: b.choose(Conditions(uplink_mbps=p.uplink_mbps, downlink_mbps=p.downlink_mbps, rtt_ms=p.rtt_ms))  # noqa: E731
    assert statistics.mode(late_wifi) == best(tr.at(10)) and statistics.mode(late_cat1) == best(tr.at(25))


def test_analytic_replays_outages_as_gateway_hedges(slow_device_bundle) -> None:
    b = slow_device_bundle
    tr = traces.with_outages(traces.constant("wifi", 20), [(5, 10)])
    spec = _spec(b, tr, interval_ms=500, gateway={"deadline_ms": 2000})
    recs = run_analytic(spec, b, repeats=1)
    cloud_in_outage = [r for r in recs if r.policy == "cloud" and 5 <= r.t_s < 13]
    assert cloud_in_outage and all(r.fallback == "hedged" for r in cloud_in_outage)
    assert all(not r.fallback for r in recs if r.policy == "device")


TRACE_SPECS = [p for p in SPECS if load_spec(p).trace.name not in ("constant",) and "dads" not in p.stem
               and p.stem != "agreement"]


@pytest.mark.parametrize("path", TRACE_SPECS, ids=[p.stem for p in TRACE_SPECS])
def test_adaptive_is_within_5_percent_of_the_best_static_policy(path: Path, slow_device_bundle) -> None:
    """The issue's bar, in the analytic engine, on every bundled trace (the
    tests' planned bundle, so no re-profiling noise): adaptive's mean latency
    is at most 5 % above the best of device-only, cloud-only and the DADS plan."""
    from splitgate.experiments._records import adaptive_vs_static, summarize

    spec = load_spec(path)
    spec.model = slow_device_bundle.model_name
    recs = run_analytic(spec, slow_device_bundle, repeats=5)
    best, best_ms, ratio = adaptive_vs_static(summarize(recs), "analytic")
    print(f"{spec.name}: adaptive {100 * (ratio - 1):+.1f}% vs {best} {best_ms:.1f} ms")
    assert ratio <= 1.05, f"{spec.name}: adaptive {ratio * best_ms:.1f} ms vs {best} {best_ms:.1f} ms"


@pytest.mark.integration
def test_live_and_analytic_engines_agree_within_10_percent(slow_device_bundle, cloud_tier) -> None:
    """The issue's check: on a shared spec (``experiments/specs/agreement.yaml``: a
    steady 0.4 Mbps / 300 ms link, 24 s) the live engine (real Gateway ->
    ShapingProxy -> Ray Serve, device emulated at the profile's planned times by
    ``GatewayConfig.device_time_from_profile``) and the analytic engine give the
    same median latency for every policy within 10% (medians, the project's
    convention: a preempted request on this 2-core box must not decide it):
    device-bound (``device``,
    and the policies that choose it on this link) and network-bound (``cloud``)
    alike. The link is steady, so each policy's latency is nearly constant and
    the mean over its 16-48 live requests is stable even on a loaded machine.
    (On a link where a split cut wins, e.g. 0.6 Mbps / 100 ms, the live split
    runs 5% (median) to 10% (mean) slower than planned: the live gRPC + proxy +
    Serve stack adds ~25-50 ms per call on this shared machine, which the
    analytic engine does not model; see README.)"""
    from splitgate.experiments.live import run_live

    b = slow_device_bundle
    spec = load_spec(Path(__file__).resolve().parents[1] / "experiments" / "specs" / "agreement.yaml")
    spec.model = b.model_name
    live = run_live(spec, b, cloud_tier.address)
    analytic = run_analytic(spec, b, repeats=10)
    rows = []
    for policy in spec.policies:
        lv = [r.latency_ms for r in live if r.policy == policy]
        an = [r.latency_ms for r in analytic if r.policy == policy]
        assert len(lv) >= 10, f"{policy}: only {len(lv)} live requests"
        rows.append((policy, statistics.fmean(lv), statistics.fmean(an), statistics.median(lv),
                     statistics.median(an)))
    report = "; ".join(f"{p}: live {lm:.0f} / analytic {am:.0f} ms ({100 * (lm / am - 1):+.1f}%, medians "
                       f"{l2:.0f}/{a2:.0f})" for p, lm, am, l2, a2 in rows)
    print(report)
    assert all(not r.fallback for r in live), f"no fallbacks expected on a steady link: {report}"
    off = [p for p, _, _, lmed, amed in rows if abs(lmed - amed) > 0.10 * amed]
    assert not off, f"engines disagree by more than 10% on {off}: {report}"


def test_a_reported_radio_change_moves_adaptive_off_the_device_sooner(slow_device_bundle) -> None:
    """On the device through 3G, the adaptive Gateway sees no calls; told of the
    3G -> WiFi handover (``network_hints``), it probes at once instead of
    waiting for its probe interval, and reaches the cloud-using plan sooner."""
    b = slow_device_bundle
    tr = traces.steps([("3g", 20), ("wifi", 20)])
    assert tr.radio_changes() == [20.0]
    wifi = b.choose(Conditions(uplink_mbps=tr.at(25).uplink_mbps, downlink_mbps=tr.at(25).downlink_mbps,
                               rtt_ms=tr.at(25).rtt_ms))
    assert wifi != "device" and b.choose(Conditions(uplink_mbps=0.0001, rtt_ms=2000)) == "device"

    def first_on_wifi_plan(hints: bool) -> float:
        spec = _spec(b, tr, interval_ms=250, network_hints=hints, gateway={"probe_interval_s": 5})
        return min(r.t_s for r in simulate_policy(spec, b, "adaptive") if r.t_s >= 20 and r.partition == wifi)

    told, untold = first_on_wifi_plan(True), first_on_wifi_plan(False)
    assert told <= 20.75, f"told of the handover, adaptive still waited until t={told}"
    assert untold > told


def test_paired_ratio_compares_the_same_requests() -> None:
    """A static policy that overran a slot skipped the next one; the paired
    comparison leaves adaptive's extra request there out."""
    from splitgate.experiments._records import Record, paired_ratio

    def rec(policy: str, t: float, ms: float) -> Record:
        return Record("live", policy, 0, 0, t, "3g", 1.1, 2.0, 100.0, False, "x", ms, 1.0, 0.0, 0.0, 0.0, 0, 0, "")

    records = [rec("cloud", 0.0, 600.0), rec("cloud", 1.01, 100.0),                           # skipped 0.5
               rec("adaptive", 0.0, 480.0), rec("adaptive", 0.5, 480.0), rec("adaptive", 1.0, 110.0)]
    assert paired_ratio(records, "live", ["cloud"], 0.5) == pytest.approx((480.0 + 110.0) / (600.0 + 100.0))
    assert paired_ratio(records, "analytic", ["cloud"], 0.5) is None
