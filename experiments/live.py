"""The live engine: real edge Gateways -> ShapingProxy links -> a real Ray Serve tier, real time.

Every policy gets its own :class:`edge.Gateway` and its own
:class:`netsim.ShapingProxy` to the same cloud tier; one
:class:`netsim.ScheduleDriver` plays the spec's trace into all the proxies, and
the policies run side by side (one closed-loop thread each) for the trace's
duration. Static policies and the chain scan pass ``partition=``; the
``adaptive`` policy is the Gateway's own (monitors, decision table, hysteresis,
probes, hedging).

The emulated device (:class:`DeviceEmulator`): the planner measured each
partition's prefix on this machine and multiplied it by the spec's slowdown.
Just before the run the engine times every prefix again (interleaved, median
of many runs), and during the run it tracks how much slower the device runs
are than that calibration (this machine is shared and its load moves). It sets
the Gateway's ``device_slowdown`` per request to ``planned / (calibrated x
load)`` for the partition about to run, so the live device reproduces the
*planned* per-partition device times. (For ``adaptive`` the partition is
predicted from the Gateway's own policy state; a request whose partition
differs uses that prediction's factor — rare, and reported.)
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from edge import Gateway
from experiments._records import Record, energy_model, request_energy_mj
from experiments.analytic import warm_partitions
from experiments.policies import neurosurgeon_choice, static_partition
from experiments.spec import ExperimentSpec
from netsim import ScheduleDriver, ShapingProxy
from planner import Conditions, PlanBundle

__all__ = ["run_live", "calibrate_device", "DeviceEmulator"]

Progress = Callable[[float], None]


def model_inputs(bundle: PlanBundle, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for the bundle's model (dynamic dims = 1)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in bundle.inputs:
        shape = [d if isinstance(d, int) and d >= 0 else 1 for d in spec.shape]
        if spec.datatype.startswith("INT"):
            feeds[spec.name] = rng.integers(0, 10, size=shape).astype(np.int64)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def calibrate_device(bundle: PlanBundle, *, rounds: int = 40, threads: int = 1) -> dict[str, float]:
    """Median ms of each profiled prefix on this machine now (``device`` = the full model).

    Prefixes are timed round-robin (so all see the same machine load) with the
    planner's device thread count.
    """
    entries = bundle.profile["partitions"]  # type: ignore[index]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    feeds = model_inputs(bundle)
    sessions = {}
    for pid, p in bundle.partitions.items():
        if pid in entries and p.prefix_path is not None and float(entries[pid]["device_ms"]) > 0:
            sessions[pid] = ort.InferenceSession(str(p.prefix_path), opts, providers=["CPUExecutionProvider"])
    times: dict[str, list[float]] = {pid: [] for pid in sessions}
    for s in sessions.values():
        s.run(None, feeds)
    for _ in range(rounds):
        for pid, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[pid].append((time.perf_counter() - t0) * 1e3)
    return {pid: statistics.median(ts) for pid, ts in times.items()}


class DeviceEmulator:
    """Per-request ``device_slowdown`` so the emulated device runs each partition in its
    planned time, tracking this shared machine's load as the run goes.

    ``factor(p) = planned_ms(p) / (calibrated_ms(p) x load)``, where ``load`` is the
    median, over the last ``window`` device runs of all policies, of (real compute
    ms / calibrated ms). The real compute of a run is the Gateway's reported
    ``device_ms`` divided by the factor it ran with.
    """

    def __init__(self, bundle: PlanBundle, window: int = 25) -> None:
        self.planned = {pid: float(e["device_ms"]) for pid, e in bundle.profile["partitions"].items()}  # type: ignore[index]
        self.calibrated = calibrate_device(bundle)
        self.window = window
        self._ratios: list[float] = []
        self._lock = threading.Lock()

    def load(self) -> float:
        with self._lock:
            return statistics.median(self._ratios) if self._ratios else 1.0

    def factor(self, pid: str) -> float:
        if pid not in self.calibrated:
            return 1.0
        return max(1.0, self.planned[pid] / (self.calibrated[pid] * self.load()))

    def observe(self, pid: str, device_ms: float, factor: float) -> None:
        if pid not in self.calibrated or device_ms <= 0 or factor < 1.0:
            return
        with self._lock:
            self._ratios.append(device_ms / factor / self.calibrated[pid])
            del self._ratios[:-self.window]


class _Runner:
    """One policy's closed loop against its own Gateway and link."""

    def __init__(self, spec: ExperimentSpec, bundle: PlanBundle, policy: str, gw: Gateway,
                 device: DeviceEmulator, driver: ScheduleDriver, x: dict[str, np.ndarray]) -> None:
        self.spec, self.bundle, self.policy, self.gw = spec, bundle, policy, gw
        self.device, self.driver, self.x = device, driver, x
        self.model = bundle.model_name
        self.fixed = static_partition(policy, bundle, spec.nominal)
        self.records: list[Record] = []
        self.mispredicted = 0
        self.error: BaseException | None = None
        self._last_obs = time.monotonic()
        self._probing = threading.Event()
        self.em = energy_model(bundle)

    def _predict_adaptive(self) -> str:
        """The partition the Gateway's policy is about to pick (for the device factor only)."""
        c = self.gw.conditions()
        best = self.bundle.choose(c)
        current = self.gw._core.policy.current(self.model)  # read-only peek; see module docs
        if current and current != best and current in self.bundle.partitions:
            now = self.bundle.estimate(current, c).latency_ms
            if self.bundle.estimate(best, c).latency_ms > now * (1 - self.spec.hysteresis):
                best = current
        return best

    def _background_probe(self) -> None:
        def run() -> None:
            try:
                self.gw.probe()
            finally:
                self._last_obs = time.monotonic()
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
            stale = time.monotonic() - self._last_obs > self.spec.probe_interval_s
            if stale and not self._probing.is_set():
                self._background_probe()
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
            predicted = pid or self._predict_adaptive()
            factor = self.device.factor(predicted)
            self.gw.config.device_slowdown = factor
            t0 = time.perf_counter()
            result = self.gw.infer(self.model, self.x, partition=pid)
            latency = (time.perf_counter() - t0) * 1e3
            tr = result.trace
            if pid is None and tr.partition != predicted and not tr.fallback:
                self.mispredicted += 1
            elif not tr.fallback:
                self.device.observe(tr.partition, tr.device_ms, factor)
            if tr.bytes_sent:
                self._last_obs = time.monotonic()
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
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Record]:
    """Run the spec's policies side by side in real time through shaped links to ``cloud``.

    Args:
        spec: the experiment.
        bundle: the plan bundle (served by the tier at ``cloud``).
        cloud: ``host:port`` of a running cloud tier serving ``bundle``.
        progress: called with the trace seconds elapsed, about 4 times a second.
        log: called with notes (calibration, mispredictions).

    Raises:
        RuntimeError: a policy thread failed (the message names it).
    """
    say = log or (lambda msg: None)
    x = model_inputs(bundle, spec.seed)
    device = DeviceEmulator(bundle)
    say("device slowdown per partition at start (planned / now): "
        + ", ".join(f"{k} {device.factor(k):.0f}" for k in sorted(device.calibrated)))
    first = spec.trace.points[0].conditions()
    proxies: dict[str, ShapingProxy] = {}
    gateways: dict[str, Gateway] = {}
    old_switch = sys.getswitchinterval()
    # Short GIL slices: a device run's return must not wait 5 ms for the GIL
    # (that wait would be multiplied by the device slowdown).
    sys.setswitchinterval(0.0005)
    try:
        for i, policy in enumerate(spec.policies):
            proxies[policy] = ShapingProxy(cloud, first, seed=spec.seed + i).start()
            settings = {k: v for k, v in spec.gateway.items() if k != "hedge"}
            gateways[policy] = Gateway(
                [bundle], cloud=proxies[policy].address, intra_op_threads=1, battery_pct=100.0,
                device_slowdown=1.0, hedge=bool(spec.gateway.get("hedge", True)), **settings,
            )
        _warm_up(spec, bundle, gateways, x, device)
        driver = ScheduleDriver(spec.trace, proxies.values())
        runners = [_Runner(spec, bundle, p, gateways[p], device, driver, x) for p in spec.policies]
        threads = [threading.Thread(target=r.run, name=f"policy-{r.policy}", daemon=True) for r in runners]
        driver.start()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(0.25)
            if progress is not None:
                progress(min(driver.elapsed(), spec.trace.duration_s))
        driver.stop()
        say(f"machine load during the run: device compute {device.load():.2f}x its calibration (tracked)")
        for r in runners:
            if r.error is not None:
                raise RuntimeError(f"live engine: policy '{r.policy}' failed: {r.error!r}") from r.error
            if r.mispredicted:
                say(f"{r.policy}: {r.mispredicted} request(s) ran another partition than predicted "
                    "(device factor of the predicted one used)")
        return [rec for r in runners for rec in r.records]
    finally:
        sys.setswitchinterval(old_switch)
        for gw in gateways.values():
            gw.close()
        for proxy in proxies.values():
            proxy.stop()


def _warm_up(spec: ExperimentSpec, bundle: PlanBundle, gateways: dict[str, Gateway], x: dict,
             device: DeviceEmulator) -> None:
    """Load every session a policy may use (device and cloud side), at slowdown 1,
    through the trace's first conditions; then one probe, so monitors start sane.
    The second run of each partition seeds the device emulator's load estimate."""
    model = bundle.model_name
    errors: list[BaseException] = []

    def warm(policy: str, gw: Gateway) -> None:
        try:
            for pid in warm_partitions(bundle, policy, spec.nominal):
                for i in range(3):
                    tr = gw.infer(model, x, partition=pid).trace
                    if i and not tr.fallback:
                        device.observe(pid, tr.device_ms, 1.0)
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
