"""The analytic engine: trace-driven simulation from the bundle's measured profile.

Each policy runs closed-loop over the trace in virtual time, exactly like the
live engine's request threads: a request starts, takes its predicted latency,
the next starts at the next slot of the spec's ``interval_ms`` grid. Per request:

* device compute = the profile's ``device_ms`` of the partition
  (``PlanBundle.estimate``'s input, measured by the planner);
* the cut tensors (+ a small gRPC/HTTP2 framing overhead) cross the uplink by
  integrating the trace's step-wise bandwidth (:meth:`Trace.transfer_end`;
  zero during outages), then half the RTT, jitter (the max of one uniform draw
  per 16 KB chunk, as the proxy keeps order) and loss (one RTO per lost
  packet, as the proxy); the cloud computes ``cloud_ms``; the reply crosses the
  downlink the same way. Without steps or loss this is exactly
  ``PlanBundle.estimate(...).latency_ms``;
* the Gateway's deadline hedge: if the cloud leg is later than
  ``hedge_after`` (``0.8 x remaining``, then ``remaining - 1.2 x`` the local
  suffix EWMA), the local suffix races it (fallback ``hedged``);
* ``neurosurgeon`` and ``adaptive`` decide on a *monitored* estimate: the
  Gateway's own :class:`splitgate.edge.LinkMonitor` (fed the same observations a
  live Gateway gets, on a virtual clock, with probes when stale) and, for
  ``adaptive``, the Gateway's own :class:`splitgate.edge.Policy` (hysteresis).

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

from splitgate.edge import LinkCalibration, LinkMonitor, Policy, calibrated, hedge_delay_ms, rtt_first, rtt_probe_timeout_s
from splitgate.edge._gateway import DEFAULT_RTT_MS as _DEFAULT_RTT
from splitgate.edge._gateway import DEFAULT_UPLINK_MBPS as _DEFAULT_UP
from splitgate.experiments._records import Record, energy_model, request_energy_mj
from splitgate.experiments.policies import neurosurgeon_choice, static_partition
from splitgate.experiments.spec import ExperimentSpec
from splitgate.netsim._proxy import MSS, LinkConditions
from splitgate.netsim.traces import Trace, TracePoint
from splitgate.planner import Conditions, Estimate, PlanBundle

__all__ = ["run_analytic", "simulate_policy", "UP_OVERHEAD", "DOWN_OVERHEAD"]

#: Bytes a request adds to its cut tensors on the wire (HTTP/2 HEADERS + DATA
#: frame headers, gRPC prefix, protobuf fields); measured through the proxy.
UP_OVERHEAD = 400
DOWN_OVERHEAD = 300
_CHUNK = 16 * 1024

Progress = Callable[[int], None]


def warm_partitions(bundle: PlanBundle, policy: str, nominal: Conditions) -> list[str]:
    """Partitions a policy may run (warmed up before the live run, in this order)."""
    fixed = static_partition(policy, bundle, nominal)
    if fixed is not None:
        return [fixed]
    profiled = (bundle.profile or {}).get("partitions", {})
    return [pid for pid in bundle.partitions if pid in profiled]


@dataclass
class _State:
    now: float = 0.0
    probing: bool = False
    local_ms: float | None = None  # the Gateway's local-suffix EWMA (alpha 0.5); steady here
    hedged_in_a_row: int = 0  # Gateway._hedged_in_a_row
    pending: list[tuple[float, int, str, tuple]] = field(default_factory=list)
    counter: int = 0

    def later(self, t: float, kind: str, *args: object) -> None:
        self.counter += 1
        heapq.heappush(self.pending, (t, self.counter, kind, args))


class _Sim:
    """One policy over one trace replay."""

    def __init__(self, spec: ExperimentSpec, bundle: PlanBundle, trace: Trace, policy: str, rng: random.Random):
        self.spec, self.bundle, self.trace, self.policy, self.rng = spec, bundle, trace, policy, rng
        self.entries = bundle.profile["partitions"]  # type: ignore[index]
        self.em = energy_model(bundle)
        self.st = _State()
        self.monitor = LinkMonitor(stale_after_s=spec.probe_interval_s, probe_bytes=spec.probe_bytes,
                                   clock=lambda: self.st.now)
        self.gw_policy = Policy(spec.hysteresis)
        self.calibration = LinkCalibration(clock=lambda: self.st.now)  # Gateway.calibration
        self.fixed = static_partition(policy, bundle, spec.nominal)
        self.device_full = float(self.entries["device"]["device_ms"])
        # (start, end) of transfers on each direction's bottleneck; off during warm-up
        self.busy: dict[str, list[tuple[float, float]]] = {"up": [], "down": []}
        self.contention = False
        self.probe_spans: list[tuple[float, float]] = []  # background probes (Gateway._probe_span)
        self.bg: tuple | None = None  # the last background probe: (id, its legs' end times, its transfers)
        self.abandoned: set[int] = set()  # background probes a network change cut short
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

    # -- monitor ------------------------------------------------------------------

    def _apply_pending(self, until: float | None = None) -> None:
        st = self.st
        until = st.now if until is None else until
        while st.pending and st.pending[0][0] <= until:
            t, _, kind, args = heapq.heappop(st.pending)
            if kind in ("probe", "late", "probe_done"):
                probe_id, *args = args
                if probe_id in self.abandoned:
                    continue
            saved, st.now = st.now, t
            if kind == "rtt":
                self.monitor.observe_rtt(*args)
            elif kind == "obs":
                self.monitor.observe(*args)
            elif kind == "probe":
                rtts, sends, reset = args
                self.monitor.observe_probe(rtts, self.spec.probe_bytes, sends, reset=reset)
            elif kind == "late":
                self.monitor.observe_late(*args)
            elif kind == "probe_done":
                st.probing = False
            st.now = saved

    def network_changed(self, t: float) -> None:
        """The OS reports a network change at ``t`` (:meth:`splitgate.edge.Gateway.network_changed`):
        a background probe starts now, or, if one is running, it is abandoned
        after its round trip under way and the fresh one starts then."""
        self._apply_pending(t)
        self._at(t, self.monitor.mark_changed)
        self._at(t, self.calibration.reset)
        if self.st.probing and self.bg is not None:
            probe_id, leg_ends, transfers = self.bg
            t = next((e for e in leg_ends if e >= t), leg_ends[-1])
            self.abandoned.add(probe_id)
            for direction, span in transfers:
                if span[0] >= t and span in self.busy[direction]:
                    self.busy[direction].remove(span)  # legs it no longer sends
            self.probe_spans[-1] = (self.probe_spans[-1][0], t)
        self.st.probing = True
        self._probe(t, sync=False, reset=True)

    def _probe(self, t: float, sync: bool, reset: bool = False, rtt_only: bool = False) -> float:
        """A Gateway probe started at ``t`` (:meth:`splitgate.edge.Gateway.probe`): two
        ServerLive round trips (2 s timeout each; when ``rtt_only`` the timeout
        of :func:`splitgate.edge.rtt_probe_timeout_s`), then
        two payload sends (10 s timeout), fed to :meth:`LinkMonitor.observe_probe`.
        Returns its end time."""
        self.monitor.clear_shift()
        now, rtts, sends, late = t, [], [], None
        leg_ends: list[float] = []
        transfers: list = [] if not sync else None
        rtt_timeout = rtt_probe_timeout_s(self.monitor.estimate().rtt_ms) if rtt_only else 2.0
        legs = ((UP_OVERHEAD // 2, DOWN_OVERHEAD // 2, rtt_timeout, rtts),) * 2
        if not rtt_only:
            legs += ((self.spec.probe_bytes + UP_OVERHEAD, DOWN_OVERHEAD, 10.0, sends),) * 2
        for nbytes, down, timeout_s, into in legs:
            end = self._round_trip(now, nbytes, down, 0.0, transfers)
            if end - now > timeout_s:  # the probe fails: a censored sample (Gateway.probe)
                now += timeout_s
                late = (self.spec.probe_bytes if into is sends else 0, 0, timeout_s * 1e3)
                rtts = sends = None
                leg_ends.append(now)
                break
            into.append((end - now) * 1e3)
            now = end
            leg_ends.append(now)
        if sync:
            if rtts is not None:
                self._at(now, self.monitor.observe_probe, rtts, self.spec.probe_bytes, sends, reset=reset)
            elif late is not None:
                self._at(now, self.monitor.observe_late, *late)
        else:
            self.probe_spans.append((t, now))
            self.st.counter += 1
            probe_id = self.st.counter
            self.bg = (probe_id, leg_ends, transfers)
            if rtts is not None:
                self.st.later(now, "probe", probe_id, rtts, sends, reset)
            elif late is not None:
                self.st.later(now, "late", probe_id, *late)
            self.st.later(now, "probe_done", probe_id)
        return now

    def _at(self, t: float, fn: Callable[..., None], *args: object, **kwargs: object) -> None:
        """Call a monitor method as if at virtual time ``t``."""
        saved, self.st.now = self.st.now, t
        try:
            fn(*args, **kwargs)
        finally:
            self.st.now = saved

    def _monitored(self) -> Conditions:
        est = self.monitor.estimate()
        return Conditions(
            uplink_mbps=est.uplink_mbps or _DEFAULT_UP, downlink_mbps=est.downlink_mbps,
            rtt_ms=est.rtt_ms if est.rtt_ms is not None else _DEFAULT_RTT, battery_pct=100.0,
        )

    def warm_up(self, partitions: list[str]) -> None:
        """What the live engine's warm-up teaches the Gateway (through the initial link, before t = 0)."""
        try:
            self._warm_up(partitions)
        finally:
            self.contention = True

    def _warm_up(self, partitions: list[str]) -> None:
        if self.policy not in ("adaptive", "neurosurgeon"):
            return
        for pid in partitions:
            e = self.entries[pid]
            if pid == "device":
                continue
            for _ in range(2):
                up, down = int(e["up_bytes"]), int(e["down_bytes"])
                end = self._round_trip(0.0, up + UP_OVERHEAD, down + DOWN_OVERHEAD, float(e["cloud_ms"]))
                if not math.isinf(end):
                    self.monitor.observe(up + UP_OVERHEAD, down + DOWN_OVERHEAD, end * 1e3 - float(e["cloud_ms"]))
        self._probe(0.0, sync=True)

    # -- one request ------------------------------------------------------------------

    def _choose(self) -> tuple[str, float]:
        """(partition, ms spent probing first)."""
        if self.fixed is not None:
            return self.fixed, 0.0
        p = self.trace.at(self.st.now)
        if self.policy == "mincut":
            return self.bundle.choose(Conditions(uplink_mbps=p.uplink_mbps, downlink_mbps=p.downlink_mbps,
                                                 rtt_ms=p.rtt_ms)), 0.0
        extra = 0.0
        why = self.monitor.probe_needed()  # the Gateway's rule (Gateway._maybe_probe)
        sync = why == "first" or (
            why == "shift" and not self.st.probing and rtt_first(self.monitor, self.bundle, self._monitored()))
        if self.policy == "adaptive" and sync:
            # first: a full probe; shift: the new RTT now, the bandwidth in the background
            end = self._probe(self.st.now, sync=True, reset=why == "shift", rtt_only=why == "shift")
            extra = (end - self.st.now) * 1e3
        if why is not None and not (self.policy == "adaptive" and why == "first") and not self.st.probing:
            self.st.probing = True
            self._probe(self.st.now + extra / 1e3, sync=False, reset=why == "shift")
        if self.policy == "neurosurgeon":
            return neurosurgeon_choice(self.bundle, self._monitored()), extra
        factor = self.calibration.factor() if self.spec.calibrate else 1.0  # (Gateway._select)
        return self.gw_policy.choose(self.bundle, calibrated(self._monitored(), factor)), extra

    def _overlaps_probe(self, start: float, end: float) -> bool:
        """Did a background probe share the link with a call (Gateway._overlaps_probe)?"""
        return any(s0 < end and e0 > start for s0, e0 in self.probe_spans[-4:])

    def _hedge_after(self, predicted: Estimate, remaining_ms: float) -> float:
        """The Gateway's hedge delay (:func:`splitgate.edge.hedge_delay_ms`); ``predicted``:
        the call's estimate on the monitored link."""
        leg = predicted.transfer_ms + predicted.cloud_ms if self.spec.hedge_factor > 0 else None
        return hedge_delay_ms(remaining_ms, self.st.local_ms, leg, self.spec.hedge_factor)

    def request(self, rep: int, seq: int) -> Record:
        st = self.st
        while self.hints and self.hints[0] <= st.now:
            self.network_changed(self.hints.pop(0))
        self._apply_pending()
        start = st.now
        point: TracePoint = self.trace.at(start)
        pid, probe_ms = self._choose()
        e = self.entries[pid]
        t0 = start + probe_ms / 1e3
        dev = float(e["device_ms"])
        cloud = float(e["cloud_ms"])
        up, down = int(e["up_bytes"]), int(e["down_bytes"])
        fallback, network_ms, sent, received = "", 0.0, 0, 0
        if pid == "device":
            latency = probe_ms + dev
        else:
            t1 = t0 + dev / 1e3
            predicted = self.bundle.estimate(pid, self._monitored())  # (Gateway._cloud_leg)
            back = self._round_trip(t1, up + UP_OVERHEAD, down + DOWN_OVERHEAD, cloud)
            cloud_leg = (back - t1) * 1e3
            remaining = self.spec.deadline_ms - dev - probe_ms
            local_ms = max(self.device_full - dev, 0.0)
            hedge = self.spec.hedge
            hedge_after = self._hedge_after(predicted, remaining) if hedge else remaining
            if cloud_leg <= hedge_after or (hedge and cloud_leg <= hedge_after + local_ms):
                latency = probe_ms + dev + cloud_leg
                network_ms = cloud_leg - cloud
                sent, received = up + UP_OVERHEAD, down + DOWN_OVERHEAD
                shared = self._overlaps_probe(t1, back)  # (Gateway._observe: queued behind a probe?)
                self.monitor.observe(sent, received, network_ms, shared=shared)
                if not shared:  # queued behind a probe is not the link swinging
                    self.calibration.observe(predicted.transfer_ms, network_ms)
                st.hedged_in_a_row = 0
            else:
                fallback = "hedged" if hedge else "deadline_exceeded"
                latency = probe_ms + dev + hedge_after + local_ms
                st.local_ms = local_ms if st.local_ms is None else 0.5 * (local_ms + st.local_ms)
                # the Gateway tells the monitor the link is at least this slow (no probe in the
                # way, or a second hedge in a row: Gateway._cloud_leg)
                st.hedged_in_a_row += 1
                if hedge and (st.hedged_in_a_row > 1
                              or not self._overlaps_probe(t1, t1 + (hedge_after + local_ms) / 1e3)):
                    self._at(t1 + (hedge_after + local_ms) / 1e3, self.monitor.observe_late,
                             up, 0, hedge_after + local_ms)
                if cloud_leg <= remaining:  # the late reply still teaches the monitors
                    st.later(back, "obs", up + UP_OVERHEAD, down + DOWN_OVERHEAD, cloud_leg - cloud)
                dev += local_ms
                cloud = 0.0
        energy = request_energy_mj(
            self.em, point.radio, device_ms=dev, latency_ms=latency, bytes_sent=sent, bytes_received=received,
            uplink_mbps=point.uplink_mbps, downlink_mbps=point.downlink_mbps,
        )
        st.now = self.spec.next_start(start + latency / 1e3)
        return Record("analytic", self.policy, rep, seq, round(start, 4), point.label, point.uplink_mbps,
                      point.downlink_mbps, point.rtt_ms, point.outage, pid, latency, energy, dev, network_ms,
                      cloud, sent, received, fallback)


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
