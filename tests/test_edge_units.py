"""Unit tests of the edge's parts: breaker, estimators, cache (fakes allowed here)."""

from __future__ import annotations

import numpy as np
import pytest

from splitgate.edge._breaker import CircuitBreaker
from splitgate.edge._cache import ResultCache, input_digest
from splitgate.edge._monitor import BatteryMonitor, Ewma, LinkMonitor


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_half_opens_and_closes() -> None:
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=3, reset_timeout_s=5, clock=clock)
    for _ in range(2):
        b.record_failure()
    assert b.state == "closed" and b.allow()
    b.record_failure()
    assert b.state == "open" and not b.allow()
    clock.now = 4.9
    assert not b.allow()
    clock.now = 5.0
    assert b.state == "half-open"
    assert b.allow()          # one probe...
    assert not b.allow()      # ...at a time
    b.record_failure()        # the probe failed: open again, timer restarts
    assert b.state == "open"
    clock.now = 10.0
    assert b.allow()
    b.record_success()
    assert b.state == "closed" and b.allow() and b.allow()


def test_success_resets_failure_count() -> None:
    b = CircuitBreaker(failure_threshold=2)
    b.record_failure()
    b.record_success()
    b.record_failure()
    assert b.state == "closed"


def test_ewma_ignores_a_spike_but_follows_a_step() -> None:
    e = Ewma(alpha=0.5, outlier_ratio=4)
    for _ in range(5):
        e.add(20.0)
    e.add(500.0)              # a single spike is held back
    assert e.value == pytest.approx(20.0)
    e.add(20.0)               # ...and forgotten
    assert e.value == pytest.approx(20.0)
    e.add(1.0)
    e.add(1.1)                # two samples on the same side: a real step
    assert e.value == pytest.approx(np.sqrt(1.0 * 1.1))
    e.add(float("nan"))
    assert np.isfinite(e.value)


def test_link_monitor_separates_rtt_and_bandwidth() -> None:
    m = LinkMonitor(min_bandwidth_bytes=1000)
    for _ in range(3):
        m.observe_rtt(40.0)
    # 1 MB in 40 ms RTT + 800 ms transfer = 10 Mbps up.
    for _ in range(3):
        m.observe(1_000_000, 100, 840.0)
    est = m.estimate()
    assert est.rtt_ms == pytest.approx(40.0)
    assert est.uplink_mbps == pytest.approx(10.0, rel=0.01)
    # A big download: 2 MB in 40 + 160 ms = 100 Mbps down.
    m.observe(100, 2_000_000, 200.0)
    assert m.estimate().downlink_mbps == pytest.approx(100.0, rel=0.05)


def test_battery_override_and_validation() -> None:
    b = BatteryMonitor()
    assert 0 <= b.level() <= 100
    b.set(15)
    assert b.level() == 15
    with pytest.raises(ValueError, match="0..100"):
        b.set(150)


def test_result_cache_is_lru_and_keyed_by_content() -> None:
    cache = ResultCache(2)
    x = {"x": np.arange(4, dtype=np.float32)}
    d1 = input_digest(x)
    assert d1 == input_digest({"x": np.arange(4, dtype=np.float32)})
    assert d1 != input_digest({"x": np.arange(4, dtype=np.float64)})
    assert d1 != input_digest({"x": np.arange(4, dtype=np.float32).reshape(2, 2)})
    cache.put(("m", "p", "a"), {"y": np.ones(1)})
    cache.put(("m", "p", "b"), {"y": np.ones(1)})
    assert cache.get(("m", "p", "a")) is not None  # a is now most recent
    cache.put(("m", "p", "c"), {"y": np.ones(1)})
    assert cache.get(("m", "p", "b")) is None
    assert cache.get(("m", "p", "a")) is not None and cache.get(("m", "p", "c")) is not None


def test_small_calls_do_not_hide_a_stale_bandwidth_estimate() -> None:
    clock = FakeClock()
    m = LinkMonitor(min_bandwidth_bytes=1000, stale_after_s=5, clock=clock)
    m.observe(1_000_000, 100, 840.0)
    assert not m.stale()
    for t in range(1, 10):
        clock.now = float(t)
        m.observe(100, 100, 40.0)  # small cut: an RTT sample only
    assert m.estimate().age_s == 0.0
    assert m.stale(), "bandwidth not measured for 9 s must make a probe due"


def test_a_confirmed_step_flags_a_shift_and_reset_replaces_the_estimate() -> None:
    m = LinkMonitor(min_bandwidth_bytes=1000)
    m.observe_rtt(30.0)
    for _ in range(3):
        m.observe(1_000_000, 0, 30.0 + 400.0)      # 20 Mbps
    assert not m.shifted()
    m.observe(1_000_000, 0, 30.0 + 8000.0)         # one sample at 1 Mbps: held back
    assert not m.shifted()
    m.observe(1_000_000, 0, 30.0 + 8000.0)         # confirmed: a step
    assert m.shifted()
    m.clear_shift()
    m.observe_rtt(120.0, reset=True)
    assert m.estimate().rtt_ms == 120.0 and not m.shifted()


def test_a_probe_whose_samples_agree_confirms_a_step_at_once() -> None:
    m = LinkMonitor(min_bandwidth_bytes=1000)
    m.observe_probe([20.0, 21.0], 100_000, [20.0 + 800.0, 20.0 + 820.0])       # ~1 Mbps
    assert m.estimate().uplink_mbps == pytest.approx(1.0, rel=0.05)
    m.observe_probe([20.0, 22.0], 100_000, [20.0 + 160.0, 20.0 + 165.0])       # 5 Mbps, both sends agree
    assert m.estimate().uplink_mbps == pytest.approx(5.0, rel=0.05), "two agreeing sends must confirm the step"
    assert not m.shifted(), "a full probe measured both RTT and bandwidth: nothing is left to re-measure"
    m.observe_probe([20.0, 22.0], 100_000, [20.0 + 800.0, 20.0 + 3000.0])      # disagree: one sample, held back
    assert m.estimate().uplink_mbps == pytest.approx(5.0, rel=0.05)
    assert not m.shifted()


def test_rtt_samples_drifting_make_a_probe_due() -> None:
    clock = FakeClock()
    m = LinkMonitor(min_bandwidth_bytes=1000, stale_after_s=5, clock=clock)
    m.observe_probe([150.0, 150.0], 100_000, [950.0, 950.0])
    for t, rtt in ((1.5, 150.0), (2.0, 160.0), (2.5, 75.0)):
        clock.now = t
        m.observe(500, 500, rtt)  # a small cut: RTT samples only
    assert m.probe_needed() is None, "one low sample is not a drift"
    clock.now = 3.0
    m.observe(500, 500, 75.0)
    assert m.probe_needed() == "drift"
    m.clear_shift()
    assert m.probe_needed() is None


def test_probe_needed_reasons_in_order() -> None:
    clock = FakeClock()
    m = LinkMonitor(min_bandwidth_bytes=1000, stale_after_s=2, clock=clock)
    assert m.probe_needed() == "first"
    m.observe_probe([50.0, 50.0], 100_000, [850.0, 850.0])                      # 1 Mbps, 50 ms
    assert m.probe_needed() is None
    assert m.probe_interval_s() == 2.0, "no request uses the link: probes delay nobody"
    for t in (0.5, 1.0, 1.5, 2.0, 2.5):
        clock.now = t
        m.observe(500, 500, 54.0)           # a small cut in use: 50 ms RTT + 4 ms for 500 B at 1 Mbps
    # two 32 KB sends + 4 RTTs take ~0.72 s: at most 20 % of the link's time
    assert m.probe_interval_s() == pytest.approx(2 * (32 * 1024 * 8 / 1e6 + 0.1) / 0.2, rel=1e-3)
    assert m.probe_needed() is None, "on a slow link in use probes must keep to their share of it"
    clock.now = 4.0
    assert m.probe_needed() == "stale"
    m.observe(100_000, 0, 50.0 + 8000.0)
    m.observe(100_000, 0, 50.0 + 8000.0)
    assert m.probe_needed() == "shift"


def test_a_late_call_moves_an_optimistic_estimate_at_once() -> None:
    clock = FakeClock()
    m = LinkMonitor(min_bandwidth_bytes=1000, stale_after_s=5, clock=clock)
    m.observe_probe([40.0, 40.0], 100_000, [40.0 + 80.0, 40.0 + 80.0])        # 10 Mbps
    m.observe_late(500, 0, 900.0)                                               # small cut stuck 900 ms
    assert m.estimate().rtt_ms == 900.0
    assert m.probe_needed() == "stale", "after a late call the link must be measured again"
    m.observe_late(500, 0, 300.0)                                               # less than known: no change
    assert m.estimate().rtt_ms == 900.0
    m.observe_late(100_000, 0, 900.0 + 800.0)                                   # big cut: bandwidth <= 1 Mbps
    assert m.estimate().uplink_mbps == pytest.approx(1.0, rel=0.05)


def test_hedge_delay_is_the_earlier_of_the_deadline_and_latency_rules() -> None:
    from splitgate.edge import hedge_delay_ms

    assert hedge_delay_ms(3000.0, None, None) == pytest.approx(2400.0)          # deadline rule, suffix unknown
    assert hedge_delay_ms(3000.0, 500.0, None) == pytest.approx(2400.0)         # 3000 - 1.2 x 500
    assert hedge_delay_ms(3000.0, 500.0, 200.0) == pytest.approx(600.0)         # 3 x predicted leg
    assert hedge_delay_ms(3000.0, 500.0, 200.0, factor=0) == pytest.approx(2400.0)
    assert hedge_delay_ms(3000.0, 500.0, 2.0) == pytest.approx(200.0)           # floor
    assert hedge_delay_ms(300.0, 500.0, 2000.0) == 0.0                          # no time left: race at once


def test_cloud_client_keeps_sequential_calls_on_one_replica_and_spreads_concurrent_ones() -> None:
    from splitgate.edge import CloudClient

    eps = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    with CloudClient("127.0.0.1:9", endpoints=eps) as client:
        picks = {client._targets()[0][0] for _ in range(20)}
        assert len(picks) == 1, "sequential calls must stay on the replica used last"
        first = picks.pop()
        assert client._targets()[-1][0] == "127.0.0.1:9", "the proxy is always the fallback"
        client._in_flight[first] = 2          # two calls of ours in flight there
        other = client._targets()[0][0]
        assert other != first
        client._in_flight[other] = 1
        third = client._targets()[0][0]
        assert third not in (first, other), "a third concurrent call goes to the idle replica"
    clients = [CloudClient("127.0.0.1:9", endpoints=eps) for _ in range(40)]
    starts = {c._targets()[0][0] for c in clients}
    for c in clients:
        c.close()
    assert len(starts) > 1, "fresh clients must not all start on the same replica"


def test_bad_news_is_believed_at_once_good_news_averaged() -> None:
    up = Ewma(worse="low")
    up.add(10.0)
    up.add(5.0)                          # 2x worse: replaces the mean
    assert up.value == 5.0
    up.add(10.0)                         # 2x better: averaged in
    assert up.value == pytest.approx(7.5)
    rtt = Ewma(worse="high")
    rtt.add(100.0)
    rtt.add(300.0)                       # 3x worse delay: replaces
    assert rtt.value == 300.0
    rtt.add(3000.0)                      # a 10x spike is still held back
    assert rtt.value == 300.0


def test_only_a_step_for_the_worse_flags_shifted_worse() -> None:
    m = LinkMonitor(min_bandwidth_bytes=1000)
    m.observe_probe([20.0, 21.0], 100_000, [20.0 + 800.0, 20.0 + 820.0])       # ~1 Mbps
    m.observe_probe([], 100_000, [20.0 + 160.0, 20.0 + 165.0])                 # 5 Mbps: better
    assert m.shifted() and not m.shifted_worse()
    m.clear_shift()
    m.observe_probe([], 100_000, [20.0 + 4000.0, 20.0 + 4100.0])               # 0.2 Mbps: worse
    assert m.shifted() and m.shifted_worse()
    m.clear_shift()
    assert not m.shifted() and not m.shifted_worse()


class _TableBundle:
    """A stand-in for a PlanBundle's decision table: device below ``cut_mbps``."""

    has_profile = True

    def __init__(self, cut_mbps: float) -> None:
        self.cut_mbps = cut_mbps

    def choose(self, c) -> str:
        return "cut-5" if c.uplink_mbps >= self.cut_mbps else "device"


def test_rtt_is_re_measured_first_only_when_it_can_change_the_decision() -> None:
    from splitgate.edge import rtt_first
    from splitgate.planner import Conditions

    m = LinkMonitor(min_bandwidth_bytes=1000)
    m.observe_probe([20.0, 21.0], 100_000, [20.0 + 160.0, 20.0 + 165.0])       # 5 Mbps
    for _ in range(2):
        m.observe(100_000, 0, 20.0 + 800.0)                                     # 1 Mbps, twice: a step for the worse
    now = Conditions(uplink_mbps=m.estimate().uplink_mbps, rtt_ms=20.0)
    assert rtt_first(m, _TableBundle(cut_mbps=0.5), now), "a cloud choice on a worse link needs the new RTT"
    assert not rtt_first(m, _TableBundle(cut_mbps=2.0), now), "a longer RTT cannot move a device choice"
    m.clear_shift()
    for _ in range(2):
        m.observe(100_000, 0, 20.0 + 160.0)                                     # back to 5 Mbps: better
    assert m.shifted()
    assert not rtt_first(m, _TableBundle(cut_mbps=0.5), now), "a better link waits for the background probe"


def test_a_small_calls_transfer_time_is_not_counted_as_rtt() -> None:
    m = LinkMonitor(min_bandwidth_bytes=16 * 1024)
    m.observe_probe([120.0, 121.0], 32 * 1024, [120.0 + 280.0, 120.0 + 281.0])  # ~0.94 Mbps, 120 ms
    for _ in range(4):
        m.observe(8192, 40, 120.0 + 8192 * 8 / 0.94e3)     # an 8 KB cut: 120 ms RTT + 70 ms sending
    assert m.estimate().rtt_ms == pytest.approx(120.0, rel=0.02), "the cut's transfer time is not RTT"
    assert m.estimate().uplink_mbps == pytest.approx(0.94, rel=0.02)


def test_calibration_learns_a_swinging_link_and_forgets_it() -> None:
    from splitgate.edge import LinkCalibration, calibrated
    from splitgate.planner import Conditions

    clock = FakeClock()
    cal = LinkCalibration(alpha=0.2, half_life_s=8.0, cap=2.0, clock=clock)
    for _ in range(10):
        cal.observe(300.0, 300.0)                     # a steady link: calls take what was predicted
    assert cal.factor() == 1.0
    for _ in range(10):
        clock.now += 1.0
        cal.observe(300.0, 750.0)                     # each call 2.5x slower than its prediction
    assert 1.5 < cal.factor() <= 2.0, "learned, and the cap bounds it"
    high = cal.factor()
    clock.now += 8.0
    assert cal.factor() == pytest.approx(high ** 0.5, rel=1e-6), "the excess halves in a half-life"
    cal.observe(300.0, 100.0)                         # faster than predicted: less pessimism, never below 1
    assert 1.0 <= cal.factor() < high ** 0.5
    c = Conditions(uplink_mbps=2.0, downlink_mbps=4.0, rtt_ms=100.0)
    slow = calibrated(c, 2.0)
    assert (slow.uplink_mbps, slow.downlink_mbps, slow.rtt_ms) == (1.0, 2.0, 200.0)
    assert calibrated(c, 1.0) is c


def test_a_slow_call_that_shared_the_link_with_a_probe_is_averaged_not_believed() -> None:
    m = LinkMonitor(min_bandwidth_bytes=16 * 1024)
    m.observe_probe([100.0, 101.0], 32 * 1024, [100.0 + 262.0, 100.0 + 263.0])  # ~1 Mbps, 100 ms
    m.observe(3072, 40, 100.0 + 24.6 + 250.0, shared=True)  # a 3 KB cut queued 250 ms behind the probe
    assert m.estimate().rtt_ms == pytest.approx(0.5 * 100.0 + 0.5 * 350.0, rel=0.02)
    m2 = LinkMonitor(min_bandwidth_bytes=16 * 1024)
    m2.observe_probe([100.0, 101.0], 32 * 1024, [100.0 + 262.0, 100.0 + 263.0])
    m2.observe(3072, 40, 100.0 + 24.6 + 250.0)            # the same call alone on the link: bad news, believed
    assert m2.estimate().rtt_ms == pytest.approx(350.0, rel=0.02)


def test_a_hedged_call_far_slower_than_the_estimate_is_a_step_for_the_worse() -> None:
    m = LinkMonitor(min_bandwidth_bytes=16 * 1024)
    m.observe_probe([20.0, 21.0], 100_000, [20.0 + 40.0, 20.0 + 41.0])         # ~20 Mbps (WiFi)
    m.observe_late(49_152, 0, 400.0)                                            # hedged: at most ~1 Mbps
    assert m.estimate().uplink_mbps < 1.2
    assert m.shifted_worse(), "the RTT is the old link's: re-measure it before a decision it could change"
    m.clear_shift()
    m.observe_late(49_152, 0, 420.0)                                            # about the same: no new step
    assert not m.shifted_worse()


def test_a_reported_network_change_makes_a_probe_due_until_a_probe_starts() -> None:
    m = LinkMonitor(min_bandwidth_bytes=16 * 1024, stale_after_s=60.0)
    m.observe_probe([20.0, 21.0], 100_000, [20.0 + 40.0, 20.0 + 41.0])
    assert m.probe_needed() is None
    m.mark_changed()                                  # the OS: WiFi -> LTE
    assert m.probe_needed() == "shift"
    assert not m.shifted_worse(), "direction unknown: no RTT probe on the request path"
    # a probe that started before the change ends after it: it may have measured the old network
    m.observe_probe([20.0, 21.0], 100_000, [20.0 + 40.0, 20.0 + 41.0])
    assert m.probe_needed() == "shift", "only a probe started after the report settles it"
    m.clear_shift()                                   # (Gateway.probe, at its start)
    assert m.probe_needed() is None


def test_calibration_reset_forgets_the_old_network() -> None:
    from splitgate.edge import LinkCalibration

    cal = LinkCalibration(clock=lambda: 0.0)
    for _ in range(5):
        cal.observe(100.0, 200.0)
    assert cal.factor() > 1.3
    cal.reset()
    assert cal.factor() == 1.0


def test_a_call_faster_than_one_round_trip_teaches_no_bandwidth() -> None:
    link = LinkMonitor()
    link.observe_probe([100.0, 100.0], 64_000, [150.0, 150.0])  # RTT 100 ms, 64 KB in 50 ms
    before = link.estimate().uplink_mbps
    for _ in range(3):  # under the RTT: the RTT is stale, the 'transfer' is noise (not a step up)
        link.observe(64_000, 0, 90.0)
    assert link.estimate().uplink_mbps == before


def test_a_hedged_trial_call_that_fails_later_still_reaches_the_breaker() -> None:
    """A half-open breaker lets one call through; if that call is hedged and fails
    in the background, the breaker must hear of it, or it stays half-open forever."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    from splitgate.edge._gateway import _Core
    from splitgate.errors import Unavailable

    now = [0.0]
    breaker = CircuitBreaker(1, 1.0, clock=lambda: now[0])
    breaker.record_failure()
    now[0] = 2.0
    assert breaker.allow() and breaker.state == "half-open"  # the trial call goes out ...
    core = SimpleNamespace(breaker=breaker, _late=lambda reply: None)
    failed: Future = Future()
    failed.set_exception(Unavailable("replica died"))
    _Core._late_done(core, failed)  # ... is hedged, then fails in the background
    assert breaker.state == "open"
    now[0] = 4.0
    assert breaker.allow()  # a new trial after the reset time, not stuck
