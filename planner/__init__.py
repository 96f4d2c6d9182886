"""splitgate planner: model graph -> profile -> partitions -> plan bundle.

Public API::

    ModelGraph.load(path)            shape-inferred ONNX model as a networkx DAG
    TensorSpec(name, datatype, shape)
    chain_cuts(graph) -> [Cut]       single-tensor cut points
    CutProblem(graph); min_cut(...) / exhaustive_cut(...) -> DagCut   DAG partitions (DADS s-t min-cut)
    Extractor(graph).prefix(tensors) / .suffix(tensors)   sub-models (ModelProto)
    extract_prefix(graph, tensors), extract_suffix(graph, tensors)  shortcuts
    profile_nodes(graph) -> NodeProfile; time_partition(prefix, suffix, feeds)   measurement
    DeviceProfile.load(path) / measure_device(model|bundle)   a device measures itself (splitgate profile)
    refit_bundle(bundle_dir, device_profile) -> PlanBundle   decision data refitted to a device (same plan digest)
    Conditions, Estimate, EnergyModel, Constraints, estimate(...)   the cost model
    build_bundle(model_path, out_dir, options=PlanOptions(...) | **overrides) -> PlanBundle
    load_bundle(dir) / PlanBundle.load(dir) -> PlanBundle  (verified)
    PlanBundle.candidates / has_profile / estimate(pid, c) / choose(c) / explain()
    PlanOptions(input_shapes=..., samples=...) / ShapeBucket / DynamicShapeError   real shapes, shape buckets
    PlanBundle.costs(shapes) -> per-request cost entries (nearest bucket, scaled; the request's bytes)
    (cut, encoding) candidates "cut-K@int8" (PlanOptions.encodings, calibration, guard; Partition.encoding)

The model zoo (torch) lives in :mod:`splitgate.planner.zoo` and is not imported here, so
``import planner`` needs only onnx, onnxruntime, networkx and numpy.
"""

from __future__ import annotations

from splitgate.planner._bundle import Partition, PlanBundle, build_bundle, load_bundle
from splitgate.planner._cost import RADIOS, Conditions, Constraints, EnergyModel, Estimate, RadioPower, estimate
from splitgate.planner._cuts import Cut, chain_cuts
from splitgate.planner._decide import DecisionTable, Grid
from splitgate.planner._extract import Extractor, extract_prefix, extract_suffix
from splitgate.planner._graph import ModelGraph, TensorSpec
from splitgate.planner._mincut import CutProblem, DagCut, exhaustive_cut, min_cut
from splitgate.planner._plan import PlanOptions
from splitgate.planner._profile import NodeProfile, Timing, profile_nodes, time_partition
from splitgate.planner._device import DeviceProfile, measure_device
from splitgate.planner._refit import refit_bundle
from splitgate.planner._shapes import DynamicShapeError, ShapeBucket, parse_input_shapes

__all__ = [
    "ModelGraph",
    "TensorSpec",
    "Cut",
    "chain_cuts",
    "CutProblem",
    "DagCut",
    "min_cut",
    "exhaustive_cut",
    "Extractor",
    "extract_prefix",
    "extract_suffix",
    "Conditions",
    "Estimate",
    "EnergyModel",
    "RadioPower",
    "RADIOS",
    "Constraints",
    "estimate",
    "NodeProfile",
    "Timing",
    "profile_nodes",
    "time_partition",
    "Grid",
    "DecisionTable",
    "PlanOptions",
    "Partition",
    "PlanBundle",
    "build_bundle",
    "load_bundle",
    "DeviceProfile",
    "measure_device",
    "refit_bundle",
    "DynamicShapeError",
    "ShapeBucket",
    "parse_input_shapes",
]
