"""Shared fixtures: a zoo model, its plan bundle, and one real Ray Serve tier per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def zoo_bundle(tmp_path_factory: pytest.TempPathFactory):
    """A plan bundle of the seeded mobilenet zoo model."""
    pytest.importorskip("torch")
    from planner import build_bundle
    from planner.zoo import export_zoo_model

    root = tmp_path_factory.mktemp("zoo")
    model = export_zoo_model("mobilenet", root / "mobilenet.onnx", seed=0)
    return build_bundle(model, root / "mobilenet.bundle")


@pytest.fixture(scope="session")
def cloud_tier(zoo_bundle) -> Iterator[object]:
    """A real local Ray Serve tier with gRPC ingress serving ``zoo_bundle``."""
    pytest.importorskip("ray")
    from cloud import CloudConfig, start_local

    tier = start_local(CloudConfig(bundles=[str(zoo_bundle.root)], grpc_port=0))
    try:
        yield tier
    finally:
        tier.stop()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
