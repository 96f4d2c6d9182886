"""The typed partition profile (PartitionProfile / BucketProfile / Profile), the planning stages,
and the planner's module structure."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from _models import dynamic_batch_model, save

import splitgate.planner as planner
from splitgate.planner import (
    BucketProfile,
    Conditions,
    EnergyModel,
    PartitionProfile,
    PlanBundle,
    PlanOptions,
    Profile,
    Timing,
    build_bundle,
)
from splitgate.planner._extract import Extractor
from splitgate.planner._graph import ModelGraph
from splitgate.planner._partition_profile import partition_estimate
from splitgate.planner._plan import Planner

FAST = {"repeats": 3, "warmup": 1}
PLANNER = Path(__file__).resolve().parents[1] / "planner"


@pytest.fixture(scope="module")
def two_buckets(tmp_path_factory: pytest.TempPathFactory) -> PlanBundle:
    """The small conv net planned at two batch sizes, with encoded twins, for a slow device."""
    d = tmp_path_factory.mktemp("typed")
    model = save(dynamic_batch_model(), d / "dyn.onnx")
    return build_bundle(model, d / "bundle", device_slowdown=2000.0, input_shapes=["x=1x2x8x8", "x=4x2x8x8"],
                        encodings=("raw", "fp16", "int8"), **FAST)


def test_profile_json_round_trips_exactly(two_buckets: PlanBundle) -> None:
    """from_dict -> to_dict gives back profile.json as written: same keys, same order, same values."""
    text = (two_buckets.root / "profile.json").read_text(encoding="utf-8")
    doc = json.loads(text)
    typed = Profile.from_dict(doc)
    assert typed.to_dict() == doc
    assert json.dumps(typed.to_dict(), indent=1) + "\n" == text  # key order too
    assert typed.buckets is not None and len(typed.buckets) == 2
    assert [b.shapes for b in typed.buckets] == [{"x": (1, 2, 8, 8)}, {"x": (4, 2, 8, 8)}]
    assert two_buckets.plan_profile is not None and two_buckets.plan_profile.to_dict() == two_buckets.profile


def test_typed_entries_carry_the_measured_figures(two_buckets: PlanBundle) -> None:
    typed = two_buckets.plan_profile
    assert typed is not None
    for pid, e in typed.partitions.items():
        raw = two_buckets.profile["partitions"][pid]  # type: ignore[index]
        assert isinstance(e, PartitionProfile) and e.kind == two_buckets.partitions[pid].kind
        assert (e.device_ms, e.cloud_ms, e.up_bytes, e.down_bytes) == (
            raw["device_ms"], raw["cloud_ms"], raw["up_bytes"], raw["down_bytes"])
        assert e.device_timing is None or isinstance(e.device_timing, Timing)
        # only the cloud partition and its encoded twins (cloud@fp16...) ship the model's input here
        assert e.sends_input == (pid.partition("@")[0] == "cloud")
    assert typed.partitions["device"].device_timing is not None and typed.partitions["cloud"].device_timing is None
    assert typed.energy_model == EnergyModel() and typed.constraints_model.slo_ms is None
    # every split's encodings were measured (twins that win nowhere are not kept)
    assert typed.encodings is not None and typed.encodings["measured"]
    assert all("@" in pid for pid in typed.encodings["measured"])


def test_costs_are_dicts_of_the_profile_keys(two_buckets: PlanBundle) -> None:
    """PlanBundle.costs keeps its contract: fresh dicts (callers change them), estimate/choose take them."""
    planned = two_buckets.costs()
    assert planned == {pid: two_buckets.profile["partitions"][pid] for pid in two_buckets.candidates}  # type: ignore[index]
    big = two_buckets.costs({"x": (4, 2, 8, 8)})
    assert all(e["bucket"] == 1 and e["scale"] == 1.0 for e in big.values())
    assert big["cloud"]["up_bytes"] == 4 * 2 * 8 * 8 * 4
    c = Conditions(uplink_mbps=5.0)
    assert two_buckets.choose(c, costs=big) == "cloud"  # a device 2000x slower
    for pid in big:
        if pid != "device":
            big[pid]["cloud_ms"] = 1e9  # the caller's copies, not the bundle's
    assert two_buckets.costs({"x": (4, 2, 8, 8)})["cloud"]["cloud_ms"] < 1e9
    assert two_buckets.choose(c, costs=big) == "device"
    assert two_buckets.estimate("cloud", c, costs=big).latency_ms >= 1e9


def test_legacy_entry_defaults_and_unknown_keys() -> None:
    """An older or hand-written entry reads with the defaults readers always gave an absent key."""
    cloud = PartitionProfile.from_dict({"device_ms": 0, "cloud_ms": 2.0, "up_bytes": 10, "down_bytes": 4},
                                       kind="cloud")
    assert cloud.kind == "cloud" and cloud.sends_input and cloud.device_mem_bytes == 0 and not cloud.reference
    split = PartitionProfile.from_dict({"kind": "split", "device_ms": 1.0, "future_key": [1, 2]})
    assert not split.sends_input and split.up_bytes == 0 and split.extra == {"future_key": [1, 2]}
    assert split.to_dict()["future_key"] == [1, 2]
    assert "encoding" not in split.to_dict() and split.to_dict()["device_timing"] is None
    doc = {"partitions": {"cloud": {"device_ms": 0.0, "cloud_ms": 1.0, "up_bytes": 1, "down_bytes": 1}}}
    old = Profile.from_dict(doc, kinds={"cloud": "cloud"})
    assert old.buckets is None and old.energy_model == EnergyModel()
    assert set(old.to_dict()) == {"partitions"}
    with pytest.raises(KeyError):
        PartitionProfile.from_dict({"device_timing": {"median_ms": 1.0}})  # a timing without its fields


def test_encoded_twin_and_estimate() -> None:
    raw = PartitionProfile(kind="split", tensors=("t",), up_bytes=1000, down_bytes=40, device_ms=2.0, cloud_ms=1.0,
                           reference=True)
    twin = raw.encoded("int8", "cut-1", up_bytes=250, encode_ms=0.5, decode_ms=0.25, wire_ratio=4.0)
    assert (twin.device_ms, twin.cloud_ms, twin.up_bytes, twin.base, twin.reference) == (2.5, 1.25, 250, "cut-1", False)
    assert list(twin.to_dict())[-5:] == ["encoding", "base", "encode_ms", "decode_ms", "wire_ratio"]
    c, energy = Conditions(uplink_mbps=1.0, rtt_ms=10.0), EnergyModel()
    assert partition_estimate(twin, "split", c, energy) == partition_estimate(twin.to_dict(), "split", c, energy)
    assert twin.estimate(c, energy) == partition_estimate(twin, "split", c, energy)
    bucket = BucketProfile({"x": (1, 2)}, {"cut-1": raw, "cut-1@int8": twin}, elements=2)
    assert BucketProfile.from_dict(bucket.to_dict()).to_dict() == bucket.to_dict()


def test_planner_stages_without_profiling(tmp_path: Path) -> None:
    """profile=False runs the shape, cut and extraction stages only."""
    g = ModelGraph.load(save(dynamic_batch_model(), tmp_path / "dyn.onnx"))
    steps: list[str] = []
    plan = Planner(g, PlanOptions(profile=False), Extractor(g), lambda step, done, total: steps.append(step)).run()
    assert plan.profile is None and plan.table is None and not plan.tables
    assert [p.id for p in plan.partitions][0] == "cloud" and plan.partitions[-1].id == "device"
    assert all(p.prefix is not None for p in plan.partitions if p.kind == "split")
    assert set(steps) == {"find cuts", "extract partitions"}


def _imports(module: str) -> set[str]:
    tree = ast.parse((PLANNER / f"{module}.py").read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_encoding_and_plan_do_not_import_each_other() -> None:
    assert "splitgate.planner._plan" not in _imports("_encoding")
    assert "splitgate.planner._encoding" in _imports("_plan")  # one way only
    for shared in ("_options", "_partition_profile"):
        assert not {"splitgate.planner._plan", "splitgate.planner._encoding"} & _imports(shared)


def test_public_surface_leaves_solver_internals_private() -> None:
    internals = {"CutProblem", "DagCut", "min_cut", "exhaustive_cut", "time_partition", "plan_model", "Planner"}
    assert not internals & set(planner.__all__)
    assert not any(hasattr(planner, name) for name in internals)
    for name in ("build_bundle", "load_bundle", "PlanBundle", "PlanOptions", "Profile", "refit_bundle"):
        assert name in planner.__all__
