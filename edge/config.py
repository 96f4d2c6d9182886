"""Configuration of the edge Gateway (one dataclass, loadable from TOML/YAML)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["GatewayConfig"]


@dataclass
class GatewayConfig:
    """How the Gateway behaves. Defaults work on a laptop.

    Attributes:
        cloud: ``host:port`` of the cloud tier (None = device only).
        deadline_ms: per-request budget; the cloud leg gets what the prefix left.
        max_concurrency: requests running at once; more wait their turn.
        intra_op_threads: onnxruntime threads per device session (0 = ORT default).
        breaker_failures: consecutive cloud failures that open the circuit breaker.
        breaker_reset_s: how long the breaker stays open before a probe.
        hedge: start the local suffix when the cloud is late and the deadline near.
        hedge_factor: also race the local suffix once a call takes this many
            times its predicted time (``splitgate.edge.hedge_delay_ms``; 0: deadline rule only).
        hysteresis: a new partition must be predicted this much faster (fraction)
            than the current one before the policy switches.
        calibrate: decide on the link as recent calls say it behaves
            (``splitgate.edge.LinkCalibration``: pessimistic on a link that swings).
        cache_size: entries of the opt-in LRU result cache (0 = off).
        probe_interval_s: probe the link when idle or estimates are older than this.
        probe_bytes: payload of a bandwidth probe (32 KB: twice the monitor's
            16 KB bandwidth-sample floor, and short enough that on a 3G-class
            uplink, 0.2-1 Mbps, one probe takes 0.3-1.3 s rather than 0.5-2.6 s,
            so the estimate is not an average over a window as long as the
            probe interval).
        private_models: models whose raw inputs must never leave the device.
        device_slowdown: emulate a slower device by stretching device compute
            time by this factor (experiments only; 1.0 = off).
        device_time_from_profile: emulate the planned device exactly: pad each
            device leg to the time the bundle's profile gives it (experiments
            only; steadier than ``device_slowdown`` on a loaded machine). With
            ``device_slowdown`` > 1 too, the padded time is stretched by it.
        learn_device: online device costs: learn the device's measured speed
            against the plan from every device leg (``splitgate.edge.DeviceCosts``) and
            decide with it (``Conditions.device_factor``); off = decide with the
            profile's device times as planned.
        device_probe_every: while requests of a model run nothing on the device
            (``cloud``), run its cheapest prefix (twice, in the background) every
            this many of them, so a device that recovered is noticed (0 = never).
        battery_pct: fixed battery level (None = read from the OS).
        encoding: wire encoding of cut tensors when the plan names none
            ("raw", "fp16", "int8", "int8c", "zstd", "uint8": lossless for 8-bit
            data, raw otherwise; see splitgate.encoding).
        cloud_tls: TLS to the cloud tier: a ``splitgate.security.TlsConfig``
            mapping (``ca``; ``cert``/``key`` for mutual TLS; ``server_name``).
        cloud_token: bearer token sent to the cloud tier on every call.
        cloud_insecure: allow plaintext to a non-loopback cloud address.
        nan_policy: ``"allow"`` or ``"reject"`` NaN/Inf in float inputs (INVALID_ARGUMENT).
        cloud_discover: call the replicas' direct-ingress ports found through
            the tier (faster; falls back to ``cloud``). Leave off when ``cloud``
            is a shaping proxy or any front the replicas' ports would bypass.
        trust: public key files (``signing.pub`` from ``splitgate keys``) whose
            bundle signatures are accepted; empty = signatures not checked (one
            WARNING per process). With keys, unsigned, tampered or foreign-signed
            bundles are refused (``splitgate.errors.BundleSignatureError``).
        allow_unsigned: with ``trust``, still load unsigned bundles (a WARNING
            each; development only). A bad signature is refused regardless.
        update_source: over-the-air updates: a directory or http(s):// URL
            holding an update ``index.json`` (``splitgate publish``); None = off.
            See docs/updates.md.
        update_interval_s: seconds between update checks (the first runs at
            start); 0 = on demand only (``Gateway.check_updates``).
        update_dir: staging and cache directory of downloads and unpacked
            versions (None = ``~/.cache/splitgate/updates``).
        drift_threshold: drift score (population stability index) at which a
            model counts as drifted: ``Gateway.on_drift`` callbacks fire, one
            WARNING is logged (0.1 = moderate, 0.25 = significant shift; see docs/telemetry.md).
        drift_window: recent requests per model the drift score is computed over.
        drift_min_requests: no drift score before the window holds this many requests.
    """

    cloud: str | None = None
    deadline_ms: float = 10_000.0
    max_concurrency: int = 8
    intra_op_threads: int = 0
    breaker_failures: int = 3
    breaker_reset_s: float = 5.0
    hedge: bool = True
    hedge_factor: float = 3.0
    hysteresis: float = 0.1
    calibrate: bool = True
    cache_size: int = 0
    probe_interval_s: float = 5.0
    probe_bytes: int = 32 * 1024
    private_models: list[str] = field(default_factory=list)
    device_slowdown: float = 1.0
    device_time_from_profile: bool = False
    learn_device: bool = True
    device_probe_every: int = 3
    battery_pct: float | None = None
    encoding: str = "raw"
    cloud_tls: dict[str, Any] | None = None
    cloud_token: str | None = None
    cloud_insecure: bool = False
    nan_policy: str = "allow"
    cloud_discover: bool = False
    trust: list[str] = field(default_factory=list)
    allow_unsigned: bool = False
    update_source: str | None = None
    update_interval_s: float = 300.0
    update_dir: str | None = None
    drift_threshold: float = 0.25
    drift_window: int = 256
    drift_min_requests: int = 128

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> GatewayConfig:
        """Load from a .toml or .yaml file (an ``[edge]`` table or top level)."""
        from splitgate.config import read_section

        data = read_section(path, "edge")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown edge settings {unknown}; known: {sorted(known)}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)
