"""splitgate planner: model graph -> cut points -> partitions -> plan bundle.

Public API::

    ModelGraph.load(path)            shape-inferred ONNX model as a networkx DAG
    TensorSpec(name, datatype, shape)
    chain_cuts(graph) -> [Cut]       single-tensor cut points
    Extractor(graph).prefix(tensors) / .suffix(tensors)   sub-models (ModelProto)
    extract_prefix(graph, tensors), extract_suffix(graph, tensors)  shortcuts
    build_bundle(model_path, out_dir) -> PlanBundle
    load_bundle(dir) / PlanBundle.load(dir) -> PlanBundle  (verified)

The model zoo (torch) lives in :mod:`planner.zoo` and is not imported here, so
``import planner`` needs only onnx, onnxruntime, networkx and numpy.
"""

from __future__ import annotations

from planner._bundle import Partition, PlanBundle, build_bundle, load_bundle
from planner._cuts import Cut, chain_cuts
from planner._extract import Extractor, extract_prefix, extract_suffix
from planner._graph import ModelGraph, TensorSpec

__all__ = [
    "ModelGraph",
    "TensorSpec",
    "Cut",
    "chain_cuts",
    "Extractor",
    "extract_prefix",
    "extract_suffix",
    "Partition",
    "PlanBundle",
    "build_bundle",
    "load_bundle",
]
