"""splitgate planner: model graph -> profile -> partitions -> plan bundle.

Public API (what a user of the planner calls)::

    build_bundle(model_path, out_dir, options=PlanOptions(...) | **overrides) -> PlanBundle
    load_bundle(dir) / PlanBundle.load(dir) -> PlanBundle  (verified)
    PlanOptions(input_shapes=..., samples=..., encodings=...)   the planner's config
    ShapeBucket / parse_input_shapes / DynamicShapeError        real shapes, shape buckets
    PlanBundle.partitions / candidates / shapes / sample_inputs()
    PlanBundle.estimate(pid, c) / choose(c) / explain()
    PlanBundle.costs(shapes) -> per-request cost entries (nearest bucket, scaled; the request's bytes)
    PlanBundle.profile (profile.json as a dict) / PlanBundle.plan_profile (typed: Profile,
        BucketProfile, PartitionProfile, each with to_dict()/from_dict())
    Partition (a bundle's partition; .encoding for "cut-K@int8" candidates)
    Conditions, Estimate, EnergyModel, RadioPower, RADIOS, Constraints, estimate(...)   the cost model
    Grid, DecisionTable                 the decision table's condition grid and lookup
    ModelGraph.load(path), TensorSpec   shape-inferred ONNX model as a networkx DAG
    chain_cuts(graph) -> [Cut]          single-tensor cut points
    Extractor(graph).prefix(tensors) / .suffix(tensors); extract_prefix / extract_suffix
    profile_nodes(graph) -> NodeProfile; Timing   per-node measurement
    DeviceProfile.load(path) / measure_device(model|bundle)   a device measures itself (splitgate profile)
    refit_bundle(bundle_dir, device_profile) -> PlanBundle   decision data refitted to a device (same plan digest)

Solver internals stay in their private modules: the DAG cut problem and
min-cut search (:mod:`splitgate.planner._mincut`: ``CutProblem``, ``DagCut``,
``min_cut``, ``exhaustive_cut``), session timing
(:mod:`splitgate.planner._profile`: ``time_partition``), the planning stages
(:mod:`splitgate.planner._plan`: ``Planner``, ``plan_model``).

The model zoo (torch) lives in :mod:`splitgate.planner.zoo` and is not imported here, so
``import splitgate.planner`` needs only onnx, onnxruntime, networkx and numpy.
"""

from __future__ import annotations

from splitgate.planner._bundle import Partition, PlanBundle, build_bundle, load_bundle
from splitgate.planner._cost import RADIOS, Conditions, Constraints, EnergyModel, Estimate, RadioPower, estimate
from splitgate.planner._cuts import Cut, chain_cuts
from splitgate.planner._decide import DecisionTable, Grid
from splitgate.planner._device import DeviceProfile, measure_device
from splitgate.planner._extract import Extractor, extract_prefix, extract_suffix
from splitgate.planner._graph import ModelGraph, TensorSpec
from splitgate.planner._options import PlanOptions
from splitgate.planner._partition_profile import BucketProfile, PartitionProfile, Profile
from splitgate.planner._profile import NodeProfile, Timing, profile_nodes
from splitgate.planner._refit import refit_bundle
from splitgate.planner._report import best_cloud_only
from splitgate.planner._shapes import DynamicShapeError, ShapeBucket, parse_input_shapes

__all__ = [
    # plan and load bundles
    "PlanOptions",
    "build_bundle",
    "load_bundle",
    "PlanBundle",
    "Partition",
    "Profile",
    "BucketProfile",
    "PartitionProfile",
    # shapes
    "DynamicShapeError",
    "ShapeBucket",
    "parse_input_shapes",
    # the cost model and the decision table
    "Conditions",
    "Estimate",
    "EnergyModel",
    "RadioPower",
    "RADIOS",
    "Constraints",
    "estimate",
    "Grid",
    "DecisionTable",
    # the model graph
    "ModelGraph",
    "TensorSpec",
    "Cut",
    "chain_cuts",
    "Extractor",
    "extract_prefix",
    "extract_suffix",
    # measurement, device profiles, refit
    "NodeProfile",
    "Timing",
    "profile_nodes",
    "DeviceProfile",
    "measure_device",
    "refit_bundle",
    "best_cloud_only",
]
