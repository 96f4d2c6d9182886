"""Recovery after an outage: a reported network change half-opens an open circuit
breaker, so the fresh probe of the new network can close it at once instead of the
device waiting out ``breaker_reset_s``. Unit tests of the breaker and the decision
core on a fake clock; an integration test of a real Gateway against the real grpcio
cloud (``start_baseline``) through the shaping proxy, with its link taken down."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from splitgate.edge import Gateway
from splitgate.edge._breaker import CircuitBreaker
from splitgate.edge._decide import DecisionCore
from splitgate.edge.config import GatewayConfig
from _models import normal_request

RESET_S = 60.0  # large: nothing in these tests may pass by waiting the breaker's reset time out


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _tripped(clock: FakeClock, failures: int = 3) -> CircuitBreaker:
    breaker = CircuitBreaker(failure_threshold=failures, reset_timeout_s=RESET_S, clock=clock)
    for _ in range(failures):
        breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow() and not breaker.allow_probe()
    return breaker


# -- unit: the breaker and the decision core, fake clock ---------------------------------------


def test_a_network_change_half_opens_an_open_breaker_and_a_probe_closes_it() -> None:
    clock = FakeClock()
    breaker = _tripped(clock)
    clock.now = 1.0  # far inside the reset time
    assert breaker.network_changed() is True
    assert breaker.state == "half-open"
    assert breaker.allow_probe(), "the fresh probe of the new network may run"
    assert breaker.allow() and not breaker.allow(), "and one request trial, not more"
    breaker.record_success()  # the probe answered
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


def test_failures_on_the_new_network_reopen_it_for_a_full_reset_time() -> None:
    clock = FakeClock()
    breaker = _tripped(clock)
    clock.now = 10.0
    breaker.network_changed()
    breaker.record_failure()  # the probe of the new network failed: one failure is enough in half-open
    assert breaker.state == "open" and not breaker.allow_probe()
    clock.now = 10.0 + RESET_S - 1.0
    assert breaker.state == "open", "the reset time restarts from the new failure"
    clock.now = 10.0 + RESET_S
    assert breaker.state == "half-open"


def test_without_a_network_change_an_open_breaker_waits_its_reset_time() -> None:
    clock = FakeClock()
    breaker = _tripped(clock)
    clock.now = RESET_S - 0.1
    assert breaker.state == "open" and not breaker.allow_probe() and not breaker.allow()
    clock.now = RESET_S
    assert breaker.allow_probe() and breaker.state == "half-open"


def test_a_network_change_forgets_a_closed_breakers_count_and_frees_a_stuck_trial() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout_s=RESET_S, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.network_changed() is False and breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "closed", "the old network's two failures no longer count"
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "open"
    clock.now = RESET_S
    assert breaker.allow() and not breaker.allow()  # a trial request is out on the old network ...
    breaker.network_changed()  # ... and its answer may never come: the new network gets a trial of its own
    assert breaker.state == "half-open" and breaker.allow()


def test_a_probe_does_not_take_the_request_trial() -> None:
    clock = FakeClock()
    breaker = _tripped(clock)
    breaker.network_changed()
    assert breaker.allow_probe() and breaker.allow_probe()
    assert breaker.allow(), "a probe in half-open left the one request trial free"


def test_failures_of_calls_sent_before_the_change_do_not_count() -> None:
    """A hedged call sent on the old network times out after the handover: its failure
    is the old network's, so it neither re-opens the half-open breaker nor counts."""
    clock = FakeClock()
    breaker = _tripped(clock)
    clock.now = 10.0
    breaker.network_changed()
    clock.now = 12.0
    assert breaker.record_failure(sent_at=9.5) is False
    assert breaker.state == "half-open"
    breaker.record_success()  # the probe of the new network
    for _ in range(3):
        breaker.record_failure(sent_at=9.9)  # the rest of the old network's calls
    assert breaker.state == "closed"
    assert breaker.record_failure(sent_at=10.5) is True and breaker.record_failure() is True
    assert breaker.state == "closed"
    breaker.record_failure(sent_at=12.0)
    assert breaker.state == "open", "three failures on the new network open it"


def test_the_gateway_reports_a_stale_call_failure_with_its_send_time() -> None:
    """The driver's side: a failed call (``_Core._failed``) and a hedged call failing in
    the background (``_Core._late_done``) hand the breaker the call's send time."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    from splitgate.edge._decide import CloudCall
    from splitgate.edge._gateway import _Core

    from splitgate.errors import Unavailable

    clock = FakeClock()
    decisions = DecisionCore(GatewayConfig(breaker_failures=1, breaker_reset_s=RESET_S), clock=clock)
    core = SimpleNamespace(breaker=decisions.breaker, decisions=decisions, _late=lambda reply: None)
    old_call = CloudCall("m", "cloud", sent_at=clock(), hedge_after_s=0.2, predicted=None)
    decisions.breaker.record_failure()
    clock.now = 3.0
    decisions.network_changed()
    clock.now = 4.0
    failed: Future = Future()
    failed.set_exception(Unavailable("the old network's connection is gone"))
    _Core._late_done(core, failed, old_call.sent_at)
    _Core._failed(core, old_call, Unavailable("the old network's connection is gone"))
    assert decisions.breaker.state == "half-open"
    new_call = CloudCall("m", "cloud", sent_at=clock(), hedge_after_s=0.2, predicted=None)
    _Core._failed(core, new_call, Unavailable("the new network fails too"))
    assert decisions.breaker.state == "open"


def test_the_decision_core_half_opens_its_breaker_on_a_network_change() -> None:
    clock = FakeClock()
    core = DecisionCore(GatewayConfig(breaker_failures=2, breaker_reset_s=RESET_S), clock=clock)
    assert core.breaker.failure_threshold == 2 and core.breaker.reset_timeout_s == RESET_S
    change = core.network_changed()
    assert change.probe and not change.breaker_trial, "a closed breaker has nothing to try"
    core.breaker.record_failure()
    core.breaker.record_failure()
    assert not core.probe_allowed()
    clock.now = 5.0
    change = core.network_changed()
    assert change.probe and change.breaker_trial and not change.abandon_probe
    assert core.breaker.state == "half-open" and core.probe_allowed()
    assert core.link.change_reported(), "the fresh probe measures the new network"
    spec = core.probe_started(reset=True)
    core.probe_measured(spec, [12.0, 11.0], [30.0, 29.0])
    core.probe_ended()
    core.breaker.record_success()  # (the driver reports a full probe's success)
    assert core.breaker.state == "closed"


# -- integration: a real Gateway, the real grpcio cloud, a shaped link that goes down ----------


@pytest.fixture(scope="module")
def baseline(slow_device_bundle) -> Iterator[str]:
    from splitgate.cloud.baseline import start_baseline

    with start_baseline([str(slow_device_bundle.root)]) as server:
        yield server.address


def _x(bundle) -> dict[str, np.ndarray]:
    return normal_request(bundle)


def _offloaded(t) -> bool:
    """Did the request (its trace) run on the cloud leg, answered in time?"""
    return t.partition != "device" and t.fallback is None and t.bytes_sent > 0


def _wait(condition, timeout_s: float, what: str) -> float:
    """Poll ``condition`` until it holds; returns the seconds it took (fails after ``timeout_s``)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"not within {timeout_s} s: {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def _take_down(gw, link, model: str, x: dict) -> list[str | None]:
    """Take the link down and send requests until the breaker opens; returns their fallbacks."""
    link.set(outage=True)  # a black hole: calls hang until their deadline (the device answers meanwhile)
    reasons = []
    for _ in range(12):
        reasons.append(gw.infer(model, x).trace.fallback)
        if gw.breaker_state == "open":
            return reasons
        time.sleep(0.3)  # (a hedged call's failure reaches the breaker at its deadline)
    _wait(lambda: gw.breaker_state == "open", 5.0, f"the breaker opens during the outage ({reasons})")
    return reasons


@pytest.mark.parametrize("reset_on_outage", [False, True], ids=["black-hole", "connections-reset"])
def test_after_an_outage_a_network_change_lets_the_next_requests_offload(
    slow_device_bundle, baseline, reset_on_outage: bool,
) -> None:
    """The link goes down until the breaker opens. A network change while it is still
    down: half-open, the probe fails, open again (the device keeps answering, without a
    call). The link comes back and the device reports it: the probe closes the breaker and
    the next request offloads, within seconds although ``breaker_reset_s`` is 60 s. A
    second outage, then a change with requests right behind it: they offload again.
    The outage holds the bytes (a black hole), or resets the connections (a dead radio:
    gRPC must reconnect)."""
    from splitgate.netsim import LinkConditions, ShapingProxy

    bundle, x = slow_device_bundle, _x(slow_device_bundle)
    model = bundle.model_name
    with ShapingProxy(baseline, LinkConditions(rtt_ms=5.0), reset_on_outage=reset_on_outage) as link, Gateway(
        [bundle], cloud=link.address, device_time_from_profile=True, breaker_failures=3,
        breaker_reset_s=RESET_S, deadline_ms=1000, probe_interval_s=RESET_S,
    ) as gw:
        warm = [gw.infer(model, x) for _ in range(4)]
        assert all(_offloaded(r.trace) for r in warm[1:]), [r.trace for r in warm]  # a ~200 ms device: offload pays

        _take_down(gw, link, model, x)
        # still down: the change half-opens the breaker, the probe of the "new" network fails, open again
        gw.network_changed()
        assert gw.breaker_state == "half-open"  # (synchronous; the probe needs its 2 s timeout to fail)
        _wait(lambda: gw.breaker_state == "open", 15.0, "a failed probe on the new network re-opens the breaker")
        down = gw.infer(model, x).trace  # (the policy may pick the device itself: the probe's timeout
        assert (down.partition, down.bytes_sent) == ("device", 0), down  # taught the link monitor it is slow)
        assert down.fallback in (None, "breaker-open"), down

        # back up; the device reports the change and sends nothing until the probe closed the breaker
        link.set(outage=False)
        gw.network_changed()
        closed_after = _wait(lambda: gw.breaker_state == "closed", 15.0, "the probe of the new network closes it")
        assert closed_after < RESET_S / 4
        first = gw.infer(model, x)
        assert _offloaded(first.trace), first.trace

        # a second outage; this time requests follow the report at once
        _take_down(gw, link, model, x)
        link.set(outage=False)
        start = time.monotonic()
        gw.network_changed()
        traces = []
        while time.monotonic() - start < 15.0:
            traces.append(gw.infer(model, x).trace)
            if _offloaded(traces[-1]):
                break
        took = time.monotonic() - start
        assert _offloaded(traces[-1]), f"no request offloaded within 15 s of the change: {traces}"
        assert took < RESET_S / 4
        again = gw.infer(model, x)
        assert _offloaded(again.trace) and gw.breaker_state == "closed", again.trace
    print(f"\nnetwork_changed -> breaker closed by the probe: {closed_after * 1e3:.0f} ms; "
          f"-> first offloaded request (requests right behind it): {took * 1e3:.0f} ms, after "
          f"{[(t.partition, t.fallback) for t in traces[:-1]]}")
