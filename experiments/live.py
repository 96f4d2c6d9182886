"""The live engine: real edge Gateways -> ShapingProxy links -> a real Ray Serve tier, real time.

Every policy gets its own :class:`splitgate.edge.Gateway` and its own
:class:`splitgate.netsim.ShapingProxy` to the same cloud tier; one
:class:`splitgate.netsim.ScheduleDriver` plays the spec's trace into all the proxies, and
the policies run side by side (one closed-loop thread each) for the trace's
duration. Static policies and the chain scan pass ``partition=``; the
``adaptive`` policy is the Gateway's own (monitors, decision table, hysteresis,
probes, hedging), told of each radio change as a phone's OS would tell it
(``spec.network_hints``).

The emulated device: the Gateway's ``device_time_from_profile`` pads every
device leg (prefix, or the local suffix of a fallback) to the time the bundle's
profile plans for it (the planner measured each prefix on this machine and
multiplied it by the spec's slowdown), so the live device runs exactly the
per-partition times the analytic engine uses, however loaded this shared machine
is (as long as the real compute stays below the planned time; the run reports
any device leg that overran its plan). Warm-up runs at the real speed.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

import numpy as np

from splitgate.edge import Gateway
from splitgate.experiments._records import Record, energy_model, request_energy_mj
from splitgate.experiments.analytic import request_shapes, warm_partitions
from splitgate.experiments.policies import neurosurgeon_choice, static_partition
from splitgate.experiments.spec import ExperimentSpec
from splitgate.netsim import ScheduleDriver, ShapingProxy
from splitgate.planner import Conditions, PlanBundle

__all__ = ["model_inputs", "run_live"]

Progress = Callable[[float], None]


def model_inputs(bundle: PlanBundle, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for the bundle's model (dynamic dims = 1): images scaled from bytes
    (``k / 255``) when the bundle offers the lossless ``cloud@uint8`` (it was calibrated
    on such inputs), else standard normal floats."""
    rng = np.random.default_rng(seed)
    byte_images = any(p.kind == "cloud" and p.encoding == "uint8" for p in bundle.partitions.values())
    feeds = {}
    shapes = request_shapes(bundle)  # (the analytic engine's requests have the same)
    for spec in bundle.inputs:
        shape = shapes[spec.name]
        if spec.datatype.startswith("INT"):
            feeds[spec.name] = rng.integers(0, 10, size=shape).astype(np.int64)
        elif byte_images:
            feeds[spec.name] = (rng.integers(0, 256, size=shape) / 255.0).astype(np.float32)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


class _Runner:
    """One policy's closed loop against its own Gateway and link."""

    def __init__(self, spec: ExperimentSpec, bundle: PlanBundle, policy: str, gw: Gateway,
                 driver: ScheduleDriver, x: dict[str, np.ndarray]) -> None:
        self.spec, self.bundle, self.policy, self.gw = spec, bundle, policy, gw
        self.driver, self.x = driver, x
        self.model = bundle.model_name
        self.fixed = static_partition(policy, bundle, spec.nominal)
        self.records: list[Record] = []
        self.planned = {pid: float(e["device_ms"]) for pid, e in bundle.profile["partitions"].items()}  # type: ignore[index]
        self.overruns: list[float] = []
        self.error: BaseException | None = None
        self._probing = threading.Event()
        self.em = energy_model(bundle)

    def _background_probe(self, reset: bool = False) -> None:
        def run() -> None:
            try:
                self.gw.probe(reset=reset)
            finally:
                self._probing.clear()

        self._probing.set()
        threading.Thread(target=run, daemon=True).start()

    def _choose(self) -> str | None:
        if self.fixed is not None:
            return self.fixed
        if self.policy == "mincut":
            p = self.driver.current()
            return self.bundle.choose(Conditions(uplink_mbps=p.uplink_mbps, downlink_mbps=p.downlink_mbps,
                                                 rtt_ms=p.rtt_ms))
        if self.policy == "neurosurgeon":
            # the Gateway's own probing rule (LinkMonitor.probe_needed), in the
            # background, as the analytic engine
            why = self.gw.link.probe_needed()
            if why is not None and not self._probing.is_set():
                self._background_probe(reset=why == "shift")
            return neurosurgeon_choice(self.bundle, self.gw.conditions())
        return None  # adaptive: the Gateway decides

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - reported by run_live
            self.error = exc

    def _loop(self) -> None:
        seq = 0
        while not self.driver.done():
            start_t = self.driver.elapsed()
            point = self.driver.trace.at(start_t)
            pid = self._choose()
            t0 = time.perf_counter()
            result = self.gw.infer(self.model, self.x, partition=pid)
            latency = (time.perf_counter() - t0) * 1e3
            tr = result.trace
            planned = self.planned.get(tr.partition, 0.0)
            if not tr.fallback and tr.device_ms > planned + max(2.0, 0.02 * planned):
                self.overruns.append(tr.device_ms - planned)  # real compute slower than the plan
            energy = request_energy_mj(
                self.em, point.radio, device_ms=tr.device_ms, latency_ms=latency, bytes_sent=tr.bytes_sent,
                bytes_received=tr.bytes_received, uplink_mbps=point.uplink_mbps, downlink_mbps=point.downlink_mbps,
            )
            self.records.append(Record(
                "live", self.policy, 0, seq, round(start_t, 4), point.label, point.uplink_mbps,
                point.downlink_mbps, point.rtt_ms, point.outage, tr.partition, latency, energy, tr.device_ms,
                tr.network_ms, tr.cloud_ms, tr.bytes_sent, tr.bytes_received, tr.fallback or "",
            ))
            seq += 1
            wait = self.spec.next_start(self.driver.elapsed()) - self.driver.elapsed()
            if wait > 0:
                time.sleep(wait)


def run_live(
    spec: ExperimentSpec,
    bundle: PlanBundle,
    cloud: str,
    *,
    rep: int = 0,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Record]:
    """Run the spec's policies side by side in real time through shaped links to ``cloud``.

    Args:
        spec: the experiment.
        bundle: the plan bundle (served by the tier at ``cloud``).
        cloud: ``host:port`` of a running cloud tier serving ``bundle``.
        rep: the replay's number: it seeds the links' jitter, so replays are
            independent samples (as the analytic engine's are), not copies.
        progress: called with the trace seconds elapsed, about 4 times a second.
        log: called with notes (calibration, mispredictions).

    Raises:
        RuntimeError: a policy thread failed (the message names it).
    """
    say = log or (lambda msg: None)
    x = model_inputs(bundle, spec.seed)
    first = spec.trace.points[0].conditions()
    proxies: dict[str, ShapingProxy] = {}
    gateways: dict[str, Gateway] = {}
    old_switch = sys.getswitchinterval()
    # Short GIL slices: a padded device leg's wake-up must not wait 5 ms for
    # the GIL held by another policy's thread.
    sys.setswitchinterval(0.0005)
    try:
        for i, policy in enumerate(spec.policies):
            proxies[policy] = ShapingProxy(cloud, first, seed=spec.seed + 7919 * rep + i).start()
            settings = {k: v for k, v in spec.gateway.items() if k != "hedge"}
            gateways[policy] = Gateway(
                [bundle], cloud=proxies[policy].address, intra_op_threads=1, battery_pct=100.0,
                device_slowdown=1.0, device_time_from_profile=False, hedge=bool(spec.gateway.get("hedge", True)), **settings,
            )
        _warm_up(spec, bundle, gateways, x)
        for gw in gateways.values():  # from now on the device runs its planned times
            gw.config.device_time_from_profile = True
        driver = ScheduleDriver(spec.trace, proxies.values(), on_change=_network_hints(spec, gateways))
        runners = [_Runner(spec, bundle, p, gateways[p], driver, x) for p in spec.policies]
        threads = [threading.Thread(target=r.run, name=f"policy-{r.policy}", daemon=True) for r in runners]
        driver.start()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(0.25)
            if progress is not None:
                progress(min(driver.elapsed(), spec.trace.duration_s))
        driver.stop()
        for r in runners:
            if r.error is not None:
                raise RuntimeError(f"live engine: policy '{r.policy}' failed: {r.error!r}") from r.error
            if r.overruns:
                say(f"{r.policy}: {len(r.overruns)} device leg(s) overran the planned time "
                    f"(real compute slower than the plan; worst +{max(r.overruns):.1f} ms)")
        return [rec for r in runners for rec in r.records]
    finally:
        sys.setswitchinterval(old_switch)
        for gw in gateways.values():
            gw.close()
        for proxy in proxies.values():
            proxy.stop()


def _network_hints(spec: ExperimentSpec, gateways: dict[str, Gateway]) -> Callable | None:
    """The device OS's part: tell the adaptive Gateway when the radio changes
    (``spec.network_hints``), right after the links changed."""
    changes = set(spec.trace.radio_changes())
    told = [gw for policy, gw in gateways.items() if policy == "adaptive"]
    if not (spec.network_hints and changes and told):
        return None

    def on_change(_elapsed: float, point) -> None:
        if point.t_s in changes:
            for gw in told:
                gw.network_changed()

    return on_change


def _warm_up(spec: ExperimentSpec, bundle: PlanBundle, gateways: dict[str, Gateway], x: dict) -> None:
    """Load every session a policy may use (device and cloud side), at the real
    device speed, through the trace's first conditions; then one probe, so
    monitors start sane."""
    model = bundle.model_name
    errors: list[BaseException] = []

    def warm(policy: str, gw: Gateway) -> None:
        try:
            for pid in warm_partitions(bundle, policy, spec.nominal):
                for _ in range(3):
                    gw.infer(model, x, partition=pid)
            if policy in ("adaptive", "neurosurgeon"):
                gw.probe()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=warm, args=(p, g), daemon=True) for p, g in gateways.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"live engine warm-up failed: {errors[0]!r}") from errors[0]
