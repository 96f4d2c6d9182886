"""Cloud tier configuration: file/CLI/serve-args loading and the application it builds (no Ray started)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from splitgate.cloud import CloudConfig

ROOT = Path(__file__).resolve().parents[1]


def test_config_file_and_overrides(tmp_path) -> None:
    path = tmp_path / "cloud.toml"
    path.write_text('[cloud]\nbundles = ["a", "b"]\nmax_batch_size = 16\n[cloud.autoscaling]\nmax_replicas = 3\n')
    config = CloudConfig.from_file(path, max_batch_size=None, grpc_port=9100)
    assert config.bundles == ["a", "b"] and config.max_batch_size == 16 and config.grpc_port == 9100
    assert config.autoscaling == {"max_replicas": 3}
    with pytest.raises(ValueError, match="unknown cloud settings \\['max_batch'\\]"):
        CloudConfig.from_dict({"max_batch": 4})
    assert CloudConfig.from_dict({"bundles": "x,y"}).bundles == ["x", "y"]


@pytest.mark.integration  # imports Ray Serve (seconds); `make test-fast` leaves it out
def test_serve_config_builds_the_app(zoo_bundle, monkeypatch) -> None:
    pytest.importorskip("ray")
    from splitgate.cloud.app import build

    data = yaml.safe_load((ROOT / "cloud" / "serve_config.yaml").read_text())
    (app_cfg,) = data["applications"]
    assert app_cfg["import_path"] == "splitgate.cloud.app:build"
    args = dict(app_cfg["args"], bundles=[str(zoo_bundle.root)])
    deployment = build(args)._bound_deployment
    assert deployment.name == "splitgate-cloud"
    assert deployment._deployment_config.autoscaling_config.max_replicas == 4
    assert deployment._deployment_config.max_ongoing_requests == 64
    assert deployment.init_args[0] == [str(zoo_bundle.root)]
    assert deployment.init_args[2] == 8  # max_batch_size

    monkeypatch.setenv("SPLITGATE_BUNDLES", str(zoo_bundle.root))
    fixed = build({"num_replicas": 2})._bound_deployment
    assert fixed.num_replicas == 2 and fixed._deployment_config.autoscaling_config is None
    monkeypatch.delenv("SPLITGATE_BUNDLES")
    with pytest.raises(ValueError, match="no plan bundles"):
        build({})
