"""splitgate: a hybrid edge-cloud inference gateway with a split-execution planner.

``from splitgate import Gateway`` is the app-facing entry point; it is handed out
lazily so that importing splitgate (the wire layer: stubs, codec, errors) stays
light and free of import cycles.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Gateway", "AsyncGateway", "GatewayConfig", "Result", "Trace", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Gateway", "AsyncGateway", "GatewayConfig", "Result", "Trace"):
        from splitgate import edge
        return getattr(edge, name)
    raise AttributeError(f"module 'splitgate' has no attribute {name!r}")
