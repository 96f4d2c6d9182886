"""Short locust runs against a real Ray Serve tier over real gRPC.

The long runs (60 s summaries, step load with 1 and 2 replicas) are
benchmarks; see the README's "Load tests" section.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

# Never import locust here: it gevent-monkey-patches the importing process
# (and deadlocks next to Ray's threads); the runner runs it in a subprocess.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust not installed"),
]


def test_locust_smoke_run_has_no_failures(zoo_bundle, cloud_tier, tmp_path: Path) -> None:
    from splitgate.loadtests._runner import LoadTestConfig, run_loadtest

    cfg = LoadTestConfig(
        target=cloud_tier.address, bundles=[str(zoo_bundle.root)], users=4, spawn_rate=4,
        duration_s=10, out_dir=str(tmp_path), quiet=True,
    )
    result = run_loadtest(cfg)
    total = result.total
    assert total.name == "Aggregated"
    assert total.failures == 0, Path(result.files["failures_csv"]).read_text()
    assert total.requests > 0 and total.rps > 0
    # One row per (model, partition) of the default mix: cloud + first/middle/last cut.
    names = {s.name for s in result.stats} - {"Aggregated"}
    assert f"{zoo_bundle.model_name}/cloud" in names and len(names) == 4, names
    assert all(s.requests > 0 for s in result.stats)
    for key in ("stats_csv", "history_csv", "html", "png", "summary"):
        assert Path(result.files[key]).stat().st_size > 0, key
    assert json.loads(Path(result.files["summary"]).read_text())["stats"][-1]["failures"] == 0


def test_step_load_shape_reports_steps(zoo_bundle, cloud_tier, tmp_path: Path) -> None:
    from splitgate.loadtests._runner import LoadTestConfig, run_loadtest

    cfg = LoadTestConfig(
        target=cloud_tier.address, bundles=[str(zoo_bundle.root)], mix="cloud:1",
        step_load=True, step_users=1, step_time_s=3, step_max_users=2, p99_target_ms=10_000,
        out_dir=str(tmp_path), quiet=True,
    )
    result = run_loadtest(cfg)
    step = result.step
    assert step is not None and step["p99_target_ms"] == 10_000
    assert [s["users"] for s in step["steps"]] == [1, 2]
    assert all(s["requests"] > 0 and s["failures"] == 0 for s in step["steps"])
    assert step["max_sustainable_rps"] > 0 and step["at_users"] in (1, 2)
    assert result.total.failures == 0
