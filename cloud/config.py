"""Configuration of the cloud tier (one dataclass, loadable from TOML/YAML, overridable from the CLI)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["CloudConfig", "execution_providers"]


@dataclass
class CloudConfig:
    """How the cloud tier runs. Defaults work on a laptop.

    Attributes:
        bundles: plan bundle directories to serve.
        grpc_port: port of Ray Serve's gRPC proxy (0 = pick a free one).
        http_port: port of Ray Serve's HTTP proxy, which Serve always starts (0 = free).
        num_replicas: replicas of the inference deployment (ignored with ``autoscaling``).
        autoscaling: a Ray Serve ``autoscaling_config`` (e.g. ``{"min_replicas": 1,
            "max_replicas": 4, "target_ongoing_requests": 8}``); None = fixed replicas.
        max_batch_size: most rows one suffix run may take; 1 disables batching.
        batch_wait_timeout_s: how long a batch waits for mates after its first request.
        max_ongoing_requests: requests a replica accepts at once (Serve backpressure).
        max_message_bytes: largest ModelInfer request (RESOURCE_EXHAUSTED above it).
        intra_op_threads: onnxruntime threads per session (0 = ORT default).
        compute_threads: threads per replica running suffix batches concurrently.
        batcher: ``"drain"`` (compute threads take all queued requests, batches
            grow with the queue, decode/encode off the event loop) or ``"serve"``
            (Ray's ``@serve.batch`` with ``batch_wait_timeout_s``).
        access_log: Serve's per-request access log lines (off: they cost the
            replica's event loop time on every request).
        direct_ingress: let each replica serve gRPC on its own port (Ray 2.60
            ``RAY_SERVE_ENABLE_DIRECT_INGRESS``); clients discover the ports via
            ServerMetadata and keep the proxy as the fallback.
        throughput_optimized: Ray Serve's ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` profile
            (user code on the replica's main loop, gRPC between proxy and replica,
            buffered access logs); measured faster here, see README.
        direct_ingress_port: first port of the replicas' direct-ingress gRPC range
            (HTTP uses the 1000 below it); 0 = a random free block. Ray 2.60 binds
            these with SO_REUSEPORT on, so two tiers on one host sharing a range
            would split each other's connections: keep ranges apart.
        drain_period_s: with direct ingress, how long a stopping replica keeps
            answering (Ray's default is 30 s, which also slows every shutdown).
        health_check_period_s: how often Serve checks a replica (a killed one is
            replaced after the check notices).
        worker_niceness: CPU niceness of Ray's worker processes, replicas included
            (Ray's ``RAY_worker_niceness``; Ray's own default is 15, which on a host
            shared with other work starves the replicas; README "Cloud tier
            performance"). None = Ray's default.
        ray_address: an existing Ray cluster to join (None = start a local Ray).
        ray_num_cpus: CPUs given to the embedded local Ray (None = all).
        app_name: the Ray Serve application name.
        tls: serve TLS: a ``splitgate.security.TlsConfig`` mapping (``cert``,
            ``key``; ``ca`` + ``require_client_cert`` for mutual TLS). Ray Serve's
            gRPC ingress has no TLS option, so the embedded tier terminates TLS
            in a front on ``tls_port`` and clients use that address (README "Security").
        tls_port: port of the TLS front (0 = a free one).
        auth_tokens: bearer tokens accepted on every RPC (UNAUTHENTICATED
            otherwise); only their sha256 reaches the replicas. Empty = no token auth.
        auth_token_digests: accepted tokens given as sha256 hex instead.
        nan_policy: ``"allow"`` or ``"reject"`` NaN/Inf in float cut tensors.
        trust: public key files (``signing.pub``) whose bundle signatures are
            accepted, read where the app is built; the keys themselves (not the
            paths) reach every replica. Empty = signatures not checked (one
            WARNING per process). With keys, unsigned, tampered or foreign-signed
            bundles are refused (``splitgate.errors.BundleSignatureError``).
        allow_unsigned: with ``trust``, still serve unsigned bundles (a WARNING
            each; development only). A bad signature is refused regardless.
        bundle_cache: where each node keeps bundles fetched from a URI (``bundles``
            may hold ``http(s)://`` URLs of ``.tar.gz`` archives, fsspec URLs, or
            local ``.tar.gz`` files; see docs/cloud.md). None = the node's
            ``SPLITGATE_BUNDLE_CACHE``, else ``~/.cache/splitgate/bundles``.
        providers: onnxruntime execution providers for suffix sessions, in order
            of preference (``"CUDAExecutionProvider"`` or short ``"cuda"``, ...).
            Empty = auto: CUDA when this node's onnxruntime has it, else CPU.
            Unknown names are a ``ConfigError``; each replica logs and reports
            (ServerMetadata ``splitgate.providers=``) the providers its sessions use.
        gpus_per_replica: GPUs Ray reserves per replica (``ray_actor_options``
            ``num_gpus``; fractions share a GPU); 0 = none.
        max_replicas_per_node: at most this many replicas on one Ray node (Serve's
            ``max_replicas_per_node``; 1 spreads replicas over nodes, so losing a
            node loses one replica); None = Serve's placement.
        max_queue: requests that may wait per replica (admission control); one
            more is refused at once with RESOURCE_EXHAUSTED and a retry hint
            (trailing metadata ``splitgate.retry_after_ms``). Also Ray Serve's
            ``max_queued_requests`` in front of each replica. 0 = unbounded.
            Keep ``max_ongoing_requests`` above ``max_queue`` + ``max_batch_size``,
            or Serve's own bound refuses first (without a hint).
        priority_levels: priority levels (OIP ``priority`` parameter, 1 = served first).
        default_priority: level of requests without ``priority`` (or with 0).
        default_deadline_ms: deadline of requests that give none
            (``splitgate.deadline_ms``); None = no deadline. A request whose
            deadline the queue ahead says it would miss is refused at once
            with UNAVAILABLE and a retry hint.
        deadline_fraction: share of a request's deadline a replica may spend on
            it (queue + compute); the rest is left for the network, ingress and
            the client. Admission and batching use that share.
    """

    bundles: list[str] = field(default_factory=list)
    grpc_port: int = 9000
    http_port: int = 0
    num_replicas: int = 1
    autoscaling: dict[str, Any] | None = None
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.002
    max_ongoing_requests: int = 64
    max_message_bytes: int = 64 * 1024 * 1024
    intra_op_threads: int = 0
    compute_threads: int = 1
    batcher: str = "drain"
    access_log: bool = False
    direct_ingress: bool = True
    throughput_optimized: bool = True
    direct_ingress_port: int = 0
    drain_period_s: float = 1.0
    health_check_period_s: float = 2.0
    worker_niceness: int | None = 0
    ray_address: str | None = None
    ray_num_cpus: int | None = None
    app_name: str = "splitgate"
    tls: dict[str, Any] | None = None
    tls_port: int = 0
    auth_tokens: list[str] = field(default_factory=list)
    auth_token_digests: list[str] = field(default_factory=list)
    nan_policy: str = "allow"
    trust: list[str] = field(default_factory=list)
    allow_unsigned: bool = False
    bundle_cache: str | None = None
    providers: list[str] = field(default_factory=list)
    gpus_per_replica: float = 0.0
    max_replicas_per_node: int | None = None
    max_queue: int = 32
    priority_levels: int = 3
    default_priority: int = 2
    default_deadline_ms: float | None = None
    deadline_fraction: float = 0.4

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> CloudConfig:
        """Load from a .toml or .yaml file; ``overrides`` that are not None win."""
        from splitgate.config import read_section

        return cls.from_dict(read_section(path, "cloud"), where=str(path), **overrides)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "cloud config", **overrides: Any) -> CloudConfig:
        """Build from a mapping (e.g. Serve's ``args``); unknown keys are an error."""
        data = dict(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown cloud settings {unknown}; known: {sorted(known)}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(data.get("bundles"), str):
            data["bundles"] = [b for b in data["bundles"].split(",") if b]
        if isinstance(data.get("trust"), str):
            data["trust"] = [t for t in data["trust"].split(",") if t]
        if isinstance(data.get("providers"), str):
            data["providers"] = [p.strip() for p in data["providers"].split(",") if p.strip()]
        return cls(**data)

    def admission_policy(self) -> dict[str, Any]:
        """The admission fields, as ``AdmissionPolicy`` keyword arguments (checked).

        Raises:
            ValueError: a bound, level or deadline out of range.
        """
        from splitgate.cloud._admission import AdmissionPolicy

        policy = dict(max_queue=self.max_queue, priority_levels=self.priority_levels,
                      default_priority=self.default_priority, default_deadline_ms=self.default_deadline_ms,
                      deadline_fraction=self.deadline_fraction)
        AdmissionPolicy(**policy)
        return policy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_AUTO = ("", "auto")


def execution_providers(requested: list[str] | tuple[str, ...], available: list[str] | None = None) -> list[str]:
    """The onnxruntime execution providers a suffix session uses, in order.

    Args:
        requested: ``CloudConfig.providers``: full names (``"CUDAExecutionProvider"``)
            or short ones (``"cuda"``), case-insensitive; empty or ``["auto"]`` =
            CUDA then CPU when ``available`` has CUDA, else CPU alone.
        available: the providers this node's onnxruntime has (None = ask it);
            pass ``[]`` to check names only (where the sessions will not run).

    Returns:
        Full provider names; CPU is appended as the last resort when missing.

    Raises:
        ConfigError: a name onnxruntime does not know, or (with ``available``)
            a provider this node's onnxruntime lacks.
    """
    import onnxruntime as ort

    from splitgate.errors import ConfigError

    names = [str(p).strip() for p in requested if str(p).strip().lower() not in _AUTO]
    check_only = available is not None and not available
    have = list(ort.get_available_providers()) if available is None else list(available)
    if not names:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in have \
            else ["CPUExecutionProvider"]
    known = {k.lower(): k for k in ort.get_all_providers()}
    known.update({k.lower().removesuffix("executionprovider"): k for k in ort.get_all_providers()})
    out: list[str] = []
    for name in names:
        full = known.get(name.lower())
        if full is None:
            raise ConfigError(
                f"unknown onnxruntime execution provider {name!r} in cloud 'providers'; known: "
                f"{sorted(ort.get_all_providers())} (or short names such as 'cuda', 'cpu'; empty = auto)"
            )
        if not check_only and full not in have:
            raise ConfigError(
                f"execution provider {full} is not available in this node's onnxruntime "
                f"(available: {have}); install the matching onnxruntime build (e.g. onnxruntime-gpu) "
                "or leave 'providers' empty for auto"
            )
        if full not in out:
            out.append(full)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out
