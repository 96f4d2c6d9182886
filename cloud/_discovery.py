"""Where an app's replicas serve gRPC directly (Ray Serve direct ingress).

With ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` every ingress replica runs its own
gRPC server on a port from 40000 up; the Serve controller knows them as the
app's gRPC "target groups". This module asks the controller (a Ray-internal
API, ``ServeController.get_target_groups``, present in Ray 2.60) and returns
``host:port`` strings. Without direct ingress the controller answers with the
proxies, which are filtered out, so the list is empty and clients use the proxy.
"""

from __future__ import annotations

import ray

__all__ = ["direct_grpc_endpoints"]


def _controller():
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)


def _parse(groups: list, app_name: str) -> list[str]:
    from ray.serve._private.common import RequestProtocol

    out: list[str] = []
    for group in groups:
        if group.protocol != RequestProtocol.GRPC or group.app_name != app_name:
            continue
        for target in group.targets:
            host = f"[{target.ip}]" if ":" in target.ip else target.ip
            out.append(f"{host}:{target.port}")
    return sorted(set(out))


async def direct_grpc_endpoints(app_name: str) -> list[str]:
    """From inside the cluster (a replica): the app's direct-ingress gRPC endpoints."""
    groups = await _controller().get_target_groups.remote(app_name)
    return _parse(groups, app_name)


def direct_grpc_endpoints_sync(app_name: str) -> list[str]:
    """From the driver: the app's direct-ingress gRPC endpoints."""
    return _parse(ray.get(_controller().get_target_groups.remote(app_name)), app_name)
