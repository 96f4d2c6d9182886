"""The one inference API apps call.

Per request: validate the inputs, pick a partition for the measured network,
battery and cloud load, run the prefix on the device, send the cut tensors to
the cloud tier, and — on a deadline, an error or an open circuit breaker —
finish the suffix on the device from the same cut tensors. :class:`Gateway` and
its asyncio twin :class:`AsyncGateway` share one core.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from splitgate.edge._cache import ResultCache, input_digest
from splitgate.edge._cascade import CASCADE_PARTITION, cascade_first, cascade_rest
from splitgate.edge._client import DEFAULT_RETRY_AFTER_MS, CloudClient, CloudReply
from splitgate.edge._decide import (
    DEFAULT_UPLINK_MBPS,
    DEVICE_PROBE_RUNS,
    CloudCall,
    Costs,
    DecisionCore,
    ProbeSpec,
)
from splitgate.edge._device import DeviceCosts
from splitgate.edge._drift import DriftReport
from splitgate.edge._gateway_rollout import RolloutCore, _Staged
from splitgate.edge._metrics import GatewayMetrics
from splitgate.edge._monitor import BatteryMonitor, LinkMonitor
from splitgate.edge._rollout import RolloutMetrics, RolloutRule, version_of
from splitgate.edge._sessions import RunSite, SessionCache
from splitgate.edge._telemetry import RequestTelemetry
from splitgate.edge._updates import UpdateOutcome, Updater
from splitgate.edge.config import GatewayConfig
from splitgate.planner import Conditions, Partition, PlanBundle

from splitgate import contract
from splitgate.errors import (
    BundleError,
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    ModelRunError,
    NotFound,
    Overloaded,
    SplitgateError,
    is_peer_failure,
)
from splitgate.security import TlsConfig, TrustedKeys, raw_input_leaks, verify_bundle
from splitgate.validate import Limits, validate_inputs

__all__ = ["Gateway", "AsyncGateway", "Result", "Trace"]

PROBE_MODEL = contract.PROBE_MODEL
_log = logging.getLogger("splitgate.edge")


def _queue_depth(reply: CloudReply) -> int:
    """The cloud's queue depth a reply reports (0 when it reports none)."""
    return int(reply.params.get(contract.QUEUE_DEPTH, 0))


@dataclass
class Trace:
    """Where one request ran and what it cost.

    ``device_factor`` is the device's measured speed against the plan that the
    choice was made with (``Conditions.device_factor``: 3.0 = three times
    slower than profiled; 1.0 when online device costs are off).
    ``version`` is the model version that answered (the first 12 hex digits
    of its plan digest; a staged candidate's in a rollout, see
    :meth:`Gateway.stage_candidate`).
    ``energy_mj`` is the request's estimated device energy (the plan's power
    model applied to the measured legs, see :mod:`splitgate.edge._telemetry`)
    and ``battery_pct`` the battery level it was decided with.
    ``cascade`` says what the bundle's confident-on-device cascade did
    (:mod:`splitgate.edge._cascade`): ``"exit"`` (the small model answered;
    ``partition`` is ``"cascade"``), ``"partial"`` (it answered some rows of
    a batch, ``partition`` the others; its time is in ``device_ms``),
    ``"through"`` (it ran, was not confident, and ``partition`` answered; its
    time is in ``device_ms``) or None (no cascade, or it did not pay);
    ``cascade_rows_exited`` how many rows it answered (None when it did not run).
    """

    model: str
    partition: str
    device_ms: float = 0.0
    network_ms: float = 0.0
    cloud_ms: float = 0.0
    total_ms: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    fallback: str | None = None
    cached: bool = False
    device_factor: float = 1.0
    version: str = ""
    energy_mj: float | None = None
    battery_pct: float | None = None
    cascade: str | None = None
    cascade_rows_exited: int | None = None


@dataclass
class Result:
    """Outputs by name, and the trace of how they were computed."""

    outputs: dict[str, np.ndarray]
    trace: Trace = field(repr=False)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _corrupt_partitions(bundle: PlanBundle) -> dict[str, str]:
    """Partitions whose device-side files fail their sha256: id -> reason."""
    files = bundle.manifest.get("files", {})
    bad_files: dict[Path, str] = {}
    for rel, digest in files.items():
        path = bundle.root / rel
        if not path.is_file():
            bad_files[path.resolve()] = f"{rel} is missing"
        elif _sha256(path) != digest:
            bad_files[path.resolve()] = f"{rel} fails its sha256 check"
    bad: dict[str, str] = {}
    for p in bundle.partitions.values():
        # The device runs the prefix, and the suffix when it falls back.
        for path in (p.prefix_path, p.suffix_path):
            if path is not None and path.resolve() in bad_files:
                bad[p.id] = bad_files[path.resolve()]
    return bad


class _Core(RolloutCore):
    """Everything the sync and async gateways share; thread-safe."""

    def __init__(self, bundles: Iterable[str | Path | PlanBundle], config: GatewayConfig) -> None:
        self.config = config
        self.bundles: dict[str, PlanBundle] = {}
        self.refused: dict[str, dict[str, str]] = {}
        # (model, plan digest or None = every version) -> monotonic time until
        # which its cloud calls are not tried: the cloud refused that plan (a
        # digest it does not serve: a rollout's candidate must not push the stable
        # version off the cloud), the model, or took no work (admission). A
        # refusal is not an outage (the breaker, shared by every model, stays
        # closed), but asking again on every request would cost each a round trip.
        self._cloud_refused: dict[tuple[str, str | None], float] = {}
        self.previous: dict[str, tuple[PlanBundle, dict[str, str]]] = {}  # for rollback_bundle
        self._swap_lock = threading.Lock()
        self.trusted = TrustedKeys.from_paths(config.trust)  # empty: signatures not checked
        for b in bundles:
            self.add_bundle(b)
        self.client = CloudClient(
            config.cloud, timeout_s=config.deadline_ms / 1e3, tls=TlsConfig.from_dict(config.cloud_tls),
            token=config.cloud_token, insecure=config.cloud_insecure, discover=config.cloud_discover,
        ) if config.cloud else None
        self.limits = Limits(nan_policy=config.nan_policy)
        self.sessions = SessionCache(config.intra_op_threads)
        # Every decision (link and device estimates, probe triggers, hedge timing,
        # the choice) is the decision core's; this class does the I/O it asks for.
        self.decisions = DecisionCore(config, clock=time.monotonic)
        self.link = self.decisions.link
        self.calibration = self.decisions.calibration
        self.load = self.decisions.load
        self.policy = self.decisions.policy
        self.device = self.decisions.device  # the device's speed against the plans
        self.battery = BatteryMonitor(config.battery_pct)
        self.breaker = self.decisions.breaker  # (the decision core's: a network change half-opens it)
        self.cache = ResultCache(config.cache_size) if config.cache_size > 0 else None
        self.metrics = GatewayMetrics()
        self.telemetry = RequestTelemetry(  # energy, battery, version, drift, spans (docs/telemetry.md)
            self.metrics.registry, drift_threshold=config.drift_threshold, drift_window=config.drift_window,
            drift_min_requests=config.drift_min_requests, link=self.link, battery=self.battery,
            default_uplink_mbps=DEFAULT_UPLINK_MBPS,
        )
        self.infer = self.telemetry.traced(self.infer)  # type: ignore[method-assign]  # a span per request
        self.overrides: dict[str, str] = {}
        self.rollouts: dict[str, _Staged] = {}  # model -> its staged candidate (stage_candidate)
        self.rollout_ended: dict[str, dict[str, Any]] = {}  # model -> how its last rollout ended
        self.rollout_metrics = RolloutMetrics(self.metrics.registry)
        self._pool = ThreadPoolExecutor(max_workers=2 * config.max_concurrency + 1, thread_name_prefix="splitgate")
        self._probe_lock = threading.Lock()  # one probe holds the link at a time
        self._abandon = threading.Event()  # a network change made the running probe moot
        self._slowdown_lock = threading.Lock()
        self._request = threading.local()  # the running request's cost entries (for its local suffix)

    # -- bundles ------------------------------------------------------------

    def add_bundle(self, source: str | Path | PlanBundle) -> PlanBundle:
        """Load a bundle, refusing (only) the partitions whose files are corrupt.

        The signature is checked against ``config.trust`` outside the corrupt-file
        fallback: an unauthentic bundle is refused whole (BundleSignatureError).
        """
        if isinstance(source, PlanBundle):
            bundle = source
        else:
            try:
                bundle = PlanBundle.load(source)
            except BundleError:
                bundle = PlanBundle.load(source, verify=False)
        verify_bundle(bundle, self.trusted, allow_unsigned=self.config.allow_unsigned)
        refused = _corrupt_partitions(bundle)
        if "device" in refused:
            raise BundleError(
                f"bundle {bundle.root}: the full model {refused['device']}; cannot run '{bundle.model_name}'"
            )
        self.bundles[bundle.model_name] = bundle
        self.refused[bundle.model_name] = refused
        self._forget_costs(bundle.model_name)
        return bundle

    def update_bundle(self, source: str | Path, *, smoke: bool = True) -> PlanBundle:
        """Load a new version of a model's bundle next to the old one and switch
        atomically; the old one is kept for :meth:`rollback_bundle`.

        Unlike :meth:`add_bundle`, a new version must be whole (every sha256
        matches), authentic for ``config.trust`` and, with ``smoke``, run the
        full model once on its sample input.

        Raises:
            BundleSignatureError: unsigned (and not allowed), tampered or
                signed by an untrusted key; the old version keeps serving.
            BundleError: integrity or smoke failure; the old version keeps serving.
        """
        bundle = self._load_candidate(source, smoke=smoke)
        with self._swap_lock:
            old = self.bundles.get(bundle.model_name)
            if old is not None:
                self.previous[bundle.model_name] = (old, self.refused.get(bundle.model_name, {}))
                if old.root.resolve() == bundle.root.resolve():
                    self._evict_sessions(old)  # rebuilt in place: cached sessions are the old files
            self.refused[bundle.model_name] = {}
            self.bundles[bundle.model_name] = bundle  # one assignment: requests see old or new, whole
        self._forget_costs(bundle.model_name)
        return bundle

    def rollback_bundle(self, model: str) -> PlanBundle:
        """Switch ``model`` back to the version before the last :meth:`update_bundle`."""
        with self._swap_lock:
            if model not in self.previous:
                raise NotFound(f"model '{model}' has no previous bundle version to roll back to")
            bundle, refused = self.previous.pop(model)
            self.refused[model] = refused
            self.bundles[model] = bundle
        self._forget_costs(model)
        return bundle

    def _smoke(self, bundle: PlanBundle) -> None:
        feeds = bundle.sample_inputs()  # a valid request at the planned shape (zeros may not be)
        try:
            import onnxruntime as ort

            session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
            session.run(None, feeds)
        except Exception as exc:  # noqa: BLE001 - any failure refuses the new version
            raise BundleError(
                f"bundle {bundle.root}: smoke inference of '{bundle.model_name}' failed, keeping the "
                f"current version: {type(exc).__name__}: {exc}"
            ) from None

    def _evict_sessions(self, bundle: PlanBundle) -> None:
        cache = getattr(self, "sessions", None)
        if cache is None:
            return
        paths = {p for part in bundle.partitions.values() for p in (part.prefix_path, part.suffix_path) if p}
        with cache._lock:  # noqa: SLF001 - drop sessions of files replaced on disk
            for path in paths:
                cache._sessions.pop(path, None)  # noqa: SLF001

    def _forget_costs(self, model: str) -> None:
        """Drop a model's cached cost entries and learned device speed: its plan changed
        (a refit from a device profile keeps the plan digest but not the planned times)."""
        if hasattr(self, "decisions"):  # (not while constructing)
            self.decisions.forget(model)
            for key in [k for k in self._cloud_refused if k[0] == model]:
                self._cloud_refused.pop(key, None)

    def bundle(self, model: str) -> PlanBundle:
        try:
            return self.bundles[model]
        except KeyError:
            raise NotFound(f"model '{model}' is not loaded; loaded models: {sorted(self.bundles)}") from None

    # -- conditions and choice ---------------------------------------------

    def conditions(self, private: bool, model: str | None = None) -> Conditions:
        """The conditions now; ``device_factor`` is ``model``'s (default: the model
        of the last decision; 1.0 with ``learn_device`` off)."""
        return self.decisions.conditions(private, model, battery_pct=self.battery.level())

    def device_factor(self, model: str | None = None) -> float:
        """The learned device factor of ``model`` (default: the model of the last decision)."""
        return self.decisions.device_factor(model)

    def request_costs(self, bundle: PlanBundle, feeds: Mapping[str, np.ndarray]) -> Costs | None:
        """The plan's cost entries for these inputs' shapes (:meth:`DecisionCore.request_costs`)."""
        return self.decisions.request_costs(bundle, {name: np.shape(feeds[name]) for name in feeds})

    def _select(
        self, bundle: PlanBundle, requested: str | None, private: bool, costs: Costs | None = None,
    ) -> tuple[Partition, str | None]:
        model = bundle.model_name
        wanted = requested or self.overrides.get(model)
        if wanted is not None:
            self.decisions.last_model = model
            part = bundle.partition(wanted)
            if private and part.kind == "cloud":
                raise InvalidArgument(
                    f"model '{model}' is private: partition '{part.id}' would send its inputs off the device"
                )
        elif self.client is None:
            self.decisions.last_model = model
            part = self._offline(bundle)
        else:
            self._maybe_probe(bundle, private, costs)
            decision = self.decisions.choose(bundle, costs, private=private, battery_pct=self.battery.level())
            part = bundle.partition(decision.partition)
        refused = self.refused.get(model, {})
        if part.id in refused:
            return self._offline(bundle), "bundle-corrupt"
        if part.suffix_path is not None and self.client is None:
            raise InvalidArgument(
                f"model '{model}' partition '{part.id}' needs the cloud tier, but this Gateway has no cloud address"
            )
        if part.suffix_path is not None and not self.breaker.allow():
            return self._offline(bundle), "breaker-open"
        if part.suffix_path is not None and self._refused_until(model, bundle.plan_digest) > time.monotonic():
            return self._offline(bundle), "cloud-refused"
        return part, None

    def _offline(self, bundle: PlanBundle) -> Partition:
        """The device-only partition when the cloud cannot be used: the plan's
        ``offline_partition`` (its int8 model where the fp32 one misses the SLO or
        the memory limit), unless that one's files are corrupt."""
        pid = bundle.offline_partition()
        if pid in self.refused.get(bundle.model_name, {}):
            pid = "device"
        return bundle.partition(pid)

    # -- probing --------------------------------------------------------------

    def _maybe_probe(self, bundle: PlanBundle, private: bool, costs: Costs | None = None) -> None:
        """Run the probes the decision core asks for before this decision
        (:meth:`DecisionCore.probes_before`): synchronously on the request's
        path (``full`` before the first decision, ``rtt`` after a step for the
        worse), then a background one."""
        plan = self.decisions.probes_before(bundle, costs, private=private, battery_pct=self.battery.level())
        if plan.sync is not None:
            # (an "rtt" probe does not wait for a running probe: it would hold the lock for seconds)
            self.probe(reset=plan.reset, rtt_only=plan.sync == "rtt")
        if plan.background:
            self._probe_later(reset=plan.reset)

    def _probe_later(self, reset: bool) -> None:
        """Start a background probe, unless one is already queued or running."""
        if self.decisions.claim_background_probe():
            self._pool.submit(self._background_probe, reset)

    def _background_probe(self, reset: bool) -> None:
        try:
            self.probe(reset)
        finally:
            again = self.decisions.background_probe_finished()
        if again:  # a network change was reported meanwhile: measure the new network
            self._probe_later(reset=True)

    def network_changed(self) -> None:
        change = self.decisions.network_changed()
        if self.client is None:
            return
        if change.abandon_probe:
            # The running probe measures the old network: it stops after its
            # current round trip and records nothing; a fresh probe follows.
            self._abandon.set()
        if change.probe:
            self._probe_later(reset=True)

    def probe(self, reset: bool = False, rtt_only: bool = False) -> None:
        """Two RTT probes (ServerLive) and two bandwidth probes (a payload the
        server rejects as NOT_FOUND after receiving it), as the decision core's
        :class:`ProbeSpec` says, fed back to it. ``reset`` replaces the estimates
        instead of averaging into them (after a step in the link). A network
        change reported meanwhile (:meth:`network_changed`) abandons it after
        the round trip under way (a fresh one follows in the background).
        Skipped while the circuit breaker is open; in half-open it is a trial
        (a full probe's success closes the breaker, its failure re-opens it)."""
        if self.client is None or not self.decisions.probe_allowed():  # (an open breaker: not before its reset
            self.decisions.probe_unavailable()  # time or a network change; do not ask again on every request)
            return
        with self._probe_lock:
            spec = self.decisions.probe_started(rtt_only=rtt_only, reset=reset)
            self._abandon.clear()
            try:
                self._measure(spec)
            finally:
                self.decisions.probe_ended()

    def _measure(self, spec: ProbeSpec) -> None:
        assert self.client is not None
        leg_bytes, t0 = 0, time.perf_counter()
        try:
            # The first call on a fresh channel also pays for the TCP and
            # HTTP/2 handshakes; the monitor keeps the faster of each pair.
            rtts = []
            for _ in range(spec.round_trips):
                t0 = time.perf_counter()
                self.client.server_live(timeout_s=spec.rtt_timeout_s)
                rtts.append((time.perf_counter() - t0) * 1e3)
                if self._abandon.is_set():
                    return
            payload = {"probe": np.zeros(spec.send_bytes, dtype=np.uint8)}
            sends, leg_bytes = [], spec.send_bytes
            for _ in range(spec.sends):
                t0 = time.perf_counter()
                try:
                    self.client.infer(PROBE_MODEL, payload, timeout_s=spec.send_timeout_s)
                except NotFound:
                    pass
                sends.append((time.perf_counter() - t0) * 1e3)
                if self._abandon.is_set():
                    return
            self.decisions.probe_measured(spec, rtts, sends)
            if not spec.rtt_only:
                self.breaker.record_success()
        except SplitgateError:
            if self._abandon.is_set():
                return
            # A probe stuck until its timeout is a censored sample, as a
            # hedged call is: the link is at least this slow (a tunnel).
            self.decisions.probe_timed_out(spec, leg_bytes, (time.perf_counter() - t0) * 1e3)
            if not spec.rtt_only:  # (its short timeout says the link is slow, not that the cloud failed)
                self.breaker.record_failure()

    # -- running --------------------------------------------------------------

    def _device(
        self, path: Path, feeds: dict[str, np.ndarray], target_ms: float | None = None,
        site: RunSite | None = None,
    ) -> tuple[dict[str, np.ndarray], float]:
        t0 = time.perf_counter()
        out = self.sessions.run(path, feeds, site)
        elapsed = time.perf_counter() - t0
        slowdown = self.config.device_slowdown  # (read once: set_device_slowdown may change it)
        if target_ms is not None:
            time.sleep(max(target_ms * max(slowdown, 1.0) / 1e3 - elapsed, 0.0))
        elif slowdown > 1.0:
            time.sleep(elapsed * (slowdown - 1.0))
        return out, (time.perf_counter() - t0) * 1e3

    def set_device_slowdown(self, factor: float) -> None:
        """Emulation: make the device ``factor`` times slower than this machine from
        the next device leg on (``GatewayConfig.device_slowdown`` at run time)."""
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (
            math.isfinite(factor) and factor >= 1.0
        ):
            raise InvalidArgument(f"device slowdown must be a finite number >= 1, got {factor!r}")
        with self._slowdown_lock:
            self.config.device_slowdown = float(factor)

    def _planned_device_ms(self, bundle: PlanBundle, part_id: str, costs: Costs | None = None) -> float | None:
        """The plan's device time of a partition's prefix (for this request's
        shapes when ``costs`` are given), when emulating it."""
        if not (self.config.device_time_from_profile and bundle.has_profile):
            return None
        if costs is not None and part_id in costs:
            return float(costs[part_id]["device_ms"])
        return bundle.estimate(part_id, Conditions(uplink_mbps=DEFAULT_UPLINK_MBPS)).device_ms

    def _emulate_input_encoding(self, bundle: PlanBundle, part: Partition, costs: Costs | None) -> float:
        """A ``cloud@E`` twin runs no prefix, but its plan counts the encoding of the
        inputs as device time: when emulating the device, take that time here
        (as a split twin's emulated prefix does); returns the ms taken (0 when not emulating)."""
        target = self._planned_device_ms(bundle, part.id, costs)
        if not target:
            return 0.0
        ms = target * max(self.config.device_slowdown, 1.0)  # (as _device emulates a prefix)
        time.sleep(ms / 1e3)
        return ms

    def _local_suffix(
        self, bundle: PlanBundle, part: Partition, cut: dict[str, np.ndarray], costs: Costs | None = None,
    ):
        costs = costs if costs is not None else getattr(self._request, "costs", None)
        target = None
        if (full := self._planned_device_ms(bundle, "device", costs)) is not None:
            target = max(full - (self._planned_device_ms(bundle, part.id, costs) or 0.0), 0.0)
        site = RunSite.of(bundle.model_name, part, "suffix", "device")
        out, ms = self._device(part.suffix_path, cut, target, site)  # type: ignore[arg-type]
        # (learned even when a raced cloud reply answered first: it is the device's time all the same)
        self.decisions.local_suffix_done(bundle.model_name, part.id, ms, costs)
        return out, ms

    # -- learning the device's speed ----------------------------------------------

    def _probe_device_if_due(self, bundle: PlanBundle, feeds: dict, costs: Costs | None) -> None:
        """A request runs nothing on the device: run the device probe the decision
        core asks for (:meth:`DecisionCore.device_probe_due`), in the background
        while the request waits for the cloud (the device is idle then)."""
        pid = self.decisions.device_probe_due(bundle, costs, self.refused.get(bundle.model_name, {}))
        if pid is not None:
            self._pool.submit(self._device_probe, bundle, pid, feeds, costs)

    def _device_probe(self, bundle: PlanBundle, pid: str, feeds: dict, costs: Costs) -> None:
        """Run a partition's prefix on a request's inputs, as many times as the
        core says; it learns from the runs (see :class:`DeviceCosts`)."""
        runs: list[float] = []
        try:
            path = bundle.partitions[pid].prefix_path
            target = self._planned_device_ms(bundle, pid, costs)
            runs = [self._device(path, feeds, target)[1] for _ in range(DEVICE_PROBE_RUNS)]  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - a failed probe teaches nothing; no request waits on it
            runs = []
        finally:
            self.decisions.device_probe_done(bundle.model_name, pid, runs, costs)

    def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        partition: str | None = None,
        deadline_ms: float | None = None,
        private: bool | None = None,
        caller: str | None = None,
    ) -> Result:
        """Answer one request from the model's stable version, or as its staged
        rollout routes it (:meth:`_rollout_infer`)."""
        staged = self.rollouts.get(model)
        if staged is None:
            return self._infer_version(
                self.bundle(model), inputs, partition=partition, deadline_ms=deadline_ms, private=private,
            )
        return self._rollout_infer(
            staged, inputs, partition=partition, deadline_ms=deadline_ms, private=private, caller=caller,
        )

    def _load_candidate(self, source: str | Path, *, smoke: bool = True) -> PlanBundle:
        """A new version (for :meth:`update_bundle` and a rollout): every sha256 and
        the plan digest checked, the signature verified against ``config.trust``,
        and with ``smoke`` the full model run once on its sample input."""
        bundle = PlanBundle.load(source)
        verify_bundle(bundle, self.trusted, allow_unsigned=self.config.allow_unsigned)
        if smoke:
            self._smoke(bundle)
        return bundle

    def _infer_version(
        self,
        bundle: PlanBundle,
        inputs: Mapping[str, Any],
        *,
        partition: str | None = None,
        deadline_ms: float | None = None,
        private: bool | None = None,
    ) -> Result:
        """Run one version (``bundle``) of a model on one request."""
        start = time.perf_counter()
        budget_s = (deadline_ms if deadline_ms is not None else self.config.deadline_ms) / 1e3
        if budget_s <= 0:
            raise InvalidArgument(f"deadline_ms must be positive, got {deadline_ms}")
        deadline = start + budget_s
        model = bundle.model_name
        feeds = validate_inputs(inputs, bundle.inputs, where=f"model '{model}'", limits=self.limits)
        private = bool(private) or model in self.config.private_models
        key = None
        if self.cache is not None:
            key = (model, bundle.plan_digest, input_digest(feeds))
            hit = self.cache.get(key)
            if hit is not None:
                trace = Trace(model=model, partition="cache", cached=True, version=version_of(bundle.plan_digest))
                trace.total_ms = (time.perf_counter() - start) * 1e3
                self.metrics.record(trace)
                return Result(outputs=hit, trace=trace)
        costs = self.request_costs(bundle, feeds)
        part, fallback = self._select(bundle, partition, private, costs)
        trace = Trace(
            model=model, partition=part.id, fallback=fallback, device_factor=self.device_factor(model),
            version=version_of(bundle.plan_digest),
        )
        if part.prefix_path is None:
            self._probe_device_if_due(bundle, feeds, costs)  # (a probe runs while this request waits for the cloud)
        cascade = None
        if partition is None and model not in self.overrides:  # (a partition asked for runs as asked)
            cascade = cascade_first(self, bundle, part, feeds, trace, costs, private=private)
        try:
            if cascade is not None and cascade.outputs is not None:
                outputs, trace.partition, trace.device_ms = cascade.outputs, CASCADE_PARTITION, cascade.ms
            elif cascade is not None and cascade.partial is not None:  # the unsure rows take the path
                outputs = cascade_rest(self, bundle, part, cascade, trace, deadline, private=private)
            else:
                outputs = self._run(bundle, part, feeds, trace, deadline, private=private, costs=costs)
                trace.device_ms += cascade.ms if cascade is not None else 0.0
        except SplitgateError:
            self.metrics.record(trace, outcome="error")
            raise
        trace.total_ms = (time.perf_counter() - start) * 1e3
        self.metrics.record(trace)
        self.telemetry.request_done(bundle, feeds, outputs, trace, current=self.bundles.get(model) is bundle)
        if key is not None:
            self.cache.put(key, outputs)  # type: ignore[union-attr]
        return Result(outputs=outputs, trace=trace)

    def _run(
        self, bundle: PlanBundle, part: Partition, feeds: dict, trace: Trace, deadline: float,
        *, private: bool = False, costs: Costs | None = None,
    ) -> dict:
        self._request.costs = costs  # (for a local suffix started on this thread)
        model = bundle.model_name
        cut = feeds
        if part.prefix_path is not None:
            cut, trace.device_ms = self._device(
                part.prefix_path, feeds, self._planned_device_ms(bundle, part.id, costs),
                RunSite.of(model, part, "prefix", "device"),
            )
            self.decisions.device_leg(model, part.id, trace.device_ms, costs)
        elif part.encoding is not None:
            trace.device_ms = self._emulate_input_encoding(bundle, part, costs)
        if part.suffix_path is None:
            return cut
        if private and raw_input_leaks(feeds, cut):
            # The privacy floor, enforced on the bytes: a cut tensor that still
            # holds a raw input verbatim (e.g. after Reshape/Identity) stays here.
            trace.fallback = "privacy"
            outputs, ms = self._local_suffix(bundle, part, cut, costs)
            trace.device_ms += ms
            return outputs
        reply, local = self._cloud_leg(bundle, part, cut, trace, deadline, costs=costs)
        if reply is not None:
            trace.cloud_ms = reply.cloud_ms
            trace.network_ms = reply.network_ms
            trace.bytes_sent = reply.bytes_sent
            trace.bytes_received = reply.bytes_received
            return reply.outputs
        assert local is not None
        outputs, ms = local
        trace.device_ms += ms
        return outputs

    def _in_time(self, call: CloudCall, reply: CloudReply) -> CloudReply:
        """A reply before the device beat it: the breaker and the decision core learn from it."""
        self.breaker.record_success()
        self.decisions.reply_in_time(
            call, reply.bytes_sent, reply.bytes_received, reply.network_ms, reply.cloud_ms, _queue_depth(reply),
        )
        return reply

    def _late(self, reply: CloudReply) -> None:
        """A hedged call's reply, after the device answered the request."""
        self.breaker.record_success()
        self.decisions.late_reply(
            reply.bytes_sent, reply.bytes_received, reply.network_ms, reply.cloud_ms, _queue_depth(reply),
        )

    def _refused_until(self, model: str, digest: str) -> float:
        """Until when the cloud is not asked for this version of ``model`` (0: ask)."""
        return max(self._cloud_refused.get((model, None), 0.0), self._cloud_refused.get((model, digest), 0.0))

    def _failed(self, call: CloudCall, exc: BaseException, digest: str | None = None) -> None:
        """The call failed: the breaker counts a peer failure (a refusal proves the cloud healthy).
        ``digest``: the plan the call named (a refused plan is backed off alone)."""
        if is_peer_failure(exc):
            self.breaker.record_failure(sent_at=call.sent_at)  # (not counted if sent before a network change)
        else:
            # The cloud answered: it is healthy, this request (or plan) was
            # refused. (Recording nothing would leave a half-open probe hanging.)
            self.breaker.record_success()
            if isinstance(exc, FailedPrecondition):  # this plan version: back off it alone
                self._cloud_refused[(call.model, digest)] = time.monotonic() + self.config.breaker_reset_s
            elif isinstance(exc, NotFound):  # this model's name: back off every version of it
                self._cloud_refused[(call.model, None)] = time.monotonic() + self.config.breaker_reset_s
            elif isinstance(exc, Overloaded):
                # Admission control refused it (queue full, or it would miss its
                # deadline): the whole tier is busy, so no model sends it new work
                # for the hinted time (those requests finish here, "cloud-refused").
                until = time.monotonic() + (exc.retry_after_ms or DEFAULT_RETRY_AFTER_MS) / 1e3
                for model in list(self.bundles):
                    self._cloud_refused[(model, None)] = max(self._cloud_refused.get((model, None), 0.0), until)
        self.decisions.call_failed(call)

    def _cloud_leg(
        self, bundle: PlanBundle, part: Partition, cut: dict, trace: Trace, deadline: float,
        costs: Costs | None = None,
    ):
        """Return (reply, None) from the cloud or (None, (outputs, ms)) from the device;
        ``costs``: the request's cost entries (its real cut bytes, for the hedge timer)."""
        assert self.client is not None
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            trace.fallback = "deadline"
            return None, self._local_suffix(bundle, part, cut, costs)
        future = self._pool.submit(
            self.client.infer, bundle.model_name, cut,
            partition=part.id, plan_digest=bundle.plan_digest, timeout_s=remaining,
            encoding=getattr(part, "encoding", None) or self.config.encoding,
            trace_context=self.telemetry.cloud_context(),
        )
        call = self.decisions.cloud_call(bundle, part.id, costs, remaining)
        try:
            return self._in_time(call, future.result(timeout=call.hedge_after_s)), None
        except FutureTimeout:
            pass
        except SplitgateError as exc:
            self._failed(call, exc, bundle.plan_digest)
            if isinstance(exc, ModelRunError):
                raise exc from None  # the local suffix would fail the same way
            trace.fallback = "cloud-overloaded" if isinstance(exc, Overloaded) else exc.code.name.lower()
            return None, self._local_suffix(bundle, part, cut)
        # The cloud is late and the deadline near: race it against the device.
        local = self._pool.submit(self._local_suffix, bundle, part, cut, costs)
        done, _ = wait([future, local], return_when=FIRST_COMPLETED)
        if future in done and future.exception() is None:
            local.cancel()
            return self._in_time(call, future.result()), None
        trace.fallback = "hedged"
        exc = future.exception() if future.done() else None
        if exc is not None:
            self._failed(call, exc, bundle.plan_digest)
            trace.fallback = (
                "cloud-overloaded" if isinstance(exc, Overloaded)
                else exc.code.name.lower() if isinstance(exc, SplitgateError) else "error"
            )
        else:
            # The cloud stayed slower than the device: the core learns the link
            # is at least that slow; the call finishes in the background and
            # teaches the monitors.
            self.decisions.call_late(call, part.cut_bytes)
            future.add_done_callback(lambda done, sent_at=call.sent_at: self._late_done(done, sent_at))
        return None, local.result()

    def _late_done(self, future: Future, sent_at: float | None = None) -> None:
        """A hedged call (sent at ``sent_at``, the decision core's clock) finished in the
        background: its reply teaches the monitors; its failure still tells the breaker
        (a half-open breaker whose trial call was hedged would otherwise wait for an
        outcome forever), unless it was sent before a network change."""
        exc = future.exception()
        if exc is None:
            self._late(future.result())
        elif is_peer_failure(exc):
            self.breaker.record_failure(sent_at=sent_at)
        else:
            self.breaker.record_success()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.client is not None:
            self.client.close()


class Gateway:
    """Run models from plan bundles across the device and a cloud tier.

    Parameters:
        bundles: plan bundle directories (or loaded :class:`PlanBundle` objects).
        cloud: ``host:port`` of the cloud tier (None = device only); overrides ``config.cloud``.
        config: a :class:`GatewayConfig`; keyword settings override its fields.

    Thread-safe; at most ``config.max_concurrency`` requests run at once.
    """

    def __init__(
        self,
        bundles: Iterable[str | Path | PlanBundle],
        cloud: str | None = None,
        *,
        config: GatewayConfig | None = None,
        **settings: Any,
    ) -> None:
        config = config or GatewayConfig()
        for name, value in settings.items():
            if not hasattr(config, name):
                raise TypeError(f"unknown Gateway setting {name!r}")
            setattr(config, name, value)
        if cloud is not None:
            config.cloud = cloud
        self._core = _Core(bundles, config)
        self._slots = threading.BoundedSemaphore(config.max_concurrency)
        self._updates: Updater | None = None
        self._updates_lock = threading.Lock()
        if config.update_source:
            try:
                self._updater().start()  # over-the-air updates: a check now, then every update_interval_s
            except BaseException:
                self._core.close()
                raise

    # -- the API ----------------------------------------------------------------

    def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        partition: str | None = None,
        deadline_ms: float | None = None,
        private: bool | None = None,
        caller: str | None = None,
    ) -> Result:
        """Run ``model`` on ``inputs``; return outputs and a Trace.

        Parameters:
            model: a loaded model name.
            inputs: input name -> array.
            partition: force a partition ("device", "cloud", "cut-K"); None = policy.
            deadline_ms: budget for this request (default ``config.deadline_ms``).
            private: keep raw inputs on the device for this request.
            caller: the caller's key (a user or device id): while a candidate
                version is staged (:meth:`stage_candidate`), each caller sees
                one version for the whole rollout; None = a per-request draw.

        Raises:
            NotFound: unknown model or partition.
            InvalidArgument: inputs with wrong names, dtypes or shapes; a
                cloud-only partition for a private request.
        """
        if caller is not None and not isinstance(caller, str):
            raise InvalidArgument(f"caller must be a string, got {type(caller).__name__}")
        with self._slots:
            return self._core.infer(
                model, inputs, partition=partition, deadline_ms=deadline_ms, private=private, caller=caller,
            )

    @property
    def models(self) -> list[str]:
        return sorted(self._core.bundles)

    def bundle(self, model: str) -> PlanBundle:
        return self._core.bundle(model)

    def add_bundle(self, source: str | Path | PlanBundle) -> PlanBundle:
        """Load (or replace) a model's bundle at run time.

        Raises:
            BundleSignatureError: with ``config.trust``, an unsigned (unless
                ``allow_unsigned``), tampered or foreign-signed bundle.
            BundleError: a missing or malformed bundle, or a corrupt full model.
        """
        return self._core.add_bundle(source)

    def update_bundle(self, source: str | Path, *, smoke: bool = True) -> PlanBundle:
        """Switch a model to a new bundle version atomically (verified and
        smoke-tested first; on failure BundleError and the old version stays)."""
        return self._core.update_bundle(source, smoke=smoke)

    def rollback_bundle(self, model: str) -> PlanBundle:
        """Switch a model back to the version before the last :meth:`update_bundle`
        (an over-the-air update source then declines that version, across restarts)."""
        bundle = self._core.rollback_bundle(model)
        with self._updates_lock:
            updates = self._updates
        if updates is not None:
            updates.note_rollback()
        return bundle

    def stage_candidate(
        self, model: str, source: str | Path, *, share: float = 0.1, shadow: bool = False,
        rule: RolloutRule | None = None,
    ) -> dict[str, Any]:
        """Stage a candidate version of a loaded model next to its stable one
        (docs/rollout.md).

        The candidate bundle is loaded as :meth:`update_bundle` loads a new
        version (every sha256, the signature for ``config.trust``, a smoke run)
        and must have the stable version's inputs and outputs. In A/B mode a
        ``share`` of callers (sticky per ``infer(..., caller=)``) get it; a
        failure of the candidate counts against it and the stable version
        answers. With ``shadow=True`` the stable version answers every request
        and the candidate runs the same inputs off the request's path, only
        compared. ``rule`` (:class:`RolloutRule`) promotes or rolls it back
        automatically.

        Returns:
            :meth:`rollout_status`.

        Raises:
            NotFound: ``model`` is not loaded.
            BundleError: the candidate fails its integrity, signature or smoke check.
            InvalidArgument: another model, other inputs/outputs, the same plan
                digest or directory as the stable version, a bad share or rule.
            FailedPrecondition: a candidate is already staged for ``model``.
        """
        return self._core.stage_candidate(model, source, share=share, shadow=shadow, rule=rule)

    def promote(self, model: str) -> PlanBundle:
        """Make the staged candidate ``model``'s stable version now (the old one is
        kept for :meth:`rollback_bundle`). Raises NotFound without a candidate."""
        return self._core.promote(model)

    def abort_candidate(self, model: str) -> PlanBundle:
        """Roll the staged candidate back: drop it, the stable version answers
        every request. Returns the stable version. Raises NotFound without a candidate."""
        return self._core.abort_candidate(model)

    def rollout_status(self, model: str) -> dict[str, Any]:
        """Plain data about ``model``'s rollout: ``state`` ("none", "staged",
        "promoted", "rolled_back", "aborted"), ``mode``, ``share``, ``rule``,
        ``stable`` and ``candidate`` statistics (version, requests, errors,
        fallbacks, p95_ms, compared, agreed, error_rate, agreement) and
        ``reason`` (why it ended). Raises NotFound for an unknown model."""
        return self._core.rollout_status(model)

    def refused_partitions(self, model: str) -> dict[str, str]:
        """Partitions refused at load (corrupt or missing files): id -> reason."""
        return dict(self._core.refused.get(model, {}))

    def check_updates(self) -> list[UpdateOutcome]:
        """Check ``config.update_source`` for new versions of the loaded models now
        and install them (download resumably, verify, smoke-run, swap; see
        docs/updates.md). A failed download or refused bundle leaves the running
        version serving; it is an outcome here, a log line, a count in
        ``splitgate_updates_total{model,outcome}`` and a call to each
        :meth:`on_update` listener.

        Returns:
            One :class:`~splitgate.edge.UpdateOutcome` per loaded model the index
            lists (one with model "" when the index cannot be read).

        Raises:
            ConfigError: no ``update_source`` is configured, or it is not a
                directory or http(s):// URL.
        """
        return self._updater().check()

    def on_update(self, callback: Callable[[UpdateOutcome], Any]) -> None:
        """Call ``callback(outcome)`` after every model's update check from now on
        (from the poller's thread or :meth:`check_updates`' caller).

        Raises:
            ConfigError: no ``update_source`` is configured.
        """
        self._updater().add_listener(callback)

    def _updater(self) -> Updater:
        with self._updates_lock:
            return self._updates or self._new_updater()

    def _new_updater(self) -> Updater:
        """The Updater of ``config.update_source`` (raises ConfigError without one)."""
        core, config = self._core, self._core.config
        if not config.update_source:
            raise ConfigError("no update source: set GatewayConfig.update_source (a directory or http(s):// URL)")
        self._updates = Updater(
            self, config.update_source, update_dir=config.update_dir, interval_s=config.update_interval_s,
            registry=core.metrics.registry, evict=core._evict_sessions,  # noqa: SLF001 - same package
            previous_root=lambda model: core.previous[model][0].root if model in core.previous else None,
            trusted=core.trusted, allow_unsigned=config.allow_unsigned,  # the index is checked with the bundles' keys
        )
        return self._updates

    def override(self, model: str, partition: str | None) -> None:
        """Pin ``model`` to a partition for experiments (None = back to the policy)."""
        if partition is None:
            self._core.overrides.pop(model, None)
        else:
            self._core.bundle(model).partition(partition)
            self._core.overrides[model] = partition

    def set_battery(self, level_pct: float | None) -> None:
        """Tell the Gateway the battery level (None = read it from the OS)."""
        self._core.battery.set(level_pct)

    def network_changed(self) -> None:
        """Tell the Gateway the device's network changed: the OS reported a
        radio handover (3G -> LTE) or a WiFi join or leave (Android's
        ``ConnectivityManager.NetworkCallback``, iOS ``NWPathMonitor``).

        The link estimates are then stale in an unknown direction. A background
        probe replaces them now; a probe already under way (it measures the old
        link) stops after its current round trip, records nothing, and the
        fresh one follows. Without the report, a device-only stretch would miss
        a better link for up to ``probe_interval_s``. An open circuit breaker
        (the old network's failures) half-opens at once: the fresh probe closes
        it on success, so requests offload again without waiting out
        ``breaker_reset_s``; failures on the new network re-open it. Returns at once.
        """
        self._core.network_changed()

    def conditions(self, private: bool = False, model: str | None = None) -> Conditions:
        """The conditions the policy sees now (link estimate, battery, cloud load,
        and ``device_factor``: the device's measured speed against ``model``'s
        plan, by default the model of the last request; 1.0 before any device
        work, or with ``learn_device`` off).

        Raises:
            NotFound: ``model`` is not loaded.
        """
        if model is not None:
            self._core.bundle(model)
        return self._core.conditions(private, model)

    def set_device_slowdown(self, factor: float) -> None:
        """Emulation (benchmarks, tests): make the device ``factor`` times slower
        than this machine from the next device leg on, e.g. to emulate thermal
        throttling mid-run. It sets ``config.device_slowdown`` (device compute is
        stretched ``factor`` times; with ``device_time_from_profile`` the padded
        planned time is). Thread-safe; requests running a device leg finish it
        at the old speed.

        Raises:
            InvalidArgument: ``factor`` is not a finite number >= 1.
        """
        self._core.set_device_slowdown(factor)

    @property
    def device_costs(self) -> DeviceCosts:
        """What the Gateway learned of the device's speed (read its ``factor(model)``
        and ``snapshot(model)``)."""
        return self._core.device

    def probe(self, reset: bool = False) -> None:
        """Measure the link now (RTT and uplink bandwidth); ``reset`` replaces
        the estimates instead of averaging into them."""
        self._core.probe(reset)

    def current_partition(self, model: str) -> str | None:
        """The partition the policy last chose for ``model`` (None before the first request)."""
        return self._core.policy.current(model)

    @property
    def link(self) -> LinkMonitor:
        """The link monitor (read its ``estimate()``; experiments may feed it)."""
        return self._core.link

    @property
    def breaker_state(self) -> str:
        return self._core.breaker.state

    def drift(self, model: str) -> DriftReport | None:
        """How far ``model``'s recent requests have drifted from its plan's reference
        statistics (:mod:`splitgate.edge._drift`; the score is a population stability
        index, ``None`` until the window holds ``config.drift_min_requests``).

        Returns:
            The report, or None when the serving bundle has no reference (planned
            without real calibration inputs, or an older bundle).

        Raises:
            NotFound: ``model`` is not loaded.
        """
        return self._core.telemetry.drift.report(self._core.bundle(model))

    def on_drift(self, callback: Callable[[DriftReport], None]) -> None:
        """Call ``callback(report)`` when a model's drift score crosses
        ``config.drift_threshold`` (again only after it fell below 0.8 x the threshold).
        It runs on the Gateway's drift worker thread (or in :meth:`drift`): keep it short."""
        self._core.telemetry.drift.on_drift(callback)

    @property
    def metrics(self) -> GatewayMetrics:
        return self._core.metrics

    @property
    def config(self) -> GatewayConfig:
        return self._core.config

    def close(self) -> None:
        if self._updates is not None:
            self._updates.stop()
        self._core.close()

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGateway(Gateway):
    """The asyncio twin of :class:`Gateway`: ``await gateway.infer(...)``.

    Shares the same core (sessions, monitors, policy, breaker); each request
    runs in a worker thread so the event loop never blocks on onnxruntime or gRPC.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._async_slots: asyncio.Semaphore | None = None

    async def infer(  # type: ignore[override]
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        partition: str | None = None,
        deadline_ms: float | None = None,
        private: bool | None = None,
        caller: str | None = None,
    ) -> Result:
        if caller is not None and not isinstance(caller, str):
            raise InvalidArgument(f"caller must be a string, got {type(caller).__name__}")
        if self._async_slots is None:
            self._async_slots = asyncio.Semaphore(self._core.config.max_concurrency)
        async with self._async_slots:
            return await asyncio.to_thread(
                self._core.infer, model, inputs, partition=partition, deadline_ms=deadline_ms, private=private,
                caller=caller,
            )

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> AsyncGateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
