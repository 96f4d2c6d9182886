"""The edge's decision core (:class:`splitgate.edge.DecisionCore`).

Unit tests with a fake clock (no sleeps, no I/O), and the design's promise:
the live Gateway and the analytic engine drive the same core the same way,
so one event sequence -- requests, replies with their network times, a step
in the link, a reported network change, a device slowdown, a hedged call --
gives the same decisions in the same order through both drivers.

The live side is the real :class:`splitgate.edge.Gateway` (real onnxruntime
sessions for the device legs) in simulated time: its ``time`` reads a fake
clock, its thread pool runs tasks in simulated time, and its cloud client
answers over the analytic engine's simulated link (the same world model the
analytic driver uses). Fakes stand in for the network and the cloud only.
"""

from __future__ import annotations

import heapq
import math
import random
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np
import pytest

from splitgate.edge import CloudReply, DecisionCore, Gateway, GatewayConfig
from splitgate.errors import DeadlineExceeded, NotFound
from splitgate.experiments.analytic import DOWN_OVERHEAD, UP_OVERHEAD
from splitgate.netsim import traces
from splitgate.planner import Conditions


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- unit tests of the core ----------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(slow_device_bundle):
    return slow_device_bundle


def _core(bundle, clock: FakeClock, **settings: Any) -> DecisionCore:
    return DecisionCore(GatewayConfig(battery_pct=100.0, **settings), clock=clock)


def _measure(core: DecisionCore, rtt_ms: float, up_mbps: float, reset: bool = False) -> None:
    """A full probe that found ``rtt_ms`` and ``up_mbps``."""
    spec = core.probe_started(reset=reset)
    send = rtt_ms + spec.send_bytes * 8 / (up_mbps * 1e3)
    core.probe_measured(spec, [rtt_ms] * spec.round_trips, [send] * spec.sends)
    core.probe_ended()


def _on(bundle, up: float, rtt: float) -> str:
    return bundle.choose(Conditions(uplink_mbps=up, rtt_ms=rtt), costs=bundle.costs())


def test_first_request_measures_on_its_path_then_the_link_decides(bundle) -> None:
    clock = FakeClock()
    core = _core(bundle, clock)
    costs = core.request_costs(bundle, {s: list(v) for s, v in bundle.shapes[0].items()})
    plan = core.probes_before(bundle, costs)
    assert (plan.sync, plan.background) == ("full", False), "nothing measured: measure before deciding"
    _measure(core, 20.0, 50.0)
    assert core.probes_before(bundle, costs).sync is None
    fast = core.choose(bundle, costs)
    assert fast.partition == _on(bundle, 50.0, 20.0) and fast.partition != "device"
    clock.now += 1.0
    _measure(core, 2000.0, 0.05, reset=True)
    assert core.choose(bundle, costs).partition == "device", "a link this bad keeps the work on the device"


def test_a_step_for_the_worse_asks_for_the_rtt_first_and_one_background_probe(bundle) -> None:
    clock = FakeClock()
    core = _core(bundle, clock)
    costs = bundle.costs()
    _measure(core, 20.0, 20.0)
    call = core.cloud_call(bundle, "cloud", costs, 10.0)
    for _ in range(2):  # two calls at a tenth of the bandwidth: a confirmed step for the worse
        clock.now += 0.5
        core.reply_in_time(call, 200_000, 100, 20.0 + 200_000 * 8 / 2e3, 5.0)
    plan = core.probes_before(bundle, costs)
    assert plan.why == "shift" and plan.reset and plan.background
    assert plan.sync == ("rtt" if bundle.choose(core.conditions(), costs=costs) != "device" else None)
    assert core.claim_background_probe() and not core.claim_background_probe(), "one background probe at a time"
    spec = core.probe_started(reset=True)
    assert core.probes_before(bundle, costs).sync is None, "no RTT probe on the path while a probe runs"
    core.probe_measured(spec, [20.0, 20.0], [20.0 + spec.send_bytes * 8 / 2e3] * 2)
    core.probe_ended()
    assert core.background_probe_finished() is False
    assert core.probes_before(bundle, costs).why is None


def test_a_reported_network_change_abandons_the_running_probe_and_asks_for_a_fresh_one(bundle) -> None:
    clock = FakeClock()
    core = _core(bundle, clock, probe_interval_s=60.0)
    _measure(core, 20.0, 20.0)
    for _ in range(5):
        core.calibration.observe(100.0, 200.0)
    assert core.calibration.factor() > 1.2
    idle = core.network_changed()
    assert (idle.abandon_probe, idle.probe) == (False, True)
    assert core.calibration.factor() == 1.0, "the old network's errors are forgotten"
    assert core.claim_background_probe()
    core.probe_started(reset=True)
    busy = core.network_changed()  # the probe under way measures the old network
    assert (busy.abandon_probe, busy.probe) == (True, True)
    assert not core.claim_background_probe(), "the fresh probe follows the abandoned one"
    core.probe_ended()
    assert core.background_probe_finished() is True, "measure the new network next"


def test_hedge_timing_follows_the_prediction_and_the_local_suffix(bundle) -> None:
    clock = FakeClock()
    core = _core(bundle, clock)
    costs = bundle.costs()
    _measure(core, 50.0, 5.0)
    call = core.cloud_call(bundle, "cloud", costs, 10.0)
    leg = call.predicted.transfer_ms + call.predicted.cloud_ms
    assert call.hedge_after_s == pytest.approx(max(3 * leg, 200.0) / 1e3), "3x the predicted leg"
    core.local_suffix_done(bundle.model_name, "cloud", 8_000.0, costs)  # a slow local suffix: start it early
    deadline = core.cloud_call(bundle, "cloud", costs, 10.0)
    assert deadline.hedge_after_s == pytest.approx(min(10.0 - 1.2 * 8.0, max(3 * leg, 200.0) / 1e3))
    assert deadline.hedge_after_s <= 0.4 + 1e-9
    off = DecisionCore(GatewayConfig(hedge=False), clock=clock).cloud_call(bundle, "cloud", costs, 4.0)
    assert off.hedge_after_s == 4.0


def test_a_hedged_call_teaches_the_link_unless_a_probe_shared_it_once(bundle) -> None:
    clock = FakeClock()
    core = _core(bundle, clock)
    costs = bundle.costs()
    _measure(core, 20.0, 20.0)
    clock.now = 10.0
    core.probe_started()  # a background probe holds the link
    call = core.cloud_call(bundle, "cloud", costs, 10.0)
    clock.now = 12.0
    assert core.call_late(call, 150_000) is False, "queued behind a probe: not believed at once"
    core.probe_ended()
    call = core.cloud_call(bundle, "cloud", costs, 10.0)
    clock.now = 14.0
    assert core.call_late(call, 150_000) is True
    assert core.link.estimate().uplink_mbps < 1.0, "the link is at least this slow"
    assert core.link.shifted_worse()


def test_a_reply_that_shared_the_link_with_a_probe_does_not_calibrate(bundle) -> None:
    clock = FakeClock()
    core = _core(bundle, clock)
    costs = bundle.costs()
    _measure(core, 20.0, 20.0)
    core.probe_started()
    call = core.cloud_call(bundle, "cloud", costs, 10.0)
    core.reply_in_time(call, 150_000, 100, 3 * (call.predicted.transfer_ms), 5.0)
    assert core.calibration.factor() == 1.0
    core.probe_ended()
    clock.now += 1.0
    call = core.cloud_call(bundle, "cloud", costs, 10.0)
    core.reply_in_time(call, 150_000, 100, 3 * (call.predicted.transfer_ms), 5.0, queue_depth=4)
    assert core.calibration.factor() > 1.0
    assert core.conditions().cloud_load == 3.0


def test_a_slower_device_moves_the_choice_and_device_probes_notice_the_recovery(bundle) -> None:
    clock = FakeClock()
    core = _core(bundle, clock, device_probe_every=2)
    costs = bundle.costs()
    model = bundle.model_name
    _measure(core, 300.0, 0.4)
    assert core.choose(bundle, costs).partition == "device"
    planned = float(costs["device"]["device_ms"])
    for _ in range(3):  # the first run is cold; two at 3x confirm the step
        clock.now += 1.0
        core.device_leg(model, "device", 3 * planned, costs)
    assert core.device_factor(model) == pytest.approx(3.0)
    slow = core.choose(bundle, costs)
    assert slow.device_factor == pytest.approx(3.0) and slow.conditions.device_factor == slow.device_factor
    assert core.device_probe_due(bundle, costs) is None, "not yet: every 2nd offloaded request"
    pid = core.device_probe_due(bundle, costs)
    assert pid is not None and bundle.partitions[pid].prefix_path is not None
    cheap = float(costs[pid]["device_ms"])
    assert min(float(e["device_ms"]) for p, e in costs.items() if bundle.partitions[p].prefix_path) == cheap
    assert core.device_probe_due(bundle, costs) is None
    assert core.device_probe_due(bundle, costs) is None, "due again, but one device probe at a time"
    core.device_probe_done(model, pid, [cheap, cheap], costs)  # (the key's first run is cold)
    assert core.device_probe_due(bundle, costs) is None
    assert core.device_probe_due(bundle, costs) == pid
    core.device_probe_done(model, pid, [cheap, 1.05 * cheap], costs)  # they agree: a confirmed measurement
    assert core.device_factor(model) == pytest.approx(1.0, rel=0.1), "the recovery is seen without a device run"


def test_learn_device_off_keeps_the_plans_times(bundle) -> None:
    core = _core(bundle, FakeClock(), learn_device=False)
    costs = bundle.costs()
    for _ in range(4):
        core.device_leg(bundle.model_name, "device", 50 * float(costs["device"]["device_ms"]), costs)
    assert core.device_factor(bundle.model_name) == 1.0
    assert core.device_probe_due(bundle, costs) is None


# -- the same events through both drivers ------------------------------------------------------------


class _SimTime:
    """Simulated time for the live Gateway and its threads (a discrete-event
    scheduler): one thread runs at a time; a thread that waits (a device leg's
    padding, a round trip on the simulated link) parks until the clock reaches
    the end of its wait, and the clock jumps from event to event in time order.
    It stands in for the ``time`` module inside ``splitgate.edge._gateway``."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self._events: list[tuple[float, int, Any]] = []
        self._seq = 0
        self._turn = threading.Semaphore(0)  # a background thread hands the turn back
        self._local = threading.local()

    # -- the time module's face
    def perf_counter(self) -> float:
        return self.clock.now

    monotonic = perf_counter

    def sleep(self, seconds: float) -> None:
        self.wait_until(self.clock.now + max(seconds, 0.0))

    # -- the scheduler
    def at(self, t: float, action: Any) -> None:
        """Run ``action`` (on the driving thread) when the clock reaches ``t``."""
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, action))

    def wait_until(self, t: float) -> None:
        if getattr(self._local, "background", False):
            go = threading.Event()
            self.at(t, lambda: self._resume(go))
            self._turn.release()
            go.wait()
        else:
            self.advance(t)

    def _resume(self, go: threading.Event) -> None:
        go.set()
        self._turn.acquire()  # until the thread parks again or ends

    def spawn(self, fn: Any, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn`` in a thread of its own from now on (a pool task)."""
        future: Future = Future()
        go = threading.Event()

        def run() -> None:
            go.wait()
            self._local.background = True
            try:
                result = fn(*args, **kwargs)
                if not future.cancelled():
                    future.set_result(result)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                if not future.cancelled():
                    future.set_exception(exc)
            finally:
                self._turn.release()

        threading.Thread(target=run, daemon=True).start()
        self.at(self.clock.now, lambda: self._resume(go))
        return future

    def step(self) -> None:
        """Run the next event (the driving thread waits for something)."""
        if not self._events:
            raise RuntimeError("simulated time: waiting for nothing")
        t, _, action = heapq.heappop(self._events)
        self.clock.now = max(self.clock.now, t)
        action()

    def advance(self, t: float) -> None:
        """Run every event up to ``t``; the clock is then ``t``."""
        while self._events and self._events[0][0] <= t:
            self.step()
        self.clock.now = max(self.clock.now, t)

    def wait(self, futures: list[Future], return_when: str = "FIRST_COMPLETED") -> tuple[set, set]:
        """``concurrent.futures.wait`` in simulated time."""
        while not any(f.done() for f in futures):
            self.step()
        return {f for f in futures if f.done()}, {f for f in futures if not f.done()}


def _recording(log: list, clock: FakeClock | None = None) -> type[DecisionCore]:
    """A DecisionCore that notes every decision it hands out, with the time."""

    class Recording(DecisionCore):
        def __init__(self, config=None, *, clock=None) -> None:
            super().__init__(config, clock=clock)

        def _note(self, *what: object) -> None:
            log.append((round(self.clock(), 3), *what))

        def probes_before(self, *a, **k):
            plan = super().probes_before(*a, **k)
            self._note("probes", plan.sync, plan.background, plan.reset)
            return plan

        def choose(self, *a, **k):
            decision = super().choose(*a, **k)
            self._note("choose", decision.partition, round(decision.device_factor, 2))
            return decision

        def cloud_call(self, *a, **k):
            call = super().cloud_call(*a, **k)
            self._note("hedge_after", call.partition, round(call.hedge_after_s, 3))
            return call

        def call_late(self, *a, **k):
            learned = super().call_late(*a, **k)
            self._note("late", learned)
            return learned

        def network_changed(self):
            change = super().network_changed()
            self._note("network_changed", change.abandon_probe, change.probe)
            return change

        def device_probe_due(self, *a, **k):
            pid = super().device_probe_due(*a, **k)
            if pid is not None:
                self._note("device_probe", pid)
            return pid

    return Recording


class _CloudFuture(Future):
    """A cloud call in flight over the simulated link: answered when the clock reaches its arrival."""

    def __init__(self, sim: _SimTime, arrival: float, reply: CloudReply) -> None:
        super().__init__()
        self.sim = sim
        sim.at(arrival, lambda: None if self.done() else self.set_result(reply))

    def result(self, timeout: float | None = None) -> Any:
        until = math.inf if timeout is None else self.sim.clock.now + timeout
        while not self.done() and self.sim._events and self.sim._events[0][0] <= until:
            self.sim.step()
        if not self.done():
            self.sim.advance(until)
            raise FutureTimeout()
        return super().result(0)


class _SimCloud:
    """The cloud tier behind the analytic engine's simulated link (the same world model)."""

    def __init__(self, world, sim: _SimTime) -> None:  # (world: an analytic _Sim)
        self.world, self.sim = world, sim

    def _round_trip(self, up: int, down: int, timeout_s: float) -> None:
        now = self.sim.clock.now
        end = self.world._round_trip(now, up, down, 0.0)
        if end - now > timeout_s:
            self.sim.wait_until(now + timeout_s)
            raise DeadlineExceeded(f"no answer within {timeout_s} s")
        self.sim.wait_until(end)

    def server_live(self, timeout_s: float = 2.0) -> bool:
        self._round_trip(UP_OVERHEAD // 2, DOWN_OVERHEAD // 2, timeout_s)
        return True

    def infer(self, model: str, inputs: dict, *, timeout_s: float = 10.0, **_: Any) -> CloudReply:
        nbytes = sum(np.asarray(v).nbytes for v in inputs.values())
        self._round_trip(nbytes + UP_OVERHEAD, DOWN_OVERHEAD, timeout_s)
        raise NotFound(f"model '{model}' is not served (a probe)")

    def call(self, partition: str) -> _CloudFuture:
        e = self.world.entries[partition]
        sent, received, cloud = int(e["up_bytes"]) + UP_OVERHEAD, int(e["down_bytes"]) + DOWN_OVERHEAD, float(e["cloud_ms"])
        now = self.sim.clock.now
        back = self.world._round_trip(now, sent, received, cloud)
        return _CloudFuture(self.sim, back, CloudReply({}, (back - now) * 1e3, cloud, sent, received, {}))

    def close(self) -> None:
        pass


class _SimPool:
    """The Gateway's thread pool in simulated time: a request's cloud call is in
    flight over the simulated link; every other task runs in a thread of its own."""

    def __init__(self, sim: _SimTime, cloud: _SimCloud) -> None:
        self.sim, self.cloud = sim, cloud

    def submit(self, fn, *args: Any, **kwargs: Any) -> Future:
        if getattr(fn, "__self__", None) is self.cloud:
            return self.cloud.call(kwargs["partition"])
        return self.sim.spawn(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def _scenario():
    """WiFi, then 3G (a step for the worse), a tunnel (the cloud call is hedged),
    LTE reported by the OS (a network change), and a device that slows down 3x at 16 s."""
    wifi = dict(uplink_mbps=18.88, downlink_mbps=40.0, rtt_ms=20.0, jitter_ms=0.0, radio="wifi", label="wifi")
    g3 = dict(uplink_mbps=1.1, downlink_mbps=2.0, rtt_ms=150.0, jitter_ms=0.0, radio="3g", label="3g")
    lte = dict(uplink_mbps=5.85, downlink_mbps=12.0, rtt_ms=60.0, jitter_ms=0.0, radio="lte", label="lte")
    trace = traces.steps([dict(duration_s=6, **wifi), dict(duration_s=5, **g3), dict(duration_s=9, **lte)])
    return traces.with_outages(trace, [(4.0, 1.5)]), 16.0


def _analytic_decisions(spec, bundle, trace, slow_at: float, monkeypatch) -> list:
    import splitgate.experiments.analytic as analytic

    log: list = []
    monkeypatch.setattr(analytic, "DecisionCore", _recording(log))
    sim = analytic._Sim(spec, bundle, trace, "adaptive", random.Random(0))
    sim.contention = True  # (no warm-up: the first request measures the link itself)
    while sim.st.now < trace.duration_s:
        if sim.st.now >= slow_at:
            sim.device_slowdown = 3.0
        sim.request(0, 0)
    return log


def _live_decisions(spec, bundle, trace, slow_at: float, monkeypatch) -> list:
    import splitgate.edge._gateway as gateway
    import splitgate.experiments.analytic as analytic
    from splitgate.experiments.live import model_inputs

    log: list = []
    clock = FakeClock()
    sim = _SimTime(clock)
    world = analytic._Sim(spec, bundle, trace, "cloud", random.Random(0))  # (its simulated link only)
    world.contention = True
    cloud = _SimCloud(world, sim)
    monkeypatch.setattr(gateway, "time", sim)
    monkeypatch.setattr(gateway, "wait", sim.wait)
    monkeypatch.setattr(gateway, "DecisionCore", _recording(log))
    monkeypatch.setattr(gateway, "CloudClient", lambda *a, **k: cloud)
    x = model_inputs(bundle)
    with Gateway([bundle], cloud="127.0.0.1:1", config=analytic.gateway_config(spec), intra_op_threads=1) as gw:
        gw._core._pool = _SimPool(sim, cloud)
        for hint in trace.radio_changes():  # the OS's reports, when they happen
            sim.at(hint, gw.network_changed)
        t = 0.0
        while t < trace.duration_s:
            sim.advance(t)
            if t >= slow_at:
                gw.set_device_slowdown(3.0)
            gw.infer(bundle.model_name, x)
            t = spec.next_start(clock.now)
    return log


def test_the_live_gateway_and_the_analytic_engine_make_the_same_decisions(slow_device_bundle, monkeypatch) -> None:
    from splitgate.experiments import ExperimentSpec

    b = slow_device_bundle
    trace, slow_at = _scenario()
    spec = ExperimentSpec(name="decisions", model=b.model_name, trace=trace, device_slowdown=1.0,
                          nominal=Conditions(uplink_mbps=5.85, rtt_ms=60.0), interval_ms=1000, network_hints=True,
                          gateway={"probe_interval_s": 1000.0, "deadline_ms": 10_000, "device_probe_every": 2})
    analytic = _analytic_decisions(spec, b, trace, slow_at, monkeypatch)
    live = _live_decisions(spec, b, trace, slow_at, monkeypatch)
    kinds = {entry[1] for entry in analytic}
    chosen = {entry[2] for entry in analytic if entry[1] == "choose"}
    print("\n".join(f"{a}    {b}" for a, b in zip(analytic, live)))
    # the sequence exercises what it claims to
    assert {"probes", "choose", "hedge_after", "late", "network_changed"} <= kinds, kinds
    assert len(chosen) >= 2, f"the choice never moved: {chosen}"
    assert any(e[1] == "probes" and e[2] == "full" for e in analytic)
    assert any(e[1] == "choose" and e[3] > 1.5 for e in analytic), "the device slowdown was learned"
    assert live == analytic, _first_difference(live, analytic)


def _first_difference(live: list, analytic: list) -> str:
    for i, (a, b) in enumerate(zip(live, analytic)):
        if a != b:
            return f"decision {i}: live {a} vs analytic {b}"
    return f"live made {len(live)} decisions, analytic {len(analytic)}"


def test_the_engines_share_one_core_and_no_gateway_rule_is_copied() -> None:
    """experiments/ imports nothing private from splitgate.edge, and the
    analytic engine decides through the core's methods only."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "experiments"
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("splitgate.edge"):
                assert node.module in ("splitgate.edge", "splitgate.edge.config"), f"{path.name}: {node.module}"
                assert not any(a.name.startswith("_") for a in node.names), f"{path.name}: private {node.names}"
    source = (root / "analytic.py").read_text()
    for rule in ("hedge_delay_ms", "rtt_first", "rtt_probe_timeout_s", "calibrated", "Policy(", "LinkMonitor("):
        assert rule not in source, f"the analytic engine re-implements {rule}"
