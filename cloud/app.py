"""Entry point for ``serve deploy`` / ``serve run`` on an existing Ray cluster.

``cloud/serve_config.yaml`` names ``splitgate.cloud.app:build`` as the application's
import path; Serve calls it with the config's ``args`` (any
:class:`~splitgate.cloud.config.CloudConfig` field, e.g. ``bundles``, ``max_batch_size``,
``autoscaling``). ``SPLITGATE_CLOUD_CONFIG`` (a TOML/YAML file) and
``SPLITGATE_BUNDLES`` (comma-separated directories) fill in what ``args`` leave
out, so ``serve run cloud.app:build`` works from the environment alone.
"""

from __future__ import annotations

import os
from typing import Any

from splitgate.cloud._app import build_app
from splitgate.cloud.config import CloudConfig

__all__ = ["build"]


def build(args: dict[str, Any] | None = None):
    """Serve application builder: ``args`` (from the serve config) -> bound application."""
    args = dict(args or {})
    path = os.environ.get("SPLITGATE_CLOUD_CONFIG")
    config = CloudConfig.from_file(path) if path else CloudConfig()
    if not args.get("bundles") and os.environ.get("SPLITGATE_BUNDLES"):
        args["bundles"] = os.environ["SPLITGATE_BUNDLES"]
    merged = CloudConfig.from_dict({**config.to_dict(), **args}, where="serve config args")
    if not merged.bundles:
        raise ValueError("no plan bundles: set args.bundles in the serve config or SPLITGATE_BUNDLES")
    return build_app(merged)
