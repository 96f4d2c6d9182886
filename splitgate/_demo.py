"""``splitgate demo``: what splitgate is for, in about two minutes on one machine.

A zoo model (ResNet-18 at 224x224 by default) is planned for an emulated
Pi-class device (``device_factor`` times slower than this machine), its suffixes
are served by a local Ray Serve tier, and the edge Gateway reaches that tier
through a real shaped TCP link (:class:`splitgate.netsim.ShapingProxy`) that
steps through a :class:`splitgate.netsim.Trace` of phases, WiFi -> 4G -> 3G ->
outage -> WiFi (DADS's uplinks, :mod:`splitgate.netsim.profiles`), a few
requests each.
In each phase the same requests go to three Gateways: the adaptive one (the
policy picks the partition) and two forced baselines, device-only and
cloud-only -- the honest cloud-only: the best guarded cloud encoding for the
phase's link by the plan's estimate (``cloud``, ``cloud@fp16``, ``cloud@int8``;
:func:`splitgate.experiments.policies.cloud_only_choice`), named in the table.
At each phase switch the Gateways are told of the radio change
(:meth:`splitgate.edge.Gateway.network_changed`), as a phone's OS would.

Every output is checked against the full model run by onnxruntime: within
``rtol`` for partitions that send raw (or losslessly encoded) cut tensors, by
top-1 agreement for lossy-encoded ones (``cut-K@int8``, ``cloud@fp16``: the planner admitted
them through its accuracy guard, which judges top-1 agreement).

Public: :func:`run_demo` (the CLI command), :func:`run_link_demo` (the work,
returning a :class:`DemoReport`), :class:`DemoSettings`.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from splitgate.edge import Gateway, Result
    from splitgate.netsim import ShapingProxy, TracePoint
    from splitgate.planner import PlanBundle

__all__ = ["MODES", "DemoReport", "DemoSettings", "ModeStats", "PhaseResult", "run_demo", "run_link_demo"]

#: The three ways each request is run: the policy's pick, and the two forced baselines.
MODES = ("adaptive", "device-only", "cloud-only")
#: Output check for raw (and lossless) partitions.
RTOL, ATOL = 1e-4, 1e-5
#: Encodings whose outputs are judged by top-1 agreement instead of RTOL.
LOSSY = ("fp16", "int8", "int8c")
#: Wire encodings planned for the demo (raw, and the two lossy ones the guard may admit).
DEMO_ENCODINGS = ("raw", "fp16", "int8")


def _schedule() -> Any:
    """The link's phases as a :class:`splitgate.netsim.Trace` (DADS uplinks; see
    :mod:`splitgate.netsim.profiles`). The demo advances it by request count, not
    by time: each phase lasts ``requests`` requests per mode."""
    from splitgate.netsim.traces import steps

    return steps(
        [
            {"profile": "wifi", "duration_s": 1.0},
            {"profile": "4g", "duration_s": 1.0},
            {"profile": "3g", "duration_s": 1.0},
            {"profile": "3g", "duration_s": 1.0, "outage": True, "label": "outage"},
            {"profile": "wifi", "duration_s": 1.0},
        ],
        name="wifi-4g-3g-outage-wifi",
    )


@dataclass
class DemoSettings:
    """What the demo runs.

    Attributes:
        model: a zoo model (:data:`splitgate.planner.zoo.ZOO_MODELS`).
        requests: requests per phase, each run by all three modes.
        device_factor: the emulated device is this many times slower than this
            machine (the planner's ``device_slowdown``; the Gateways pad each
            device leg to the planned time, ``device_time_from_profile``).
        workdir: keep the model and bundle here (None: a temporary directory).
        deadline_ms: per-request budget of every Gateway.
        breaker_reset_s: how long a Gateway's open circuit breaker waits
            before letting a probe through (short, so the last WiFi phase is
            not spent waiting out an outage's breaker).
        settle_s: at most this long after a radio change, wait for the
            adaptive Gateway's probe of the new link before the phase's requests.
    """

    model: str = "resnet18_224"
    requests: int = 3
    device_factor: float = 30.0
    workdir: str | None = None
    deadline_ms: float = 5000.0
    breaker_reset_s: float = 1.0
    settle_s: float = 3.0


@dataclass
class ModeStats:
    """One mode's requests in one phase.

    Attributes:
        latencies_ms: each request's wall time.
        partitions: how often each partition ran (a ``breaker-open`` fallback
            counts as ``device``, where it ran).
        fallbacks: how often each fallback reason occurred.
        bytes_sent: cut or input bytes the cloud received.
        local: requests whose outputs were computed on the device (the
            ``device`` partition, or a fallback).
        matched: requests whose outputs matched the full model.
        lossy: requests judged by top-1 agreement (a lossy-encoded cut).
    """

    latencies_ms: list[float] = field(default_factory=list)
    partitions: Counter[str] = field(default_factory=Counter)
    fallbacks: Counter[str] = field(default_factory=Counter)
    bytes_sent: int = 0
    local: int = 0
    matched: int = 0
    lossy: int = 0

    @property
    def count(self) -> int:
        return len(self.latencies_ms)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.latencies_ms) if self.latencies_ms else float("nan")

    def ran(self) -> str:
        """``cut-11@int8 ×2, cloud ×1``: what ran, most used first."""
        return ", ".join(f"{pid} ×{n}" for pid, n in self.partitions.most_common())


@dataclass
class PhaseResult:
    """One phase of the schedule: its link and each mode's requests."""

    label: str
    uplink_mbps: float
    downlink_mbps: float
    rtt_ms: float
    outage: bool
    modes: dict[str, ModeStats] = field(default_factory=lambda: {m: ModeStats() for m in MODES})

    def link(self, short: bool = False) -> str:
        """``18.88 Mbps up / 50 down, RTT 10 ms`` (``short``: uplink and RTT only)."""
        if self.outage:
            return "outage: nothing passes"
        if short:
            return f"{self.uplink_mbps:g} Mbps, {self.rtt_ms:g} ms"
        return f"{self.uplink_mbps:g} Mbps up / {self.downlink_mbps:g} down, RTT {self.rtt_ms:g} ms"


@dataclass
class DemoReport:
    """What the demo ran and saw.

    Attributes:
        model: the zoo model.
        device_factor: the emulated device's slowdown.
        device_ms_here: the full model's planned time on this machine (one thread).
        phases: one result per phase of the schedule.
        stopped: each thing the demo started -> whether it is stopped.
        ray_gcs_address: the local Ray's GCS address (to check it is gone).
    """

    model: str
    device_factor: float
    device_ms_here: float = 0.0
    phases: list[PhaseResult] = field(default_factory=list)
    stopped: dict[str, bool] = field(default_factory=dict)
    ray_gcs_address: str | None = None

    @property
    def adaptive_partitions(self) -> list[str]:
        """Each phase's most-run partition of the adaptive Gateway."""
        return [p.modes["adaptive"].partitions.most_common(1)[0][0] for p in self.phases if p.modes["adaptive"].count]

    @property
    def all_match(self) -> bool:
        return all(s.matched == s.count for p in self.phases for s in p.modes.values())

    @property
    def ok(self) -> bool:
        """Outputs all match, the policy used more than one partition, everything stopped."""
        return self.all_match and len(set(self.adaptive_partitions)) > 1 and all(self.stopped.values())


# -- the CLI command -------------------------------------------------------------


def run_demo(
    model: str = "resnet18_224", requests: int = 3, workdir: str | None = None, device_factor: float = 30.0,
) -> int:
    """``splitgate demo``: run :func:`run_link_demo` and print what it showed.

    Returns:
        0 when every output matched and the policy chose more than one
        partition, 1 otherwise, 130 on Ctrl-C (after stopping everything).
    """
    console = Console()
    if not console.is_terminal:  # (a log file or a pipe: rich would wrap the tables at 80 columns)
        console = Console(width=140)
    settings = DemoSettings(model=model, requests=requests, workdir=workdir, device_factor=device_factor)
    started = time.perf_counter()
    try:
        report = run_link_demo(settings, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: everything the demo started is stopped")
        return 130
    elapsed = time.perf_counter() - started
    console.print(_conclusion(report, elapsed))
    return 0 if report.ok else 1


def run_link_demo(settings: DemoSettings, console: Console | None = None) -> DemoReport:
    """Plan, serve, and run the schedule's phases; stop everything started.

    Args:
        settings: model, requests per phase, device factor, ...
        console: where progress and tables go (None: a quiet console).

    Returns:
        the report (its ``stopped`` says what was stopped).

    Raises:
        splitgate.errors.InvalidArgument: an unknown zoo model or a bad setting.
    """
    from splitgate.errors import InvalidArgument

    console = console or Console(quiet=True)
    if settings.requests < 1:
        raise InvalidArgument(f"requests per phase must be at least 1, got {settings.requests}")
    if not settings.device_factor >= 1.0:
        raise InvalidArgument(f"device factor must be >= 1, got {settings.device_factor}")
    tmp = None if settings.workdir else tempfile.TemporaryDirectory(prefix="splitgate-demo-")
    root = Path(settings.workdir or tmp.name)  # type: ignore[union-attr]
    root.mkdir(parents=True, exist_ok=True)
    report = DemoReport(model=settings.model, device_factor=settings.device_factor)
    try:
        bundle = _prepare_bundle(settings, root, console)
        report.device_ms_here = _planned_device_ms(bundle) / settings.device_factor
        console.print(_device_note(report, bundle))
        console.print(_plan_table(bundle))
        _serve_and_run(settings, bundle, report, console)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return report


# -- set-up ------------------------------------------------------------------------


class _Step:
    """``with _Step(console, "starting X") as step: ...; step.done = "X ready"``: a
    spinner while it runs, then ``✓ X ready (4.2 s)``."""

    def __init__(self, console: Console, doing: str) -> None:
        self.console, self.doing, self.done = console, doing, doing
        self._status: Any = None
        self._t0 = 0.0

    def __enter__(self) -> Self:
        self._t0 = time.perf_counter()
        self._status = self.console.status(self.doing)
        self._status.__enter__()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._status.__exit__(exc_type, *exc)
        if exc_type is None:
            self.console.print(f"[green]✓[/] {self.done} ({time.perf_counter() - self._t0:.1f} s)")


def _prepare_bundle(settings: DemoSettings, root: Path, console: Console) -> PlanBundle:
    """Export the zoo model and plan it for the emulated device."""
    from splitgate._console import progress_callback
    from splitgate.planner import PlanOptions, build_bundle
    from splitgate.planner.zoo import export_zoo_model

    name = settings.model
    with _Step(console, f"exporting zoo model '{name}' to ONNX") as step:
        model_path = export_zoo_model(name, root / f"{name}.onnx", seed=0)
        step.done = f"exported {model_path}"
    t0 = time.perf_counter()
    options = PlanOptions(device_slowdown=settings.device_factor, encodings=DEMO_ENCODINGS, repeats=5)
    with progress_callback(console) as progress:
        bundle = build_bundle(model_path, root / f"{name}.bundle", progress=progress, options=options)
    console.print(
        f"[green]✓[/] planned for a device {settings.device_factor:g}x slower than this machine: "
        f"{len(bundle.partitions)} partitions ({time.perf_counter() - t0:.1f} s)"
    )
    return bundle


def _planned_device_ms(bundle: PlanBundle, pid: str = "device") -> float:
    from splitgate.planner import Conditions

    return bundle.estimate(pid, Conditions(uplink_mbps=10.0)).device_ms


def _device_note(report: DemoReport, bundle: PlanBundle) -> str:
    device_ms = _planned_device_ms(bundle)
    return (
        f"emulated device: {report.device_factor:g}x slower than one core of this machine, roughly the gap between "
        "a Raspberry Pi-class ARM core and a server core on float32 convolutions: the planner measured the full "
        f"model at {report.device_ms_here:,.0f} ms here, so it takes {device_ms:,.0f} ms on the device. The Gateways "
        "pad every device leg to its planned time, so the emulated device keeps that speed however busy this "
        "machine is; the cloud tier runs at this machine's own speed."
    )


def _conditions(point: TracePoint) -> Any:
    from splitgate.planner import Conditions

    return Conditions(uplink_mbps=point.uplink_mbps, downlink_mbps=point.downlink_mbps, rtt_ms=point.rtt_ms)


def _plan_table(bundle: PlanBundle) -> Table:
    """The planner's predicted latency of each partition on each phase's link."""
    points = [p for p in _schedule().points if not p.outage]
    seen: dict[str, Any] = {}
    for p in points:
        seen.setdefault(p.label, p)
    table = Table(title="the plan: predicted latency (ms) per partition on each link; * = the planner's pick")
    table.add_column("partition", no_wrap=True)
    table.add_column("sends", justify="right")
    for label in seen:
        table.add_column(label, justify="right")
    choices = {label: bundle.choose(_conditions(p)) for label, p in seen.items()}
    for pid, part in bundle.partitions.items():
        sent = "-" if part.kind == "device" else f"{_up_bytes(bundle, pid) / 1024:,.0f} KB"
        cells = []
        for label, p in seen.items():
            ms = bundle.estimate(pid, _conditions(p)).latency_ms
            cells.append(f"[bold green]{ms:,.0f}*[/]" if choices[label] == pid else f"{ms:,.0f}")
        table.add_row(pid, sent, *cells)
    return table


def _up_bytes(bundle: PlanBundle, pid: str) -> float:
    entry = (bundle.profile or {}).get("partitions", {}).get(pid, {})
    return float(entry.get("up_bytes", 0))


# -- running -----------------------------------------------------------------------


def _serve_and_run(settings: DemoSettings, bundle: PlanBundle, report: DemoReport, console: Console) -> None:
    """Start the tier, the shaped link and the Gateways; run the phases; stop all."""
    from splitgate.cloud import CloudConfig, start_local
    from splitgate.netsim import ShapingProxy

    schedule = _schedule()
    cloud = None
    proxy: ShapingProxy | None = None
    gateways: dict[str, Gateway] = {}
    try:
        with _Step(console, "starting a local Ray Serve cloud tier (gRPC ingress)") as step:
            cloud = start_local(CloudConfig(bundles=[str(bundle.root)], grpc_port=0))
            report.ray_gcs_address = _ray_gcs_address()
            step.done = f"cloud tier (Ray Serve) ready on {cloud.address}"
        proxy = ShapingProxy(cloud.address, schedule.points[0].conditions(), seed=0).start()
        console.print(f"[green]✓[/] shaped link {proxy.address} -> {cloud.address}")
        gateways = _start_gateways(settings, bundle, proxy.address)
        inputs, references = _requests(bundle, settings.requests)
        with _Step(console, "warming up: every partition once, at this machine's speed; a first link probe") as step:
            _warm_up(bundle, gateways, inputs[0])
            step.done = "warmed up; from now on device legs take the emulated device's planned time"
        for i, point in enumerate(schedule.points):
            report.phases.append(
                _run_phase(
                    i, len(schedule.points), point, bundle, gateways, proxy, inputs, references, console,
                    settings.settle_s,
                )
            )
        console.print(_summary_table(report))
        if legend := _fallback_legend(report):
            console.print(legend)
    finally:
        _stop_all(cloud, proxy, gateways, report, console)


def _ray_gcs_address() -> str | None:
    try:
        import ray

        return str(ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - only for the report's stop check
        return None


def _start_gateways(settings: DemoSettings, bundle: PlanBundle, link: str) -> dict[str, Gateway]:
    """The adaptive Gateway and the cloud-only baseline reach the tier through the
    shaped link; the device-only baseline has no cloud. Device legs run at this
    machine's speed until :func:`_warm_up` switches on the emulated device."""
    from splitgate.edge import Gateway

    common: dict[str, Any] = {
        "intra_op_threads": 1,
        "battery_pct": 100.0,
        "deadline_ms": settings.deadline_ms,
        "breaker_reset_s": settings.breaker_reset_s,
        "device_time_from_profile": False,
    }
    gateways: dict[str, Gateway] = {}
    try:
        gateways["adaptive"] = Gateway([bundle], cloud=link, **common)
        gateways["device-only"] = Gateway([bundle], **common)
        gateways["cloud-only"] = Gateway([bundle], cloud=link, **common)
    except BaseException:
        for gw in gateways.values():
            gw.close()
        raise
    return gateways


def _requests(bundle: PlanBundle, n: int) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """``n`` seeded inputs (the same in every phase) and the full model's outputs on them."""
    import onnxruntime as ort

    from splitgate.codec import numpy_dtype

    rng = np.random.default_rng(2024)
    inputs = []
    for _ in range(n):
        inputs.append({
            spec.name: rng.standard_normal([d if d >= 0 else 1 for d in spec.shape]).astype(numpy_dtype(spec.datatype))
            for spec in bundle.inputs
        })
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    references = [dict(zip(names, session.run(None, x))) for x in inputs]
    return inputs, references


def _forced(mode: str, cloud_only: str = "cloud") -> str | None:
    """The partition a mode forces (``cloud_only``: the phase's best guarded cloud encoding)."""
    return {"adaptive": None, "device-only": "device", "cloud-only": cloud_only}[mode]


def _cloud_only(bundle: PlanBundle, point: TracePoint) -> str:
    """The cloud-only baseline for a phase: the best guarded cloud encoding for its link
    (an outage is costed at its nominal link: the request falls back anyway)."""
    from splitgate.experiments.policies import cloud_only_choice
    from splitgate.planner import Conditions

    c = Conditions(uplink_mbps=max(point.uplink_mbps, 1e-3), downlink_mbps=max(point.downlink_mbps, 1e-3),
                   rtt_ms=point.rtt_ms)
    return cloud_only_choice(bundle, c)


def _warm_up(bundle: PlanBundle, gateways: dict[str, Gateway], x: dict[str, np.ndarray]) -> None:
    """Load every session a mode may use, on the device and in the tier, at this
    machine's speed; then switch on the emulated device and probe the link once."""
    model = bundle.model_name
    for pid in bundle.partitions:
        gateways["adaptive"].infer(model, x, partition=pid)
    gateways["device-only"].infer(model, x, partition="device")
    for pid, part in bundle.partitions.items():
        if part.kind == "cloud":  # every encoding a phase's cloud-only may pick
            for _ in range(2):
                gateways["cloud-only"].infer(model, x, partition=pid)
    for gw in gateways.values():
        gw.config.device_time_from_profile = True
    gateways["adaptive"].probe(reset=True)


def _run_phase(
    index: int, total: int, point: TracePoint, bundle: PlanBundle, gateways: dict[str, Gateway],
    proxy: ShapingProxy, inputs: list[dict], references: list[dict], console: Console, settle_s: float,
) -> PhaseResult:
    """Set the link, tell the Gateways, run each request in every mode."""
    phase = PhaseResult(point.label, point.uplink_mbps, point.downlink_mbps, point.rtt_ms, point.outage)
    console.rule(f"phase {index + 1}/{total}: {point.label} ({phase.link()})")
    proxy.set(point.conditions())
    if index > 0:
        waited, measured = _switch_network(gateways, point.outage, settle_s)
        console.print(f"  radio change reported to the Gateways; {_measured(gateways['adaptive'], waited, measured)}")
    model = bundle.model_name
    cloud_only = _cloud_only(bundle, point)
    for i, (x, want) in enumerate(zip(inputs, references)):
        line = []
        for mode in MODES:
            t0 = time.perf_counter()
            result = gateways[mode].infer(model, x, partition=_forced(mode, cloud_only))
            ms = (time.perf_counter() - t0) * 1e3
            _record(phase.modes[mode], bundle, result, want, ms)
            tr = result.trace
            line.append(f"{mode} {tr.partition}{f' ({tr.fallback} fallback)' if tr.fallback else ''} {ms:,.0f} ms")
        console.print(f"  {i + 1}/{len(inputs)}  " + " · ".join(line))
    return phase


def _measured(gateway: Gateway, waited_s: float, measured: bool) -> str:
    """What the adaptive Gateway made of the new link, for the progress output."""
    if not measured:
        return f"the adaptive one has not measured the new link after {waited_s:.1f} s"
    est = gateway.link.estimate()
    if est.uplink_mbps is None or est.rtt_ms is None:
        return f"the adaptive one measured the new link in {waited_s:.1f} s"
    return (
        f"the adaptive one measured it in {waited_s:.1f} s: "
        f"{est.uplink_mbps:.2f} Mbps up, RTT {est.rtt_ms:,.0f} ms"
    )


def _switch_network(gateways: dict[str, Gateway], outage: bool, settle_s: float) -> tuple[float, bool]:
    """Report the radio change to the Gateways that use the link, as a phone's OS
    would: first the adaptive one, waiting (at most ``settle_s``) until it has
    measured the new link (its bandwidth, or in an outage its probe's failure),
    then the cloud-only baseline.

    Returns:
        (seconds waited, whether the new link was measured in that time).

    The report is held while the adaptive Gateway's circuit breaker is open (at
    most ``breaker_reset_s``, after an outage): an open breaker admits no probe,
    so the report would measure nothing.
    """
    adaptive = gateways["adaptive"]
    start = time.monotonic()
    while adaptive.breaker_state == "open" and time.monotonic() - start < settle_s:
        time.sleep(0.05)
    adaptive.network_changed()
    told = time.monotonic()
    measured = False
    while not measured and time.monotonic() - start < settle_s:
        est = adaptive.link.estimate()
        measured = (est.age_s if outage else est.bandwidth_age_s) < time.monotonic() - told
        if not measured:
            time.sleep(0.05)
    waited = time.monotonic() - start
    # The forced cloud-only baseline hears of it too, after: its probe would share
    # this machine (and the tier) with the adaptive one's measurement.
    gateways["cloud-only"].network_changed()
    return waited, measured


def _record(stats: ModeStats, bundle: PlanBundle, result: Result, want: dict[str, np.ndarray], ms: float) -> None:
    tr = result.trace
    stats.latencies_ms.append(ms)
    stats.partitions[tr.partition] += 1
    if tr.fallback:
        stats.fallbacks[tr.fallback] += 1
    stats.local += tr.partition == "device" or bool(tr.fallback)
    stats.bytes_sent += tr.bytes_sent
    encoding = bundle.partition(tr.partition).wire_encoding
    # A fallback finishes on the device from the raw cut tensors: no encoding loss.
    lossy = encoding in LOSSY and not tr.fallback
    stats.lossy += lossy
    stats.matched += _matches(result.outputs, want, lossy)


def _matches(got: dict[str, np.ndarray], want: dict[str, np.ndarray], lossy: bool) -> bool:
    """Within RTOL of the full model, or (lossy encodings) the same top-1 class."""
    if lossy:
        return all(np.array_equal(np.argmax(got[k], axis=-1), np.argmax(v, axis=-1)) for k, v in want.items())
    return all(np.allclose(got[k], v, rtol=RTOL, atol=ATOL) for k, v in want.items())


def _stop_all(
    cloud: Any, proxy: ShapingProxy | None, gateways: dict[str, Gateway], report: DemoReport, console: Console,
) -> None:
    """Stop the Gateways, the link and the tier (Ray included); record each."""
    for name, gw in gateways.items():
        gw.close()
        report.stopped[f"gateway {name}"] = True
    if proxy is not None:
        proxy.stop()
        report.stopped["shaped link"] = True
    if cloud is not None:
        with _Step(console, "stopping the cloud tier and Ray") as step:
            cloud.stop()
            step.done = "cloud tier and Ray stopped"
        import ray

        report.stopped["cloud tier (Ray Serve + Ray)"] = not ray.is_initialized()


# -- reporting ---------------------------------------------------------------------


def _summary_table(report: DemoReport) -> Table:
    """One row per phase: the link, what the policy ran, the three modes' mean
    latency (the best in bold), fallbacks, bytes sent and the output check."""
    table = Table(
        title=f"{report.model} on a {report.device_factor:g}x-slower device: mean latency per request (ms), "
        f"{report.phases[0].modes['adaptive'].count if report.phases else 0} request(s) per mode and phase",
        caption="cloud-only = the best guarded cloud encoding for the phase's link (plan estimate)",
    )
    for col, justify in (
        ("phase", "left"), ("uplink, RTT", "left"), ("adaptive ran", "left"), ("adaptive", "right"),
        ("device-only", "right"), ("cloud-only", "right"), ("cloud-only ran", "left"), ("cloud-only fallbacks", "left"),
        ("KB sent adaptive / cloud-only", "right"), ("outputs match", "right"),
    ):
        table.add_column(col, justify=justify, no_wrap=col in ("phase", "uplink, RTT"))  # type: ignore[arg-type]
    for phase in report.phases:
        a, d, c = (phase.modes[m] for m in MODES)
        best = min(a.mean_ms, d.mean_ms, c.mean_ms)
        means = [f"[bold]{s.mean_ms:,.0f}[/]" if s.mean_ms == best else f"{s.mean_ms:,.0f}" for s in (a, d, c)]
        checked = sum(s.count for s in (a, d, c))
        matched = sum(s.matched for s in (a, d, c))
        lossy = sum(s.lossy for s in (a, d, c))
        ran = a.ran() + (f" (fallback {_fallbacks(a)})" if a.fallbacks else "")
        table.add_row(
            phase.label, phase.link(short=True), ran, *means, c.ran(), _fallbacks(c),
            f"{a.bytes_sent / 1024:,.0f} / {c.bytes_sent / 1024:,.0f}",
            f"{'[green]' if matched == checked else '[red]'}{matched}/{checked}[/]"
            + (f" ({lossy} by top-1)" if lossy else ""),
        )
    return table


#: What each fallback reason means, for the legend under the table.
FALLBACK_MEANING = {
    "hedged": "the cloud call was late, so the device ran the rest of the model and answered",
    "breaker-open": "the circuit breaker had opened after failed calls: the device ran it without trying the cloud",
    "deadline_exceeded": "the cloud call ran out of time: the device ran the rest",
    "unavailable": "the cloud was unreachable: the device ran the rest",
}


def _fallback_legend(report: DemoReport) -> str:
    """One line per fallback reason that occurred (none: empty)."""
    seen = sorted({why for p in report.phases for s in p.modes.values() for why in s.fallbacks})
    return "\n".join(f"fallback {why}: {FALLBACK_MEANING.get(why, 'the device finished the request')}" for why in seen)


def _fallbacks(stats: ModeStats) -> str:
    return ", ".join(f"{why} ×{n}" for why, n in stats.fallbacks.items()) or "-"


def _check_line(all_match: bool, outputs: int, lossy: int) -> str:
    """The output check, in one line."""
    if not all_match:
        return "[red]some outputs differ from the full model[/] (see the table's last column)"
    line = f"[green]all {outputs} outputs match the full model[/] within rtol {RTOL:g}"
    if lossy:
        line += (
            f"; the {lossy} that sent an int8/fp16-encoded cut or input by their top-1 class, which agrees "
            "(a lossy encoding "
            "cannot meet rtol; the planner's accuracy guard admitted it by top-1 agreement)"
        )
    return line


def _conclusion(report: DemoReport, elapsed_s: float) -> str:
    """The last lines: what the policy did, the totals, the checks, and the verdict."""
    picks = " -> ".join(f"{p.label}: {pid}" for p, pid in zip(report.phases, report.adaptive_partitions))
    totals = {m: sum(sum(p.modes[m].latencies_ms) for p in report.phases) / 1e3 for m in MODES}
    outputs = sum(s.count for p in report.phases for s in p.modes.values())
    lossy = sum(s.lossy for p in report.phases for s in p.modes.values())
    outage = next((p for p in report.phases if p.outage), None)
    cloud_fallbacks = sum(outage.modes["cloud-only"].fallbacks.values()) if outage else 0
    lines = [
        f"the policy followed the link: {picks}",
        (
            f"total latency over all phases: adaptive {totals['adaptive']:.1f} s, "
            f"device-only {totals['device-only']:.1f} s, cloud-only {totals['cloud-only']:.1f} s"
        ),
        f"in the outage cloud-only answered {cloud_fallbacks} request(s) by falling back to the device",
        _check_line(report.all_match, outputs, lossy),
    ]
    partitions = len(set(report.adaptive_partitions))
    stopped = "everything it started is stopped" if all(report.stopped.values()) else "[red]NOT everything stopped[/]"
    if report.ok:
        lines.append(
            f"[bold green]shown[/]: one Gateway ran {partitions} different partitions as the link changed, "
            f"each matching the full model; {stopped} ({elapsed_s:.0f} s)"
        )
    else:
        hint = "" if partitions > 1 else " (a model this small may need a larger --device-factor to split)"
        lines.append(
            f"[bold red]not shown[/]: the policy ran {partitions} partition(s) across the phases{hint}"
            f"{'' if report.all_match else ', outputs differ'}; {stopped} ({elapsed_s:.0f} s)"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - python -m splitgate._demo
    sys.exit(run_demo())
