"""Reading a part's settings from a TOML or YAML file (shared by cloud and edge configs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["read_section"]


def read_section(path: str | Path, section: str) -> dict[str, Any]:
    """Return the ``[section]`` table of a .toml/.yaml file (or its top level if absent).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file does not hold a mapping.
    """
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        data: Any = tomllib.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return dict(data.get(section, data))
