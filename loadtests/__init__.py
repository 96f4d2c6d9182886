"""Locust load tests of the splitgate cloud tier.

* ``loadtests/locustfile.py`` -- the gRPC user replaying recorded split traffic.
* ``loadtests/stepload.py``   -- the same user with a step-load shape that finds
  the max sustainable rps at a p99 target.
* :func:`run_loadtest` / ``splitgate loadtest`` / ``python -m splitgate.loadtests`` -- start
  or target a tier, run locust headless, write CSV + HTML + PNG, print a summary.

Importing this package is cheap (no locust, gevent or Ray); the pieces load on use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LoadTestConfig", "LoadTestResult", "run_loadtest", "record_traffic", "parse_mix"]


def __getattr__(name: str) -> Any:
    if name in ("LoadTestConfig", "LoadTestResult", "run_loadtest"):
        from splitgate.loadtests import _runner

        return getattr(_runner, name)
    if name in ("record_traffic", "parse_mix"):
        from splitgate.loadtests import _traffic

        return getattr(_traffic, name)
    raise AttributeError(f"module 'loadtests' has no attribute {name!r}")
