"""The experiment spec: one YAML file both engines read.

Example (``experiments/specs/commute.yaml``)::

    name: commute
    model: mobilenet            # a planner.zoo name, or a path to an .onnx file
    device:
      slowdown: 600             # the device is this many times slower than this machine
    plan: {reference_cuts: 6, repeats: 20}   # planner.PlanOptions overrides
    trace:
      kind: steps               # constant | steps | random_walk | file
      segments:
        - {profile: wifi, duration_s: 10}
        - {profile: 3g, duration_s: 10}
      outages: [[12, 2]]        # optional: [start_s, duration_s] black-hole outages
    nominal: {profile: 4g}      # DADS static plan's conditions (profile, or uplink_mbps/rtt_ms)
    policies: [device, cloud, neurosurgeon, dads, adaptive]
    interval_ms: 500            # requests start on this grid (a slot missed while busy is skipped)
    think_ms: 0                 # minimum pause after a request
    gateway: {hysteresis: 0.1, deadline_ms: 3000, probe_interval_s: 2}
    network_hints: true         # the OS tells the adaptive Gateway when the radio changes
    analytic: {repeats: 20}     # the analytic engine replays the trace this many times
    live: {repeats: 1}          # ... and the live engine (in real time)
    seed: 0

Relative paths (``model``, ``trace.path``) are resolved against the spec's
directory, then :data:`splitgate.netsim.traces.SAMPLES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from splitgate.netsim import profile as net_profile
from splitgate.netsim import traces
from splitgate.netsim.traces import Trace
from splitgate.planner import Conditions

__all__ = ["ExperimentSpec", "load_spec", "build_trace"]


def _gw_default(name: str) -> Any:
    """A :class:`splitgate.edge.GatewayConfig` default, so the analytic engine models the
    policy a live Gateway runs (imported lazily: ``edge`` loads onnxruntime)."""
    from splitgate.edge.config import GatewayConfig

    return getattr(GatewayConfig, name)


_KNOWN = {"name", "model", "device", "plan", "trace", "nominal", "policies", "think_ms", "interval_ms", "gateway",
          "network_hints", "analytic", "live", "seed", "report", "description"}


def build_trace(cfg: dict[str, Any], base: Path | None = None) -> Trace:
    """A :class:`Trace` from a spec's ``trace`` mapping (see module docs)."""
    cfg = dict(cfg)
    kind = cfg.pop("kind", "constant")
    outages = cfg.pop("outages", None)
    max_s = cfg.pop("max_s", None)
    time_scale = cfg.pop("time_scale", None)
    if kind == "constant":
        prof = cfg.pop("profile")
        dur = float(cfg.pop("duration_s"))
        trace = traces.constant(prof, dur, **cfg)
    elif kind == "steps":
        trace = traces.steps(cfg["segments"], name=cfg.get("name", "steps"))
    elif kind == "random_walk":
        prof = cfg.pop("profile")
        dur = float(cfg.pop("duration_s"))
        trace = traces.random_walk(prof, dur, **cfg)
    elif kind == "file":
        path = Path(cfg.pop("path"))
        if not path.is_absolute() and base is not None and (base / path).exists():
            path = base / path
        fmt = cfg.pop("format", "auto")
        trace = traces.load(path, fmt, **cfg)
    else:
        raise ValueError(f"unknown trace kind {kind!r} (constant, steps, random_walk, file)")
    if time_scale:
        trace = trace.scaled(float(time_scale))
    if max_s:
        trace = trace.clipped(float(max_s))
    if outages:
        trace = traces.with_outages(trace, [tuple(o) for o in outages])
    return trace


@dataclass
class ExperimentSpec:
    """A parsed experiment spec (see module docs for the YAML form).

    Attributes:
        name: names output files.
        model: zoo model name or ONNX path.
        trace: the network conditions over time.
        device_slowdown: the emulated device is this many times slower than this
            machine (planner ``device_slowdown`` and the Gateway's).
        device_profile: a per-node device profile JSON for the planner (optional).
        plan: extra :class:`splitgate.planner.PlanOptions` fields.
        nominal: conditions the DADS-style static plan is made for.
        policies: which policies to compare.
        interval_ms: requests start at multiples of this (all policies on the same
            grid, so they sample the same conditions); a request still running at a
            slot makes its policy skip to the next free slot.
        think_ms: minimum pause after a request.
        gateway: :class:`splitgate.edge.GatewayConfig` fields (hysteresis, deadline_ms, probe_interval_s, ...).
        network_hints: at each change of the trace's radio (WiFi, LTE, 3G:
            :meth:`splitgate.netsim.traces.Trace.radio_changes`) the adaptive policy's
            Gateway is told, as a phone's OS tells apps
            (:meth:`splitgate.edge.Gateway.network_changed`). Bandwidth swings within one
            radio, outages included, are never announced.
        analytic_repeats: trace replays of the analytic engine.
        live_repeats: real-time replays of the live engine (``live: {repeats: N}``,
            default 1): a live run has tens of requests per policy, so on a
            volatile trace a few unlucky ones move its mean by several percent.
        seed: jitter/loss seed.
        report: ``"dads"`` adds the DADS reproduction table (per trace label).
        source: the YAML file, if any.
    """

    name: str
    model: str
    trace: Trace
    device_slowdown: float = 1.0
    device_profile: str | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    nominal: Conditions = field(default_factory=lambda: Conditions(uplink_mbps=5.85, rtt_ms=60.0))
    policies: list[str] = field(default_factory=lambda: ["device", "cloud", "neurosurgeon", "dads", "adaptive"])
    interval_ms: float = 500.0
    think_ms: float = 0.0
    gateway: dict[str, Any] = field(default_factory=dict)
    network_hints: bool = True
    analytic_repeats: int = 20
    live_repeats: int = 1
    seed: int = 0
    report: str | None = None
    description: str = ""
    source: Path | None = None

    @property
    def model_name(self) -> str:
        """The name the model's bundle is served under (unique per device)."""
        stem = Path(self.model).stem if self.model.endswith(".onnx") else self.model
        return f"{stem}_x{self.device_slowdown:g}".replace(".", "p")

    def next_start(self, end_s: float) -> float:
        """When a policy whose request ended at ``end_s`` starts its next one."""
        t = end_s + self.think_ms / 1e3
        if self.interval_ms <= 0:
            return t
        step = self.interval_ms / 1e3
        return math.ceil(t / step - 1e-9) * step

    @property
    def hysteresis(self) -> float:
        return float(self.gateway.get("hysteresis", _gw_default("hysteresis")))

    @property
    def deadline_ms(self) -> float:
        return float(self.gateway.get("deadline_ms", _gw_default("deadline_ms")))

    @property
    def probe_interval_s(self) -> float:
        return float(self.gateway.get("probe_interval_s", _gw_default("probe_interval_s")))

    @property
    def hedge(self) -> bool:
        return bool(self.gateway.get("hedge", _gw_default("hedge")))

    @property
    def hedge_factor(self) -> float:
        return float(self.gateway.get("hedge_factor", _gw_default("hedge_factor")))

    @property
    def calibrate(self) -> bool:
        return bool(self.gateway.get("calibrate", _gw_default("calibrate")))

    @property
    def probe_bytes(self) -> int:
        return int(self.gateway.get("probe_bytes", _gw_default("probe_bytes")))

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path | None = None) -> ExperimentSpec:
        """Parse a spec mapping.

        Raises:
            ValueError: unknown keys, policies or trace kinds.
        """
        unknown = sorted(set(data) - _KNOWN)
        if unknown:
            raise ValueError(f"unknown spec keys {unknown}; known: {sorted(_KNOWN)}")
        from splitgate.experiments.policies import POLICIES

        policies = list(data.get("policies", ["device", "cloud", "neurosurgeon", "dads", "adaptive"]))
        bad = [p for p in policies if p not in POLICIES]
        if bad:
            raise ValueError(f"unknown policies {bad}; known: {list(POLICIES)}")
        nominal = dict(data.get("nominal") or {"profile": "4g"})
        if "profile" in nominal:
            prof = net_profile(nominal.pop("profile"))
            nominal = {"uplink_mbps": prof.uplink_mbps, "downlink_mbps": prof.downlink_mbps,
                       "rtt_ms": prof.rtt_ms, **nominal}
        device = data.get("device") or {}
        model = str(data["model"])
        if model.endswith(".onnx") and base is not None and not Path(model).is_absolute():
            model = str(base / model)
        return cls(
            name=str(data.get("name", "experiment")),
            model=model,
            trace=build_trace(data["trace"], base),
            device_slowdown=float(device.get("slowdown", 1.0)),
            device_profile=device.get("profile"),
            plan=dict(data.get("plan") or {}),
            nominal=Conditions(**nominal),
            policies=policies,
            interval_ms=float(data.get("interval_ms", 500.0)),
            think_ms=float(data.get("think_ms", 0.0)),
            gateway=dict(data.get("gateway") or {}),
            network_hints=bool(data.get("network_hints", True)),
            analytic_repeats=int((data.get("analytic") or {}).get("repeats", 20)),
            live_repeats=max(int((data.get("live") or {}).get("repeats", 1)), 1),
            seed=int(data.get("seed", 0)),
            report=data.get("report"),
            description=str(data.get("description", "")),
        )


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read a YAML spec file."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    spec = ExperimentSpec.from_dict(data, base=path.parent)
    spec.source = path
    return spec
