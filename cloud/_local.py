"""Start and stop an embedded cloud tier: a local Ray plus Ray Serve with gRPC ingress."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import replace

import grpc

from cloud._app import SERVICER_FUNCTION, build_app
from cloud.config import CloudConfig
from splitgate.protocol import inference_pb2 as pb
from splitgate.protocol import inference_pb2_grpc as pb_grpc

__all__ = ["LocalCloud", "start_local"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCloud:
    """A running embedded cloud tier. Use as a context manager or call :meth:`stop`."""

    def __init__(self, config: CloudConfig, started_ray: bool) -> None:
        self.config = config
        self._started_ray = started_ray
        self.address = f"127.0.0.1:{config.grpc_port}"

    def stop(self) -> None:
        """Shut down Serve, and Ray if this object started it."""
        from ray import serve
        import ray

        try:
            serve.shutdown()
        finally:
            if self._started_ray and ray.is_initialized():
                ray.shutdown()

    def __enter__(self) -> LocalCloud:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_ready(address: str, model_names: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready and all(
                    stub.ModelReady(pb.ModelReadyRequest(name=m), timeout=5).ready for m in model_names
                ):
                    return
            except grpc.RpcError as exc:
                last = exc
            time.sleep(0.2)
    raise TimeoutError(f"cloud tier at {address} not ready after {timeout_s:.0f}s: {last}")


def start_local(config: CloudConfig, *, ready_timeout_s: float = 120.0) -> LocalCloud:
    """Start local Ray (unless already running), Serve with gRPC ingress, and the app.

    Returns once every bundle's model answers ModelReady through the gRPC proxy.

    Raises:
        TimeoutError: the tier did not become ready in time.
        splitgate.errors.BundleError: a bundle failed its integrity check.
    """
    # Keep Ray quiet and local; these must be set before Ray is imported.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from planner import PlanBundle

    config = replace(
        config,
        grpc_port=config.grpc_port or _free_port(),
        http_port=config.http_port or _free_port(),
    )
    # Verify bundles here too, so a bad one fails fast with a clear error
    # instead of as a replica crash loop.
    names = [PlanBundle.load(b).model_name for b in config.bundles]
    # Serve's driver-side INFO lines would interleave with the CLI's own output.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    started_ray = False
    if not ray.is_initialized():
        ray.init(
            num_cpus=config.ray_num_cpus,
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
    app = build_app(
        [os.path.abspath(b) for b in config.bundles],
        intra_op_threads=config.intra_op_threads,
        num_replicas=config.num_replicas,
    )
    # route_prefix must be set: apps without one are not exposed on the gRPC proxy.
    serve.run(app, name=config.app_name, route_prefix="/")
    cloud = LocalCloud(config, started_ray)
    try:
        _wait_ready(cloud.address, names, ready_timeout_s)
    except BaseException:
        cloud.stop()
        raise
    return cloud
