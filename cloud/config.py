"""Configuration of the cloud tier (one dataclass, loadable from TOML/YAML)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["CloudConfig"]


@dataclass
class CloudConfig:
    """How the cloud tier runs. Defaults work on a laptop.

    Attributes:
        bundles: plan bundle directories to serve.
        grpc_port: port of Ray Serve's gRPC proxy (0 = pick a free one).
        http_port: port of Ray Serve's HTTP proxy, which Serve always starts (0 = free).
        num_replicas: replicas of the inference deployment.
        intra_op_threads: onnxruntime threads per session (0 = ORT default).
        ray_num_cpus: CPUs given to the embedded local Ray (None = all).
        app_name: the Ray Serve application name.
    """

    bundles: list[str] = field(default_factory=list)
    grpc_port: int = 9000
    http_port: int = 0
    num_replicas: int = 1
    intra_op_threads: int = 0
    ray_num_cpus: int | None = None
    app_name: str = "splitgate"

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> CloudConfig:
        """Load from a .toml or .yaml file; ``overrides`` that are not None win."""
        path = Path(path)
        text = path.read_text()
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
        data = data.get("cloud", data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown cloud settings {unknown}; known: {sorted(known)}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
