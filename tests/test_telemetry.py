"""Telemetry: estimated energy, battery and version metrics after real requests, OpenTelemetry
traces across a real gRPC call to the cloud tier (the in-process grpcio baseline hosting the
same SuffixService as the Ray Serve deployment), and the Grafana dashboard's metric names."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from splitgate.edge import Gateway
from splitgate.edge._gateway import Trace
from splitgate.edge._telemetry import request_energy_mj
from splitgate.planner import Conditions, EnergyModel, build_bundle, estimate
from splitgate.planner._cost import transfer_ms

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docs" / "grafana" / "splitgate.json"
MODEL = "resnet18"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory):
    """The trained resnet18 (cached), profiled quickly, with 64 calibration images (a drift reference)."""
    pytest.importorskip("torch")
    from splitgate.planner.zoo import calibration_inputs, export_zoo_model

    d = tmp_path_factory.mktemp("telemetry")
    model = export_zoo_model(MODEL, d / f"{MODEL}.onnx", trained=True)
    cal = calibration_inputs(64)
    return build_bundle(model, d / "bundle", calibration={"input": cal["input"]}, repeats=3, warmup=1,
                        encodings=("raw",), max_candidates=2, reference_cuts=1)


@pytest.fixture(scope="module")
def cloud(bundle) -> Iterator[str]:
    from splitgate.cloud.baseline import start_baseline

    with start_baseline([str(bundle.root)]) as server:
        yield server.address


def image(seed: int = 0) -> np.ndarray:
    from splitgate.planner._zoo_train import gratings10

    return gratings10(1, seed=seed)[0]


def split_partition(bundle) -> str:
    return next(p.id for p in bundle.partitions.values() if p.kind == "split")


def metric_lines(gw: Gateway) -> str:
    from prometheus_client import generate_latest

    return generate_latest(gw.metrics.registry).decode()


# -- energy -------------------------------------------------------------------------------


def test_energy_estimate_is_the_planners_cost_model() -> None:
    """A request whose measured network time is exactly uplink + RTT + downlink at the link's
    bandwidth gets the energy the planner's estimate gives the same figures."""
    up_bytes, down_bytes, mbps, rtt = 200_000, 40, 5.85, 30.0
    c = Conditions(uplink_mbps=mbps, rtt_ms=rtt)
    for energy in (EnergyModel(), EnergyModel(radio="3g", radio_tail=True)):
        planned = estimate(12.0, 20.0, up_bytes, down_bytes, c, energy)
        network = transfer_ms(up_bytes, mbps) + rtt + transfer_ms(down_bytes, mbps)
        trace = Trace(MODEL, "cut-3", device_ms=12.0, network_ms=network, cloud_ms=20.0,
                      bytes_sent=up_bytes, bytes_received=down_bytes)
        assert request_energy_mj(trace, energy, mbps) == pytest.approx(planned.energy_mj, rel=1e-9)
    local = Trace(MODEL, "device", device_ms=50.0)
    assert request_energy_mj(local, EnergyModel(), mbps) == pytest.approx(100.0)  # 2 W x 50 ms


def test_energy_battery_version_metrics_after_real_requests(bundle, cloud: str) -> None:
    split = split_partition(bundle)
    version = bundle.plan_digest[:12]
    with Gateway([bundle], cloud=cloud, battery_pct=55.0) as gw:
        traces = {pid: gw.infer(MODEL, {"input": image(i)}, partition=pid).trace
                  for i, pid in enumerate(("device", "cloud", split))}
        text = metric_lines(gw)
    compute_mw = bundle.plan_profile.energy_model.compute_mw
    for pid, t in traces.items():
        assert t.version == version and t.battery_pct == 55.0 and t.fallback is None, t
        assert t.energy_mj is not None and t.energy_mj > 0, t
        assert f'splitgate_energy_mj_count{{model="{MODEL}",partition="{pid}"}} 1.0' in text
    assert traces["device"].energy_mj == pytest.approx(compute_mw * traces["device"].device_ms / 1e3, abs=1e-3)
    assert traces["cloud"].network_ms > 0 and traces["cloud"].bytes_sent > 0
    assert traces["cloud"].energy_mj > compute_mw * traces["cloud"].device_ms / 1e3  # radio and waiting count
    assert f'splitgate_model_version{{model="{MODEL}",version="{version}"}} 1.0' in text
    assert f'splitgate_version_requests_total{{model="{MODEL}",version="{version}"}} 3.0' in text
    assert "splitgate_battery_pct 55.0" in text
    assert f'splitgate_latency_ms_count{{leg="network",model="{MODEL}",partition="cloud"}} 1.0' in text


# -- OpenTelemetry ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spans():
    """An in-memory exporter on the process's global tracer provider (set once per process)."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


def test_one_trace_from_the_edge_through_the_cloud_tier(bundle, cloud: str, spans) -> None:
    split = split_partition(bundle)
    spans.clear()
    with Gateway([bundle], cloud=cloud, battery_pct=70.0) as gw:
        result = gw.infer(MODEL, {"input": image()}, partition=split)
    assert result.trace.fallback is None
    done = {s.name: s for s in spans.get_finished_spans()}
    request, device = done["splitgate.infer"], done["splitgate.device"]
    client, server = done["splitgate.cloud"], done["splitgate.cloud.infer"]
    trace_id = request.context.trace_id
    assert {s.context.trace_id for s in (device, client, server)} == {trace_id}
    assert request.parent is None
    assert device.parent.span_id == request.context.span_id
    assert client.parent.span_id == request.context.span_id
    assert server.parent.span_id == client.context.span_id  # extracted from the gRPC metadata
    assert server.attributes["splitgate.partition"] == split and server.attributes["splitgate.model"] == MODEL
    attrs = request.attributes
    assert attrs["splitgate.partition"] == split and attrs["splitgate.version"] == bundle.plan_digest[:12]
    assert attrs["splitgate.energy_mj"] == result.trace.energy_mj and attrs["splitgate.battery_pct"] == 70.0
    assert attrs["splitgate.bytes_sent"] == result.trace.bytes_sent > 0
    assert client.start_time >= request.start_time and server.end_time <= client.end_time


def test_async_gateway_requests_are_traced_and_counted(bundle, cloud: str, spans) -> None:
    import asyncio

    from splitgate.edge import AsyncGateway

    async def main() -> list:
        async with AsyncGateway([bundle], cloud=cloud) as gw:
            return [await gw.infer(MODEL, {"input": image(i)}, partition=pid) for i, pid in enumerate(("device", "cloud"))]

    spans.clear()
    results = asyncio.run(main())
    assert all(r.trace.energy_mj > 0 for r in results)
    done = spans.get_finished_spans()
    requests = [s for s in done if s.name == "splitgate.infer"]
    (client,) = [s for s in done if s.name == "splitgate.cloud"]
    assert len(requests) == 2 and client.parent.span_id in {r.context.span_id for r in requests}


def test_a_call_outside_a_request_opens_no_span(bundle, cloud: str, spans) -> None:
    """The edge's link probes (and any call without a parent span) are not traced."""
    from splitgate.edge import CloudClient

    spans.clear()
    with CloudClient(cloud) as client:
        assert client.infer(MODEL, {"input": image()}).outputs["logits"].shape == (1, 10)
    assert not [s for s in spans.get_finished_spans() if s.name == "splitgate.cloud"]  # (the tier still traces it)


def test_a_failed_request_is_an_error_span(bundle, spans) -> None:
    from splitgate.errors import InvalidArgument

    spans.clear()
    with Gateway([bundle]) as gw, pytest.raises(InvalidArgument):
        gw.infer(MODEL, {"input": np.zeros((1, 3, 8, 8), np.float32)})
    (request,) = [s for s in spans.get_finished_spans() if s.name == "splitgate.infer"]
    assert not request.status.is_ok and request.events[0].name == "exception"


def test_without_opentelemetry_everything_works_and_nothing_is_imported(bundle) -> None:
    """A fresh interpreter where ``import opentelemetry`` fails: requests (device and cloud),
    drift and metrics work, and no opentelemetry module was loaded."""
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ImportError("opentelemetry is not installed (blocked by the test)")
        sys.meta_path.insert(0, Block())
        import numpy as np
        from splitgate.cloud.baseline import start_baseline
        from splitgate.edge import Gateway
        root = {str(bundle.root)!r}
        with start_baseline([root]) as server, Gateway([root], cloud=server.address) as gw:
            x = np.zeros((1, 3, 64, 64), np.float32)
            for pid in ("device", "cloud"):
                t = gw.infer("{MODEL}", {{"input": x}}, partition=pid).trace
                assert t.energy_mj > 0 and t.fallback is None, t
            assert gw.drift("{MODEL}").requests == 2
            assert b"splitgate_energy_mj" in gw.metrics.prometheus()
        assert not [m for m in sys.modules if m.startswith("opentelemetry")]
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# -- the Grafana dashboard ------------------------------------------------------------------------


_SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def test_dashboard_uses_only_metrics_the_gateway_exports(bundle, cloud: str) -> None:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8 and board["title"]
    used = {m for e in exprs for m in re.findall(r"\bsplitgate_[a-z0-9_]+", e)}
    with Gateway([bundle], cloud=cloud, drift_min_requests=1, drift_window=4) as gw:
        gw.infer(MODEL, {"input": image()}, partition="cloud")
        gw.infer(MODEL, {"input": image(1)})
        gw.drift(MODEL)
        text = metric_lines(gw)
    families = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
    samples = set(re.findall(r"^(splitgate_[a-z0-9_]+)[{ ]", text, re.MULTILINE))
    for name in sorted(used):
        base = next((name[: -len(s)] for s in _SUFFIXES if name.endswith(s)), name)
        assert name in samples or (base in families and name != base) or name in families, \
            f"the dashboard queries {name}, which the Gateway does not export"
    for needed in ("splitgate_drift_score", "splitgate_energy_mj", "splitgate_model_version",
                   "splitgate_battery_pct", "splitgate_latency_ms", "splitgate_fallbacks_total"):
        assert any(u.startswith(needed) for u in used), f"the dashboard has no panel on {needed}"
