"""splitgate's cloud tier: a Ray Serve application serving plan-bundle suffixes over OIP gRPC.

Public API:
    CloudConfig   -- how the tier runs (ports, replicas, threads), from file or code.
    start_local   -- start an embedded tier (local Ray + Serve); returns a LocalCloud.
    build_app     -- the bound Serve application, for ``serve.run`` / ``serve deploy``.
    SuffixService -- the host-independent OIP logic (used by the plain baseline too).

Entry points: ``splitgate.cloud.app:build`` (the ``serve deploy`` import path, see
``cloud/serve_config.yaml``) and ``python -m splitgate.cloud.baseline`` (the plain grpcio
server the benchmarks compare against).

Importing ``cloud`` does not import Ray; the Ray pieces load on first use.
"""

from __future__ import annotations

from typing import Any

from splitgate.cloud.config import CloudConfig

__all__ = ["CloudConfig", "LocalCloud", "SuffixService", "build_app", "start_local"]


def __getattr__(name: str) -> Any:
    if name in ("start_local", "LocalCloud"):
        from splitgate.cloud import _local

        return getattr(_local, name)
    if name == "build_app":
        from splitgate.cloud._app import build_app

        return build_app
    if name == "SuffixService":
        from splitgate.cloud._service import SuffixService

        return SuffixService
    raise AttributeError(f"module 'cloud' has no attribute {name!r}")
