"""The edge's decision core: every rule the Gateway decides by, with no I/O.

:class:`DecisionCore` owns what the edge knows (the link estimates, the
calibration of recent calls, the cloud load, the device's measured speed, the
policy's hysteresis state) and the rules that use it: before a request, which
probes to run and which partition to choose; during a cloud call, how long to
wait before racing the local suffix; after each outcome, what to learn. It
does no I/O, starts no thread and reads time only from its injected ``clock``.

Two drivers call the same methods in the same order (httpx's model: one
I/O-free core, a sync client and an async twin over it):

* the live :class:`splitgate.edge.Gateway` with real time, real gRPC calls,
  real probes and a thread pool;
* the analytic experiment engine (:mod:`splitgate.experiments.analytic`) with
  simulated time, a simulated link and a simulated cloud.

A request, as a driver runs it::

    costs = core.request_costs(bundle, shapes)
    plan = core.probes_before(bundle, costs, battery_pct=b)     # ProbePlan
    if plan.sync:            # measure first, on the request's path
        spec = core.probe_started(rtt_only=plan.sync == "rtt", reset=plan.reset)
        ...round trips...; core.probe_measured(spec, rtts, sends); core.probe_ended()
    if plan.background and core.claim_background_probe():
        ...a background probe: probe_started/measured/ended, then background_probe_finished()
    decision = core.choose(bundle, costs, battery_pct=b)        # Decision
    cascade = core.cascade_choice(bundle, decision.partition, costs)  # a bundle's cascade first? (CascadeChoice)
    ...the small model ran: core.cascade_done(bundle, exited, ms, cascade.planned_small_ms)
    ...prefix on the device...; core.device_leg(model, pid, ms, costs)
    call = core.cloud_call(bundle, pid, costs, remaining_s)      # CloudCall: hedge_after_s
    ...reply in time: core.reply_in_time(call, ...)
    ...late, the device raced it: core.call_late(call, cut_bytes); core.local_suffix_done(...);
       its reply later: core.late_reply(...)
    ...failed: core.call_failed(call); core.local_suffix_done(...)

Thread-safe (the live Gateway runs requests and probes on several threads).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from splitgate.edge._breaker import CircuitBreaker
from splitgate.edge._cascade import CascadeChoice, ExitRates, cascade_expected_ms
from splitgate.edge._device import DeviceCosts, suffix_key
from splitgate.edge._monitor import CloudLoadMonitor, Ewma, LinkCalibration, LinkMonitor
from splitgate.edge._policy import Policy, calibrated, hedge_delay_ms, rtt_first, rtt_probe_timeout_s
from splitgate.edge.config import GatewayConfig
from splitgate.planner import Conditions, Estimate, PlanBundle

__all__ = [
    "DecisionCore", "ProbePlan", "Decision", "ProbeSpec", "CloudCall", "NetworkChange",
    "DEFAULT_UPLINK_MBPS", "DEFAULT_RTT_MS",
]

#: Assumed before the first measurement of the link.
DEFAULT_UPLINK_MBPS = 10.0
DEFAULT_RTT_MS = 50.0
#: Cost entries cached per (model, plan digest, input shapes); the oldest go first.
COSTS_CACHE_SIZE = 256
#: A full probe: this many ServerLive round trips (each within PROBE_RTT_TIMEOUT_S),
#: then this many payload sends (each within PROBE_SEND_TIMEOUT_S).
PROBE_ROUND_TRIPS = 2
PROBE_SENDS = 2
PROBE_RTT_TIMEOUT_S = 2.0
PROBE_SEND_TIMEOUT_S = 10.0
#: A device probe runs the cheapest prefix this many times; the fastest run is the sample.
DEVICE_PROBE_RUNS = 2
#: The cascade pays only when its expected latency beats the path's by more than this (ms):
#: an int8 cascade that is the path's own model (``device~int8``) exiting on every input ties
#: it, up to float rounding.
CASCADE_TIE_MS = 1e-6

Costs = dict[str, dict[str, Any]]
SyncProbe = Literal["full", "rtt"]


@dataclass(frozen=True)
class ProbePlan:
    """What to measure before a request's decision (:meth:`DecisionCore.probes_before`).

    Attributes:
        sync: ``"full"``: nothing is measured yet, measure RTT and bandwidth on
            the request's path; ``"rtt"``: a confirmed step for the worse that
            can change this decision, re-measure the RTT alone first; None.
        background: a background probe is due (start one unless one runs:
            :meth:`DecisionCore.claim_background_probe`).
        reset: the probes replace the estimates (after a step) instead of averaging.
        why: the link monitor's reason (:meth:`LinkMonitor.probe_needed`), or None.
    """

    sync: SyncProbe | None
    background: bool
    reset: bool
    why: str | None


@dataclass(frozen=True)
class Decision:
    """The partition to run, and what it was chosen from.

    Attributes:
        partition: the partition id.
        conditions: the conditions it was chosen under (calibrated).
        device_factor: the device's measured speed against the plan (1.0: as planned).
    """

    partition: str
    conditions: Conditions
    device_factor: float


@dataclass(frozen=True)
class ProbeSpec:
    """How to run the probe that is starting (:meth:`DecisionCore.probe_started`).

    Attributes:
        rtt_only: only the round trips (the request-path RTT probe).
        reset: its results replace the estimates.
        round_trips: ServerLive round trips, each within ``rtt_timeout_s``.
        sends: payload sends of ``send_bytes`` bytes, each within ``send_timeout_s`` (0 when ``rtt_only``).
    """

    rtt_only: bool
    reset: bool
    round_trips: int
    rtt_timeout_s: float
    sends: int
    send_bytes: int
    send_timeout_s: float


@dataclass(frozen=True)
class CloudCall:
    """A cloud call as the core planned it (:meth:`DecisionCore.cloud_call`).

    Attributes:
        model, partition: what is called.
        sent_at: the clock when it was sent.
        hedge_after_s: seconds to wait before racing the local suffix against it.
        predicted: its estimate on the current link (None without a profile).
    """

    model: str
    partition: str
    sent_at: float
    hedge_after_s: float
    predicted: Estimate | None


@dataclass(frozen=True)
class NetworkChange:
    """What to do on a reported network change (:meth:`DecisionCore.network_changed`).

    Attributes:
        abandon_probe: a probe is measuring the old network: stop it after its
            current round trip and record nothing.
        probe: a background probe (replacing the estimates) is due.
        breaker_trial: the circuit breaker was open (or half-open) and is now
            half-open: the fresh probe is its trial (success closes it, failure
            re-opens it).
    """

    abandon_probe: bool
    probe: bool
    breaker_trial: bool = False


class DecisionCore:
    """The edge's estimates and decision rules, with no I/O and an injected clock.

    Parameters:
        config: the Gateway's settings (read live: a driver may change them);
            the rules read hysteresis, calibrate, hedge, hedge_factor,
            probe_interval_s, probe_bytes, learn_device, device_probe_every,
            device_time_from_profile; ``breaker_failures`` and ``breaker_reset_s``
            once, for :attr:`breaker`.
        clock: seconds, monotonic (``time.monotonic`` live; simulated time in
            the analytic engine; a fake in tests).
    """

    def __init__(self, config: GatewayConfig | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or GatewayConfig()
        self.clock = clock
        self.link = LinkMonitor(stale_after_s=self.config.probe_interval_s, probe_bytes=self.config.probe_bytes,
                                clock=clock)
        self.calibration = LinkCalibration(clock=clock)  # actual vs predicted network time of recent calls
        self.load = CloudLoadMonitor()
        self.policy = Policy(self.config.hysteresis)
        self.device = DeviceCosts(probe_every=self.config.device_probe_every, clock=clock)
        # The cloud leg's circuit breaker (the driver asks it before each call and reports
        # each outcome; a network change half-opens it: :meth:`network_changed`).
        self.breaker = CircuitBreaker(self.config.breaker_failures, self.config.breaker_reset_s, clock=clock)
        self._lock = threading.Lock()
        self._costs: OrderedDict[tuple[str, str, tuple], Costs] = OrderedDict()
        self._local_suffix_ms: dict[tuple[str, str], Ewma] = {}
        self._probing = False  # a background probe is claimed (queued or running)
        self._measuring = False  # a probe holds the link (background or on a request's path)
        self._probe_span: tuple[float, float | None] = (-1.0, -1.0)  # the last probe's (start, end)
        self._hedged_in_a_row = 0  # cloud calls the device beat since the last reply in time
        self._device_probing: set[str] = set()  # models with a device probe claimed
        self._emulating = self.config.device_time_from_profile  # the emulated device the learner knows
        self.last_model: str | None = None  # the model of the last decision
        self.cascade_rates = ExitRates()  # live exit rates of the bundles' cascades

    # -- what the edge knows --------------------------------------------------------

    def conditions(self, private: bool = False, model: str | None = None, *, battery_pct: float = 100.0) -> Conditions:
        """The conditions now (link estimate, cloud load, ``battery_pct``, and
        ``model``'s device factor, default the model of the last decision)."""
        est = self.link.estimate()
        return Conditions(
            uplink_mbps=est.uplink_mbps or DEFAULT_UPLINK_MBPS,
            downlink_mbps=est.downlink_mbps,
            rtt_ms=est.rtt_ms if est.rtt_ms is not None else DEFAULT_RTT_MS,
            battery_pct=battery_pct,
            cloud_load=float(max(self.load.queue_depth - 1, 0)),
            privacy=private,
            device_factor=self.device_factor(model),
        )

    def device_factor(self, model: str | None = None) -> float:
        """The learned device factor of ``model`` (default: the model of the last
        decision; 1.0 with ``learn_device`` off)."""
        model = model or self.last_model
        if not self.config.learn_device or model is None:
            return 1.0
        return self.device.factor(model)

    def request_costs(self, bundle: PlanBundle, shapes: Mapping[str, Sequence[int]]) -> Costs | None:
        """The plan's cost entries for a request of these input shapes
        (:meth:`PlanBundle.costs`), cached per (model, plan digest, shapes);
        None for a bundle without a profile."""
        if not bundle.has_profile:
            return None
        signature = tuple((name, tuple(int(d) for d in shapes[name])) for name in sorted(shapes))
        key = (bundle.model_name, bundle.plan_digest, signature)
        with self._lock:
            hit = self._costs.get(key)
            if hit is not None:
                self._costs.move_to_end(key)
                return hit
        costs = bundle.costs({name: list(shape) for name, shape in signature})
        with self._lock:
            self._costs[key] = costs
            while len(self._costs) > COSTS_CACHE_SIZE:
                self._costs.popitem(last=False)
        return costs

    def forget(self, model: str) -> None:
        """A model's plan changed: drop its cached cost entries and learned device speed."""
        with self._lock:
            for key in [k for k in self._costs if k[0] == model]:
                del self._costs[key]
        self.device.reset(model)
        self.cascade_rates.forget(model)

    def local_suffix_ms(self, model: str, partition: str) -> float | None:
        """The measured local suffix time of a partition (EWMA), None before it ran."""
        ewma = self._local_suffix_ms.get((model, partition))
        return ewma.value if ewma and ewma.value else None

    # -- before a request ------------------------------------------------------------

    def probes_before(
        self, bundle: PlanBundle, costs: Costs | None = None, *, private: bool = False, battery_pct: float = 100.0,
    ) -> ProbePlan:
        """Which probes this request's decision needs (the Gateway's probe triggers).

        Measure the link before the first decision (synchronously: the choice
        needs it). After a step in it, re-measure in the background (replacing
        the estimates), and first the RTT alone, on the request's path, when
        the step was for the worse and can change this decision
        (:func:`rtt_first`; not while a background probe runs). When the
        bandwidth estimate is stale or drifting, probe in the background.
        """
        model = bundle.model_name
        why = self.link.probe_needed()
        if why == "first":
            return ProbePlan("full", False, False, why)
        sync: SyncProbe | None = None
        if why == "shift" and not self._probing and rtt_first(
            self.link, bundle, self.conditions(private, model, battery_pct=battery_pct),
            costs=self._decision_costs(model, costs),
        ):
            sync = "rtt"
        return ProbePlan(sync, why is not None, why == "shift", why)

    def choose(
        self, bundle: PlanBundle, costs: Costs | None = None, *, private: bool = False, battery_pct: float = 100.0,
    ) -> Decision:
        """The partition to run now: the decision table (or, with ``costs``, the
        argmin of their estimates) under the calibrated conditions, with
        hysteresis; never ``cloud`` for a private request."""
        model = bundle.model_name
        self.last_model = model
        factor = self.calibration.factor() if self.config.calibrate else 1.0
        now = calibrated(self.conditions(private, model, battery_pct=battery_pct), factor)
        pid = self.policy.choose(bundle, now, costs=self._decision_costs(model, costs))
        if private and bundle.partition(pid).kind == "cloud":
            pid = "device"
        return Decision(pid, now, now.device_factor)

    def cascade_choice(
        self, bundle: PlanBundle, partition: str, costs: Costs | None = None, *, private: bool = False,
        battery_pct: float = 100.0, conditions: Conditions | None = None,
    ) -> CascadeChoice | None:
        """Does running the bundle's cascade (:mod:`splitgate.edge._cascade`) in front of
        ``partition`` pay now? Expected = the small model's time + (1 - live exit rate) x
        the partition's predicted latency, against that latency alone, under the same
        calibrated conditions and measured device speed as :meth:`choose`.

        Args:
            bundle: the version answering.
            partition: the path the policy chose (``device`` when offline).
            costs: the request's cost entries (its shapes).
            private, battery_pct: as for :meth:`choose`.
            conditions: weigh under these instead of the core's calibrated estimate
                (an oracle that knows the true link: the analytic engine's ``joint``
                policy and benchmarks; their ``device_factor`` applies).

        Returns:
            None for a bundle without a cascade, else the :class:`CascadeChoice`.
        """
        from splitgate.planner._cascade import planned_small_ms

        spec = bundle.cascade
        if spec is None:
            return None
        model = bundle.model_name
        rate = self.cascade_rates.rate(model, bundle.plan_digest, spec.exit_rate)
        if spec.exit_rate <= 0.0 or spec.threshold > 1.0:
            return CascadeChoice(False, "never exits", rate)
        full = float(costs["device"]["device_ms"]) if costs is not None and "device" in costs else None
        planned = planned_small_ms(spec, bundle.profile, full)  # (the device's own timing after a refit)
        if not bundle.has_profile or planned is None:
            return CascadeChoice(True, "no profile", rate, planned_small_ms=planned)
        if conditions is None:
            factor = self.calibration.factor() if self.config.calibrate else 1.0
            now = calibrated(self.conditions(private, model, battery_pct=battery_pct), factor)
        else:
            now = conditions
        path = bundle.estimate(partition, now, costs=self._decision_costs(model, costs)).latency_ms
        small = planned * now.device_factor  # (and its own measured ratio, as a partition's prefix)
        if self.config.learn_device:
            small *= self.device.relative(model, "cascade")
        expected = cascade_expected_ms(small, rate, path)
        pays = expected < path - CASCADE_TIE_MS  # a tie goes to the path: no model run to save nothing
        why = "pays" if pays else "does not pay"
        if not pays and conditions is None and small < path - CASCADE_TIE_MS and self.cascade_rates.explore(
                model, bundle.plan_digest):
            pays, why = True, "explore"  # it would pay at a higher exit rate: measure the rate again
        return CascadeChoice(pays, why, rate, small, planned, path, expected)

    def cascade_done(self, bundle: PlanBundle, exited: bool, measured_ms: float, planned_ms: float | None,
                     *, rows: int = 1, rows_exited: int | None = None) -> None:
        """The cascade's small model ran in ``measured_ms`` on ``rows`` rows and answered
        ``rows_exited`` of them (default: all when ``exited``, else none): the live exit
        rate counts the rows, and (planned times known) the device learner learns from it."""
        model = bundle.model_name
        self.cascade_rates.observe(model, bundle.plan_digest, exited, rows, rows_exited)
        if planned_ms:
            self._learn(model, "cascade", measured_ms, planned_ms)

    def _decision_costs(self, model: str, costs: Costs | None) -> Costs | None:
        """``costs`` with each partition's measured device ratio (relative to the
        device factor, which the conditions carry), when learning."""
        if costs is None or not self.config.learn_device:
            return costs
        return self.device.adjust(model, costs)

    # -- probes of the link -----------------------------------------------------------

    def claim_background_probe(self) -> bool:
        """Claim the one background probe slot: True = start one now (then call
        :meth:`background_probe_finished` when it ends); False = one is queued or running."""
        with self._lock:
            if self._probing:
                return False
            self._probing = True
            return True

    def background_probe_finished(self) -> bool:
        """Release the slot. Returns True when a network change was reported
        since the probe started (it was abandoned, or measured the old network):
        claim again and start a fresh probe that replaces the estimates."""
        with self._lock:
            self._probing = False
        return self.link.change_reported()

    @property
    def probing(self) -> bool:
        """Is a background probe claimed (queued or running)?"""
        return self._probing

    def probe_started(self, *, rtt_only: bool = False, reset: bool = False, at: float | None = None) -> ProbeSpec:
        """A probe takes the link now (or at ``at``): steps and reported changes
        seen so far are settled by it. Returns how to run it."""
        self.link.clear_shift()
        start = self.clock() if at is None else at
        with self._lock:
            self._measuring = True
            self._probe_span = (start, None)
        timeout = rtt_probe_timeout_s(self.link.estimate().rtt_ms) if rtt_only else PROBE_RTT_TIMEOUT_S
        return ProbeSpec(
            rtt_only=rtt_only, reset=reset, round_trips=PROBE_ROUND_TRIPS, rtt_timeout_s=timeout,
            sends=0 if rtt_only else PROBE_SENDS, send_bytes=self.config.probe_bytes,
            send_timeout_s=PROBE_SEND_TIMEOUT_S,
        )

    def probe_measured(self, spec: ProbeSpec, rtts_ms: Sequence[float], sends_ms: Sequence[float] = ()) -> None:
        """A probe's round trips and payload sends (ms), all answered in time."""
        if spec.rtt_only:
            self.link.observe_probe(rtts_ms, reset=spec.reset)
        else:
            self.link.observe_probe(rtts_ms, spec.send_bytes, sends_ms, reset=spec.reset)

    def probe_timed_out(self, spec: ProbeSpec, leg_bytes: int, elapsed_ms: float) -> None:
        """A probe's leg (``leg_bytes`` of payload, 0 for a round trip) unanswered
        after ``elapsed_ms``: a censored sample, the link is at least this slow."""
        self.link.observe_late(leg_bytes, 0, elapsed_ms)

    def probe_ended(self, at: float | None = None) -> None:
        """The probe released the link now (or at ``at``; measured, failed or abandoned)."""
        end = self.clock() if at is None else at
        with self._lock:
            self._measuring = False
            self._probe_span = (self._probe_span[0], end)

    def probe_allowed(self) -> bool:
        """May a link probe go to the cloud now (the breaker is not open:
        :meth:`CircuitBreaker.allow_probe`)? If not, call :meth:`probe_unavailable`."""
        return self.breaker.allow_probe()

    def probe_unavailable(self) -> None:
        """A probe was due but there is nothing to measure with (no cloud, an
        open breaker): settle the trigger so it is not asked again on every request."""
        self.link.clear_shift()

    def network_changed(self) -> NetworkChange:
        """The OS reported a network change: every estimate is stale, of unknown
        direction, and what calls taught the calibration is of the old network.
        A probe measuring the old network is abandoned; a fresh one is due. The
        old network's failures say nothing about the new one: an open breaker
        half-opens now (:meth:`CircuitBreaker.network_changed`), so the fresh
        probe can close it instead of the device waiting out ``breaker_reset_s``.

        Returns:
            What the driver does now (:class:`NetworkChange`).
        """
        self.link.mark_changed()
        self.calibration.reset()
        trial = self.breaker.network_changed()
        return NetworkChange(abandon_probe=self._measuring, probe=True, breaker_trial=trial)

    def _overlaps_probe(self, started: float) -> bool:
        """Did a probe share the link with a call sent at ``started``?"""
        _, end = self._probe_span
        return end is None or end > started

    # -- a cloud call -------------------------------------------------------------------

    def cloud_call(
        self, bundle: PlanBundle, partition: str, costs: Costs | None, remaining_s: float,
        *, at: float | None = None,
    ) -> CloudCall:
        """A cloud call is sent now (or at ``at``) with ``remaining_s`` of the
        budget left: its prediction, and how long to wait before racing the
        local suffix (:func:`hedge_delay_ms`: the deadline rule, and
        ``hedge_factor`` x the predicted leg; the whole budget with ``hedge`` off)."""
        model = bundle.model_name
        predicted = (
            bundle.estimate(partition, self.conditions(False, model), costs=costs) if bundle.has_profile else None
        )
        if not self.config.hedge:
            after = remaining_s
        else:
            leg = None
            if self.config.hedge_factor > 0 and predicted is not None:
                leg = predicted.transfer_ms + predicted.cloud_ms
            local = self.local_suffix_ms(model, partition)
            after = hedge_delay_ms(remaining_s * 1e3, local, leg, self.config.hedge_factor) / 1e3
        return CloudCall(model, partition, self.clock() if at is None else at, after, predicted)

    def reply_in_time(
        self, call: CloudCall, bytes_sent: int, bytes_received: int, network_ms: float, cloud_ms: float,
        queue_depth: int = 0,
    ) -> None:
        """The call answered before the device beat it: teach the link monitor its
        transfer, the load monitor the cloud's time, and the calibration its
        actual against predicted network time -- unless a probe shared the link:
        queued behind a probe's payload is not the link swinging."""
        shared = self._overlaps_probe(call.sent_at)
        with self._lock:
            self._hedged_in_a_row = 0
        self.link.observe(bytes_sent, bytes_received, network_ms, shared=shared)
        self.load.observe(cloud_ms, queue_depth)
        if call.predicted is not None and not shared:
            self.calibration.observe(call.predicted.transfer_ms, network_ms)

    def call_late(self, call: CloudCall, cut_bytes: int, *, at: float | None = None) -> bool:
        """The device beat the call (hedged; it goes on in the background): the
        link is at least this slow, so the next request does not walk into the
        same outage -- unless a probe shared the link, once (a probe's payload
        delays one call, not the next too). Returns True if the link monitor
        learned from it."""
        now = self.clock() if at is None else at
        with self._lock:
            self._hedged_in_a_row += 1
            learn = self._hedged_in_a_row > 1 or not self._overlaps_probe(call.sent_at)
        if learn:
            self.link.observe_late(cut_bytes, 0, (now - call.sent_at) * 1e3)
        return learn

    def late_reply(
        self, bytes_sent: int, bytes_received: int, network_ms: float, cloud_ms: float, queue_depth: int = 0,
    ) -> None:
        """A hedged call answered after all: its transfer still teaches the monitors."""
        self.link.observe(bytes_sent, bytes_received, network_ms)
        self.load.observe(cloud_ms, queue_depth)

    def call_failed(self, call: CloudCall) -> None:
        """The call failed (refused, unreachable, past the deadline): the link
        estimates learn nothing from it (the breaker, on the driver's side, counts it)."""

    # -- the device ---------------------------------------------------------------------

    def device_leg(self, model: str, partition: str, measured_ms: float, costs: Costs | None) -> None:
        """A partition's prefix (or the full model) ran on the device in ``measured_ms``."""
        if costs is not None and partition in costs:
            self._learn(model, partition, measured_ms, float(costs[partition]["device_ms"]))

    def local_suffix_done(self, model: str, partition: str, measured_ms: float, costs: Costs | None) -> None:
        """A partition's suffix ran on the device (a fallback): its time feeds the
        hedge timer, and the device learner (planned: full model - prefix)."""
        with self._lock:
            ewma = self._local_suffix_ms.setdefault((model, partition), Ewma())
        ewma.add(measured_ms)
        if costs is None or "device" not in costs:
            return
        prefix = float(costs[partition]["device_ms"]) if partition in costs else 0.0
        self._learn(model, suffix_key(partition), measured_ms, float(costs["device"]["device_ms"]) - prefix)

    def device_probe_due(
        self, bundle: PlanBundle, costs: Costs | None, refused: Collection[str] = (),
    ) -> str | None:
        """A request ran nothing on the device: the partition whose prefix to
        run :data:`DEVICE_PROBE_RUNS` times, off the request's path, when a
        device probe is due (:meth:`DeviceCosts.note_offloaded`), else None.
        A returned probe must end with :meth:`device_probe_done`."""
        if not self.config.learn_device or costs is None:
            return None
        model = bundle.model_name
        if not self.device.note_offloaded(model):
            return None
        runnable = [
            pid for pid, entry in costs.items()
            if pid in bundle.partitions and bundle.partitions[pid].prefix_path is not None
            and pid not in refused and float(entry["device_ms"]) >= self.device.min_planned_ms
        ]
        if not runnable:
            return None
        with self._lock:
            if model in self._device_probing:
                return None
            self._device_probing.add(model)
        return min(runnable, key=lambda p: float(costs[p]["device_ms"]))

    def device_probe_done(self, model: str, partition: str, runs_ms: Sequence[float], costs: Costs) -> None:
        """A device probe's runs (empty if it failed): the fastest is a sample,
        confirmed when they agree within the learner's step ratio."""
        try:
            if runs_ms:
                agree = max(runs_ms) <= self.device.step_ratio * min(runs_ms)
                self._learn(model, partition, min(runs_ms), float(costs[partition]["device_ms"]), confirmed=agree)
        finally:
            with self._lock:
                self._device_probing.discard(model)

    def _learn(self, model: str, key: str, measured_ms: float, planned_ms: float, *, confirmed: bool = False) -> None:
        if not self.config.learn_device:
            return
        emulating = self.config.device_time_from_profile
        if emulating != self._emulating:
            # The emulated device was swapped (an experiment's warm-up ran at this
            # machine's speed, its run pads to the plan): what was learned is of the old one.
            self._emulating = emulating
            self.device.reset()
        self.device.observe(model, key, measured_ms, planned_ms, confirmed=confirmed)
