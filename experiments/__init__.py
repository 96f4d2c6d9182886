"""Network-condition experiments: one YAML spec, two engines, five policies side by side.

Public API:
    ExperimentSpec, load_spec   -- the experiment spec (YAML), see ``experiments/specs/``.
    run_analytic                -- trace-driven engine over the bundle's measured profile.
    run_live                    -- real Gateway -> ShapingProxy -> Ray Serve tier, real time.
    run_experiments             -- both engines, CSV, summary tables, PNG plots (``splitgate experiment``).
    POLICIES                    -- device, cloud, neurosurgeon, dads, adaptive (and the oracle mincut).

Importing this package does not import Ray, torch or matplotlib.
"""

from __future__ import annotations

from typing import Any

from splitgate.experiments.spec import ExperimentSpec, load_spec
from splitgate.experiments.policies import POLICIES

__all__ = ["ExperimentSpec", "load_spec", "POLICIES", "run_analytic", "run_live", "run_experiments"]


def __getattr__(name: str) -> Any:
    if name == "run_analytic":
        from splitgate.experiments.analytic import run_analytic

        return run_analytic
    if name == "run_live":
        from splitgate.experiments.live import run_live

        return run_live
    if name == "run_experiments":
        from splitgate.experiments.runner import run_experiments

        return run_experiments
    raise AttributeError(f"module 'experiments' has no attribute {name!r}")
