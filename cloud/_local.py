"""Start and stop an embedded cloud tier: a local Ray plus Ray Serve with gRPC ingress."""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from dataclasses import replace
from typing import Self

import grpc

from splitgate.cloud._app import SERVICER_FUNCTION, build_app
from splitgate.cloud.config import CloudConfig
from splitgate.protocol import inference_pb2 as pb
from splitgate.protocol import inference_pb2_grpc as pb_grpc

__all__ = ["LocalCloud", "ray_env", "start_local"]


_PORT_BLOCK = 50


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::", port))
        return True
    except OSError:
        return False


def _free_port_block(rng: random.Random | None = None) -> int:
    """A random direct-ingress gRPC base port whose block (and HTTP block 1000 below) is free."""
    rng = rng or random.Random()
    for _ in range(200):
        base = rng.randrange(42000, 60000, _PORT_BLOCK)
        if all(_port_free(p) for p in (base, base + 1, base - 1000, base - 999)):
            return base
    raise RuntimeError("no free port block for Ray Serve direct ingress")


class LocalCloud:
    """A running embedded cloud tier. Use as a context manager or call :meth:`stop`.

    ``address`` is where clients connect: the TLS front when ``config.tls`` is
    set, else Ray Serve's gRPC proxy. ``plain_address`` is always the proxy
    (plaintext; keep it off the network when TLS is on).
    """

    def __init__(self, config: CloudConfig, started_ray: bool, front: object | None = None) -> None:
        self.config = config
        self._started_ray = started_ray
        self._front = front
        self.plain_address = f"127.0.0.1:{config.grpc_port}"
        self.address = front.address if front is not None else self.plain_address  # type: ignore[attr-defined]

    @property
    def endpoints(self) -> list[str]:
        """The replicas' direct-ingress gRPC endpoints now (empty without direct ingress)."""
        if not self.config.direct_ingress:
            return []
        from splitgate.cloud._discovery import direct_grpc_endpoints_sync

        return direct_grpc_endpoints_sync(self.config.app_name)

    def stop(self) -> None:
        """Shut down Serve, and Ray if this object started it."""
        import ray
        from ray import serve

        try:
            if self._front is not None:
                self._front.stop()  # type: ignore[attr-defined]
            serve.shutdown()
        finally:
            if self._started_ray and ray.is_initialized():
                ray.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_ready(
    address: str, model_names: list[str], timeout_s: float, *, endpoints: bool = False, token: str | None = None
) -> None:
    """Wait until ``address`` answers ServerReady/ModelReady (and, with ``endpoints``,
    ServerMetadata lists the replicas' direct-ingress endpoints)."""
    from splitgate.cloud._app import ENDPOINTS_EXTENSION
    from splitgate.security import auth_metadata

    md = auth_metadata(token)
    deadline = time.monotonic() + timeout_s
    last: object = None
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=5, metadata=md).ready and all(
                    stub.ModelReady(pb.ModelReadyRequest(name=m), timeout=5, metadata=md).ready
                    for m in model_names
                ):
                    meta = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=5, metadata=md)
                    if not endpoints or any(e.startswith(ENDPOINTS_EXTENSION) for e in meta.extensions):
                        return
                    last = "no direct-ingress endpoints published yet"
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED and token is None:
                    return  # auth by digest only: a replica answered, that is all we can tell
                last = exc
            time.sleep(0.2)
    raise TimeoutError(f"cloud tier at {address} not ready after {timeout_s:.0f}s: {last}")


def ray_env(config: CloudConfig) -> dict[str, str]:
    """Environment a Ray cluster needs for this config (read by Serve at start-up).

    Set in the environment of ``ray start`` on a cluster; ``start_local`` sets it
    before starting its local Ray.
    """
    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        # Serve's gRPC servers (proxy and direct ingress) refuse larger messages
        # with RESOURCE_EXHAUSTED before they reach a replica.
        "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(config.max_message_bytes),
    }
    if config.worker_niceness is not None:
        # Ray nices its workers (replicas included) to 15 by default: next to any
        # other busy process on the host they get the CPU last.
        env["RAY_worker_niceness"] = str(int(config.worker_niceness))
    env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1" if config.direct_ingress else "0"
    env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1" if config.throughput_optimized else "0"
    if config.direct_ingress:
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = str(config.drain_period_s)
        if config.direct_ingress_port:
            grpc_base = config.direct_ingress_port
            env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"] = str(grpc_base)
            env["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"] = str(grpc_base + _PORT_BLOCK)
            env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(grpc_base - 1000)
            env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(grpc_base - 1000 + _PORT_BLOCK)
    return env


def start_local(config: CloudConfig, *, ready_timeout_s: float = 120.0) -> LocalCloud:
    """Start local Ray (unless already running), Serve with gRPC ingress, and the app.

    Returns once every bundle's model answers ModelReady through the gRPC proxy.

    Raises:
        TimeoutError: the tier did not become ready in time.
        splitgate.errors.BundleError: a bundle failed its integrity check.
        splitgate.errors.BundleSignatureError: with ``config.trust``, a bundle
            is unsigned (unless ``allow_unsigned``), tampered or foreign-signed.
        splitgate.errors.ConfigError: a trusted key file cannot be read.
    """
    config = replace(
        config,
        grpc_port=config.grpc_port or _free_port(),
        http_port=config.http_port or _free_port(),
        direct_ingress_port=config.direct_ingress_port or (_free_port_block() if config.direct_ingress else 0),
    )
    # Serve reads these when its controller, proxies and replicas start: they
    # must be in the environment before Ray starts (workers inherit it).
    for key, value in ray_env(config).items():
        os.environ[key] = value

    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from splitgate.planner import PlanBundle

    from splitgate.security import TrustedKeys, verify_bundle

    # Verify bundles (and their signatures) here too, so a bad one fails fast
    # with a clear error instead of as a replica crash loop.
    trusted = TrustedKeys.from_paths(config.trust)
    names = []
    from splitgate.cloud._fetch import is_uri, resolve_bundle

    for b in config.bundles:
        # A URI is fetched here into this host's cache too (a fast, clear failure);
        # the replicas get the URI and fetch it on their own nodes.
        bundle = PlanBundle.load(resolve_bundle(
            b, cache_dir=config.bundle_cache, trusted=trusted, allow_unsigned=config.allow_unsigned
        ))
        verify_bundle(bundle, trusted, allow_unsigned=config.allow_unsigned)
        names.append(bundle.model_name)
    # Serve's driver-side INFO lines would interleave with the CLI's own output.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    started_ray = False
    if not ray.is_initialized():
        ray.init(
            address=config.ray_address,
            num_cpus=None if config.ray_address else config.ray_num_cpus,
            # A local Ray advertises loopback, so discovered replica endpoints are too.
            _node_ip_address=None if config.ray_address else "127.0.0.1",
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=True,
        )
        started_ray = True
    serve.start(
        http_options={"host": "127.0.0.1", "port": config.http_port},
        grpc_options=gRPCOptions(port=config.grpc_port, grpc_servicer_functions=[SERVICER_FUNCTION]),
    )
    app = build_app(replace(config, bundles=[b if is_uri(b) else os.path.abspath(b) for b in config.bundles]))
    # route_prefix must be set: apps without one are not exposed on the gRPC proxy.
    serve.run(app, name=config.app_name, route_prefix="/")
    front = None
    try:
        if config.tls is not None:
            from splitgate.security import TlsConfig, TlsFront

            tls = TlsConfig.from_dict(config.tls)
            assert tls is not None
            front = TlsFront(f"127.0.0.1:{config.grpc_port}", tls, port=config.tls_port).start()
    except BaseException:
        LocalCloud(config, started_ray).stop()
        raise
    cloud = LocalCloud(config, started_ray, front)
    try:
        _wait_ready(
            cloud.plain_address, names, ready_timeout_s,
            endpoints=config.direct_ingress and config.tls is None,
            token=config.auth_tokens[0] if config.auth_tokens else None,
        )
    except BaseException:
        cloud.stop()
        raise
    return cloud
