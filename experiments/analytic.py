"""The analytic engine: trace-driven simulation from the bundle's measured profile.

Each policy runs closed-loop over the trace in virtual time, exactly like the
live engine's request threads: a request starts, takes its predicted latency,
the next starts at the next slot of the spec's ``interval_ms`` grid.

This module simulates the world only -- the link, the cloud, the device's
compute and the clock. Every decision the edge makes (probe triggers, the
choice with its hysteresis, hedge timing, what each outcome teaches the link,
calibration, cloud-load and device estimates) is the live Gateway's own
:class:`splitgate.edge.DecisionCore`, driven here with simulated time through
the same methods in the same order as the Gateway drives it. Per request:

* device compute = the profile's ``device_ms`` of the partition (the live
  engine pads device legs to the same planned times);
* the cut tensors (+ a small gRPC/HTTP2 framing overhead) cross the uplink by
  integrating the trace's step-wise bandwidth (:meth:`Trace.transfer_end`;
  zero during outages), then half the RTT, jitter (the max of one uniform draw
  per 16 KB chunk, as the proxy keeps order) and loss (one RTO per lost
  packet, as the proxy); the cloud computes ``cloud_ms``; the reply crosses the
  downlink the same way. Without steps or loss this is exactly
  ``PlanBundle.estimate(...).latency_ms``;
* a cloud leg later than the core's ``hedge_after_s`` races the local suffix
  (fallback ``hedged``): whichever finishes first answers;
* a bundle's confident-on-device cascade runs first for ``adaptive`` (the
  Gateway's rule) and ``joint`` (the same rule under the true link) when
  :meth:`DecisionCore.cascade_choice` says it pays: the small model takes its
  planned time, and answers (partition ``cascade``) with the planned exit
  rate's probability -- the engine runs no model, so the world's exit rate is
  the calibration set's; otherwise the path follows, after it;
* probes cross the same simulated link (a background probe's payload delays
  the requests queued behind it, as in the shaping proxy); a reported network
  change (``spec.network_hints``) abandons a running probe after its round
  trip under way.

What the edge learns from an outcome reaches the core at the simulated time it
happens (a reply when it arrives, a probe when it ends), in time order.
It runs thousands of requests per second of wall time; ``repeats`` replays
the trace with different jitter/loss seeds.
"""

from __future__ import annotations

import heapq
import math
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from splitgate.edge import CloudCall, DecisionCore, GatewayConfig, ProbeSpec
from splitgate.experiments._records import Record, energy_model, request_energy_mj
from splitgate.experiments.policies import CASCADE, neurosurgeon_choice, static_partition
from splitgate.experiments.spec import ExperimentSpec
from splitgate.netsim._proxy import MSS, LinkConditions
from splitgate.netsim.traces import Trace, TracePoint
from splitgate.planner import Conditions, PlanBundle

__all__ = ["run_analytic", "simulate_policy", "gateway_config", "request_shapes", "UP_OVERHEAD", "DOWN_OVERHEAD"]

#: Bytes a request adds to its cut tensors on the wire (HTTP/2 HEADERS + DATA
#: frame headers, gRPC prefix, protobuf fields); measured through the proxy.
UP_OVERHEAD = 400
DOWN_OVERHEAD = 300
#: The partition of a request the cascade's small model answered (the Gateway's ``Trace.partition``).
CASCADE_PARTITION = "cascade"
_CHUNK = 16 * 1024
#: The live engine's warm-up: each cloud-using partition a policy may run, this many times.
WARM_UP_CALLS = 3
#: The decision core's clock during the warm-up: just before the trace starts.
_BEFORE_START = -1e-3

Progress = Callable[[int], None]


def warm_partitions(bundle: PlanBundle, policy: str, nominal: Conditions) -> list[str]:
    """Partitions a policy may run (warmed up before the live run, in this order)."""
    fixed = static_partition(policy, bundle, nominal)
    if fixed is not None:
        return [fixed]
    profiled = (bundle.profile or {}).get("partitions", {})
    return [pid for pid in bundle.partitions if pid in profiled]


def request_shapes(bundle: PlanBundle) -> dict[str, list[int]]:
    """The input shapes of the engines' requests (dynamic dims = 1)."""
    return {s.name: [d if isinstance(d, int) and d >= 0 else 1 for d in s.shape] for s in bundle.inputs}


def gateway_config(spec: ExperimentSpec) -> GatewayConfig:
    """The settings of the live engine's Gateways (``spec.gateway``; battery on
    mains; device legs at the profile's planned times, as the live run pads them).

    Raises:
        TypeError: ``spec.gateway`` names a setting GatewayConfig does not have.
    """
    config = GatewayConfig(**spec.gateway)
    config.battery_pct = 100.0
    config.device_time_from_profile = True
    return config


@dataclass
class _State:
    now: float = 0.0
    pending: list[tuple[float, int, Callable[..., Any], tuple, dict]] = field(default_factory=list)
    counter: int = 0


@dataclass
class _Background:
    """A background probe under way: its spec, its legs (bytes up, bytes down,
    timeout, which samples), what it measured so far; ``abandoned`` by a network change."""

    spec: ProbeSpec
    legs: list[tuple[int, int, float, list[float]]]
    rtts: list[float]
    sends: list[float]
    abandoned: bool = False


class _Sim:
    """One policy over one trace replay: the simulated world, driving the Gateway's decision core."""

    def __init__(self, spec: ExperimentSpec, bundle: PlanBundle, trace: Trace, policy: str, rng: random.Random):
        self.spec, self.bundle, self.trace, self.policy, self.rng = spec, bundle, trace, policy, rng
        self.entries = bundle.profile["partitions"]  # type: ignore[index]
        self.em = energy_model(bundle)
        self.st = _State()
        self.model = bundle.model_name
        self.core = DecisionCore(gateway_config(spec), clock=lambda: self.st.now)
        self.costs = self.core.request_costs(bundle, request_shapes(bundle))
        self.fixed = static_partition(policy, bundle, spec.nominal)
        self.device_slowdown = 1.0  # the device's compute against the plan (a throttled device: > 1)
        # (start, end) of transfers on each direction's bottleneck; off during warm-up
        self.busy: dict[str, list[tuple[float, float]]] = {"up": [], "down": []}
        self.contention = False
        self.bg: _Background | None = None  # the last background probe
        # OS network-change reports (spec.network_hints), still to come
        self.hints = trace.radio_changes() if spec.network_hints and policy == "adaptive" else []

    # -- the network -------------------------------------------------------------

    def _leg(self, t: float, nbytes: int, direction: str, record: list | None = None) -> float:
        """Arrival time of ``nbytes`` sent at ``t`` (bandwidth, delay, jitter, loss, outages).

        Transfers share the link first come, first served: bytes sent while a
        background probe's payload is still crossing wait behind it, as they do
        in the shaping proxy (the probe's bytes sit ahead in the socket buffers).
        """
        start = self._queued_start(t, direction)
        end = self.trace.transfer_end(start, nbytes, direction)
        if math.isinf(end):
            return end
        if self.contention:
            busy = self.busy[direction]
            busy.append((start, end))
            if record is not None:
                record.append((direction, (start, end)))
            if len(busy) > 64:
                del busy[:32]
        p = self.trace.at(end)
        extra = p.rtt_ms / 2
        if p.jitter_ms:
            n = max(1, math.ceil(nbytes / _CHUNK))
            extra += p.jitter_ms * self.rng.random() ** (1.0 / n)
        if p.loss:
            packets = max(1, math.ceil(nbytes / MSS))
            lost = sum(1 for _ in range(packets) if self.rng.random() < p.loss) if packets < 2000 else \
                int(round(self.rng.gauss(packets * p.loss, math.sqrt(packets * p.loss * (1 - p.loss)))))
            extra += max(lost, 0) * LinkConditions(rtt_ms=p.rtt_ms).rto_ms
        return self.trace.outage_end(end + extra / 1e3)

    def _queued_start(self, t: float, direction: str) -> float:
        start, moved = t, True
        while moved:
            moved = False
            for s0, e0 in self.busy[direction]:
                if s0 <= start < e0:
                    start, moved = e0, True
        return start

    def _round_trip(self, t: float, up: int, down: int, cloud_ms: float, record: list | None = None) -> float:
        arrive = self._leg(t, up, "up", record)
        if math.isinf(arrive):
            return arrive
        return self._leg(arrive + cloud_ms / 1e3, down, "down", record)

    # -- simulated time ---------------------------------------------------------------

    def _later(self, t: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Call ``fn`` (a decision core method, or the next step of a probe) when the clock reaches ``t``."""
        self.st.counter += 1
        heapq.heappush(self.st.pending, (t, self.st.counter, fn, args, kwargs))

    def _apply_pending(self, until: float | None = None) -> None:
        """Deliver, in time order, everything that happened up to ``until`` (default now)."""
        st = self.st
        until = st.now if until is None else until
        while st.pending and st.pending[0][0] <= until:
            t, _, fn, args, kwargs = heapq.heappop(st.pending)
            self._at(t, fn, *args, **kwargs)

    def _at(self, t: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn`` with the clock at ``t``."""
        saved, self.st.now = self.st.now, t
        try:
            return fn(*args, **kwargs)
        finally:
            self.st.now = saved

    # -- probes --------------------------------------------------------------------------

    def network_changed(self, t: float) -> None:
        """The OS reports a network change at ``t`` (:meth:`splitgate.edge.Gateway.network_changed`).

        The core says whether the running probe is abandoned (it stops after
        its round trip under way and records nothing) and whether a fresh probe
        is due (it starts now, or when the abandoned one stops)."""
        self._apply_pending(t)
        change = self._at(t, self.core.network_changed)
        if change.abandon_probe and self.bg is not None:
            self.bg.abandoned = True
        if change.probe and self._at(t, self.core.claim_background_probe):
            self._at(t, self._probe, t, sync=False, reset=True)

    def _probe(self, t: float, sync: bool, reset: bool = False, rtt_only: bool = False,
               core_at: float | None = None) -> float:
        """A Gateway probe started at ``t`` (:meth:`splitgate.edge.Gateway.probe`):
        the round trips and payload sends of the core's :class:`ProbeSpec` over
        the simulated link, fed back to the core. One on the request's path is
        simulated at once (``core_at``: the core's clock for all of it, for the
        warm-up before t = 0); a background one leg by leg as simulated time
        passes, each leg sharing the link with the transfers under way when it
        starts. Returns its end time (``t`` for a background probe)."""
        spec: ProbeSpec = self._at(t if core_at is None else core_at, self.core.probe_started,
                                   rtt_only=rtt_only, reset=reset)
        rtts: list[float] = []
        sends: list[float] = []
        legs = [(UP_OVERHEAD // 2, DOWN_OVERHEAD // 2, spec.rtt_timeout_s, rtts)] * spec.round_trips
        legs += [(spec.send_bytes + UP_OVERHEAD, DOWN_OVERHEAD, spec.send_timeout_s, sends)] * spec.sends
        if not sync:
            self.bg = _Background(spec, legs, rtts, sends)
            self._at(t, self._probe_leg, self.bg, 0)
            return t
        now = t
        at = (lambda: now) if core_at is None else (lambda: core_at)
        for nbytes, down, timeout_s, into in legs:
            end = self._round_trip(now, nbytes, down, 0.0)
            if end - now > timeout_s:  # the leg times out: a censored sample (Gateway._measure)
                now += timeout_s
                self._at(at(), self.core.probe_timed_out, spec, spec.send_bytes if into is sends else 0, timeout_s * 1e3)
                break
            into.append((end - now) * 1e3)
            now = end
        else:
            self._at(at(), self.core.probe_measured, spec, rtts, sends)
        self.core.probe_ended(at=at())
        return now

    def _probe_leg(self, probe: _Background, i: int) -> None:
        """A background probe's leg ``i`` starts now."""
        now = self.st.now
        nbytes, down, timeout_s, into = probe.legs[i]
        end = self._round_trip(now, nbytes, down, 0.0)
        if end - now > timeout_s:  # a censored sample, unless abandoned meanwhile
            failed = (probe.spec.send_bytes if into is probe.sends else 0, timeout_s * 1e3)
            self._later(now + timeout_s, self._probe_leg_done, probe, i, None, failed)
        else:
            self._later(end, self._probe_leg_done, probe, i, (end - now) * 1e3, None)

    def _probe_leg_done(self, probe: _Background, i: int, ms: float | None, failed: tuple[int, float] | None) -> None:
        """A background probe's leg ``i`` ended now (``ms``), or timed out (``failed``)."""
        if not probe.abandoned:
            if failed is not None:
                self.core.probe_timed_out(probe.spec, *failed)
            else:
                probe.legs[i][3].append(ms)  # type: ignore[arg-type]
                if i + 1 < len(probe.legs):
                    self._probe_leg(probe, i + 1)
                    return
                self.core.probe_measured(probe.spec, probe.rtts, probe.sends)
        self._background_done()

    def _background_done(self) -> None:
        """A background probe ended (now): the Gateway's ``_background_probe`` epilogue."""
        self.core.probe_ended()
        if self.core.background_probe_finished() and self.core.claim_background_probe():
            self._probe(self.st.now, sync=False, reset=True)

    def warm_up(self, partitions: list[str]) -> None:
        """What the live engine's warm-up teaches the Gateway (through the initial link, before t = 0)."""
        try:
            self._warm_up(partitions)
        finally:
            self.contention = True
            self.st.now = 0.0

    def _warm_up(self, partitions: list[str]) -> None:
        if self.policy not in ("adaptive", "neurosurgeon"):
            return
        self.st.now = _BEFORE_START
        deadline_s = self.core.config.deadline_ms / 1e3
        for pid in partitions:
            e = self.entries[pid]
            if self.bundle.partitions[pid].kind == "device":  # device, device~int8: no cloud call
                continue
            up, down, cloud = int(e["up_bytes"]) + UP_OVERHEAD, int(e["down_bytes"]) + DOWN_OVERHEAD, float(e["cloud_ms"])
            for _ in range(WARM_UP_CALLS):  # (forced partitions: the Gateway probes nothing before them)
                call = self.core.cloud_call(self.bundle, pid, self.costs, deadline_s)
                end = self._round_trip(0.0, up, down, cloud)
                if not math.isinf(end):
                    self.core.reply_in_time(call, up, down, end * 1e3 - cloud, cloud)
        self._probe(0.0, sync=True, core_at=_BEFORE_START)

    # -- one request ------------------------------------------------------------------

    def _choose(self) -> tuple[str, float]:
        """(partition, ms spent probing first)."""
        st = self.st
        if self.fixed is not None:
            return self.fixed, 0.0
        if self.policy in ("mincut", "joint"):
            p = self.trace.at(st.now)
            return self.bundle.choose(Conditions(uplink_mbps=p.uplink_mbps, downlink_mbps=p.downlink_mbps,
                                                 rtt_ms=p.rtt_ms)), 0.0
        if self.policy == "neurosurgeon":
            # the live engine's chain scan: the link monitor's probe rule, in the background
            why = self.core.link.probe_needed()
            if why is not None and self.core.claim_background_probe():
                self._probe(st.now, sync=False, reset=why == "shift")
            return neurosurgeon_choice(self.bundle, self.core.conditions()), 0.0
        # adaptive: the Gateway's own decisions (Gateway._select)
        plan = self.core.probes_before(self.bundle, self.costs)
        extra = 0.0
        if plan.sync is not None:
            end = self._probe(st.now, sync=True, reset=plan.reset, rtt_only=plan.sync == "rtt")
            extra = (end - st.now) * 1e3
        at = st.now + extra / 1e3
        if plan.background and self._at(at, self.core.claim_background_probe):
            self._probe(at, sync=False, reset=plan.reset)
        return self._at(at, self.core.choose, self.bundle, self.costs).partition, extra

    def _device_ms(self, pid: str) -> float:
        """The device's time for a partition's prefix (the full model for ``device``)."""
        return float(self.entries[pid]["device_ms"]) * self.device_slowdown

    def _device_probe(self, t: float) -> None:
        """A request that runs nothing on the device: the device probe the core
        may ask for runs its planned time, twice, from ``t`` (off the request's path)."""
        pid = self._at(t, self.core.device_probe_due, self.bundle, self.costs)
        if pid is None:
            return
        runs = [self._device_ms(pid)] * 2
        self._later(t + sum(runs) / 1e3, self.core.device_probe_done, self.model, pid, runs, self.costs)

    def request(self, rep: int, seq: int) -> Record:
        st = self.st
        while self.hints and self.hints[0] <= st.now:
            self.network_changed(self.hints.pop(0))
        self._apply_pending()
        start = st.now
        point: TracePoint = self.trace.at(start)
        pid, probe_ms = self._choose()
        small_ms, exited = self._cascade_first(pid, start + probe_ms / 1e3)
        if exited:
            return self._cascade_exit(rep, seq, point, probe_ms + small_ms, small_ms)
        probe_ms += small_ms  # the path starts after the small model
        e = self.entries[pid]
        t0 = start + probe_ms / 1e3
        dev = self._device_ms(pid)
        cloud = float(e["cloud_ms"])
        up, down = int(e["up_bytes"]), int(e["down_bytes"])
        fallback, network_ms, sent, received = "", 0.0, 0, 0
        if self.bundle.partitions[pid].prefix_path is not None:
            self._later(t0 + dev / 1e3, self.core.device_leg, self.model, pid, dev, self.costs)
        else:
            self._device_probe(t0)
        if self.bundle.partitions[pid].kind == "device":  # device, device~int8: all on the device
            latency = probe_ms + dev
        else:
            latency, fallback, network_ms, sent, received, dev, cloud = self._cloud_leg(
                pid, t0 + dev / 1e3, probe_ms, dev, cloud, up, down)
        dev += small_ms
        energy = request_energy_mj(
            self.em, point.radio, device_ms=dev, latency_ms=latency, bytes_sent=sent, bytes_received=received,
            uplink_mbps=point.uplink_mbps, downlink_mbps=point.downlink_mbps,
        )
        st.now = self.spec.next_start(start + latency / 1e3)
        return Record("analytic", self.policy, rep, seq, round(start, 4), point.label, point.uplink_mbps,
                      point.downlink_mbps, point.rtt_ms, point.outage, pid, latency, energy, dev, network_ms,
                      cloud, sent, received, fallback)

    def _cascade_first(self, pid: str, t: float) -> tuple[float, bool]:
        """The bundle's cascade in front of ``pid`` at ``t``, when the policy runs one
        and the decision core says it pays (``joint``: under the true link).

        Returns:
            (the small model's ms, 0 when it did not run; whether it answered).
        """
        cascade = self.bundle.cascade
        if self.policy not in CASCADE or cascade is None:
            return 0.0, False
        truth = None
        if self.policy == "joint":
            p = self.trace.at(t)
            truth = Conditions(uplink_mbps=p.uplink_mbps, downlink_mbps=p.downlink_mbps, rtt_ms=p.rtt_ms)
        choice = self._at(t, self.core.cascade_choice, self.bundle, pid, self.costs, conditions=truth)
        if choice is None or not choice.run or choice.planned_small_ms is None:
            return 0.0, False
        small = choice.planned_small_ms * self.device_slowdown
        exited = self.rng.random() < cascade.exit_rate
        self._later(t + small / 1e3, self.core.cascade_done, self.bundle, exited, small, choice.planned_small_ms)
        return small, exited

    def _cascade_exit(self, rep: int, seq: int, point: TracePoint, latency: float, small_ms: float) -> Record:
        """A request the cascade's small model answered (partition ``cascade``)."""
        start = self.st.now
        energy = request_energy_mj(
            self.em, point.radio, device_ms=small_ms, latency_ms=latency, bytes_sent=0, bytes_received=0,
            uplink_mbps=point.uplink_mbps, downlink_mbps=point.downlink_mbps,
        )
        self.st.now = self.spec.next_start(start + latency / 1e3)
        return Record("analytic", self.policy, rep, seq, round(start, 4), point.label, point.uplink_mbps,
                      point.downlink_mbps, point.rtt_ms, point.outage, CASCADE_PARTITION, latency, energy, small_ms,
                      0.0, 0.0, 0, 0, "")

    def _cloud_leg(self, pid: str, t1: float, probe_ms: float, dev: float, cloud: float, up: int,
                   down: int) -> tuple[float, str, float, int, int, float, float]:
        """The cloud call sent at ``t1`` (Gateway._cloud_leg): the reply in time,
        or the local suffix that raced it. Returns (latency, fallback,
        network_ms, bytes sent, bytes received, device ms, cloud ms)."""
        self._apply_pending(t1)  # what the edge learned by the time it sends
        remaining = self.spec.deadline_ms - dev - probe_ms
        call: CloudCall = self._at(t1, self.core.cloud_call, self.bundle, pid, self.costs, remaining / 1e3)
        sent, received = up + UP_OVERHEAD, down + DOWN_OVERHEAD
        back = self._round_trip(t1, sent, received, cloud)
        cloud_leg = (back - t1) * 1e3
        hedge_after = call.hedge_after_s * 1e3
        local_ms = max(self._device_ms("device") - dev, 0.0)
        hedge = self.core.config.hedge
        done = t1 + (hedge_after + local_ms) / 1e3  # when a local suffix started at hedge_after ends
        if cloud_leg <= hedge_after or (hedge and cloud_leg <= hedge_after + local_ms):
            network_ms = cloud_leg - cloud
            self._later(back, self.core.reply_in_time, call, sent, received, network_ms, cloud)
            if cloud_leg > hedge_after:  # the cloud won the race; the local suffix still ran
                self._later(done, self.core.local_suffix_done, self.model, pid, local_ms, self.costs)
            return probe_ms + dev + cloud_leg, "", network_ms, sent, received, dev, cloud
        if hedge:
            self._later(done, self.core.call_late, call, self.bundle.partition(pid).cut_bytes)
            if cloud_leg <= remaining:  # the late reply still teaches the monitors
                self._later(back, self.core.late_reply, sent, received, cloud_leg - cloud, cloud)
        else:
            self._later(t1 + hedge_after / 1e3, self.core.call_failed, call)  # DEADLINE_EXCEEDED
        self._later(done, self.core.local_suffix_done, self.model, pid, local_ms, self.costs)
        fallback = "hedged" if hedge else "deadline_exceeded"
        return probe_ms + dev + hedge_after + local_ms, fallback, 0.0, 0, 0, dev + local_ms, 0.0


def simulate_policy(spec: ExperimentSpec, bundle: PlanBundle, policy: str, *, rep: int = 0,
                    seed: int = 0) -> list[Record]:
    """One closed-loop run of ``policy`` over the spec's trace."""
    sim = _Sim(spec, bundle, spec.trace, policy, random.Random(seed * 1009 + rep * 7919 + zlib.crc32(policy.encode())))
    sim.warm_up(warm_partitions(bundle, policy, spec.nominal))
    out, seq = [], 0
    while sim.st.now < spec.trace.duration_s:
        out.append(sim.request(rep, seq))
        seq += 1
    return out


def run_analytic(spec: ExperimentSpec, bundle: PlanBundle, *, repeats: int | None = None,
                 progress: Progress | None = None) -> list[Record]:
    """All the spec's policies over ``repeats`` replays of its trace.

    Raises:
        splitgate.errors.BundleError: the bundle has no profile.
    """
    if not bundle.has_profile:
        from splitgate.errors import BundleError

        raise BundleError(f"bundle {bundle.root} has no profile; the analytic engine needs one")
    n = spec.analytic_repeats if repeats is None else repeats
    records: list[Record] = []
    for rep in range(n):
        for policy in spec.policies:
            records += simulate_policy(spec, bundle, policy, rep=rep, seed=spec.seed)
        if progress is not None:
            progress(1)
    return records
