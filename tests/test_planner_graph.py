"""ModelGraph: loading, naming, specs, constant-derived tensors."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import onnx
import pytest
from _models import constant_weights_model, dynamic_batch_model, if_model, light_model, save, two_io_model

from splitgate.planner import ModelGraph, TensorSpec
from splitgate.errors import InvalidArgument


def test_light_model_inputs_exclude_initializers() -> None:
    # IR 3 model: every weight is also listed as a graph input.
    g = ModelGraph.load(light_model("squeezenet"))
    assert g.inputs == [TensorSpec("data_0", "FP32", [1, 3, 224, 224])]
    assert g.outputs == [TensorSpec("softmaxout_1", "FP32", [1, 1000, 1, 1])]
    assert len(g.model.graph.input) > 1


def test_nodes_named_uniquely_and_stably(tmp_path: Path) -> None:
    path = save(dynamic_batch_model(), tmp_path / "m.onnx")
    a, b = ModelGraph.load(path), ModelGraph.load(path)
    names = [n.name for n in a.model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert names == [n.name for n in b.model.graph.node] == a.order
    assert set(a.graph.nodes) == set(names)


def test_graph_edges_carry_tensors_and_topological_order(tmp_path: Path) -> None:
    g = ModelGraph.load(save(dynamic_batch_model(), tmp_path / "m.onnx"))
    assert nx.is_directed_acyclic_graph(g.graph)
    assert g.order == list(nx.lexicographical_topological_sort(g.graph, key=lambda n: g.graph.nodes[n]["index"]))
    for u, v, data in g.graph.edges(data=True):
        assert data["tensor"] in g.node_outputs(u)
        assert data["tensor"] in g.node_inputs(v)
    assert g.inputs == [TensorSpec("x", "FP32", [-1, 2, 8, 8])]
    assert g.outputs == [TensorSpec("y", "FP32", [-1, 5])]


def test_unsorted_model_is_sorted() -> None:
    m = constant_weights_model()
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(reversed(nodes))
    g = ModelGraph.from_model(m)
    pos = {n: i for i, n in enumerate(g.order)}
    assert all(pos[u] < pos[v] for u, v in g.graph.edges)
    assert [n.name for n in g.model.graph.node] == g.order


def test_constant_nodes_are_constant_derived() -> None:
    g = ModelGraph.from_model(constant_weights_model())
    for t in ("W1", "b1", "W2t", "W2"):
        assert g.is_constant(t)
    for t in ("h1", "h3", "y"):
        assert not g.is_constant(t)
    transpose = g.producer["W2"]
    assert g.graph.nodes[transpose]["const"]


def test_two_inputs_int64() -> None:
    g = ModelGraph.from_model(two_io_model())
    assert g.inputs == [TensorSpec("x", "FP32", [-1, 3]), TensorSpec("ids", "INT64", [-1, 2])]
    assert [o.name for o in g.outputs] == ["logits", "score"]
    assert g.tensor_spec("t") == TensorSpec("t", "FP32", [-1, 4])


def test_subgraph_outer_scope_reads_are_edges() -> None:
    g = ModelGraph.from_model(if_model())
    assert "h" in g.node_inputs("if")
    assert g.graph.has_edge("relu", "if")


def test_external_data_model(tmp_path: Path) -> None:
    m = dynamic_batch_model()
    onnx.save(m, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").is_file()
    g = ModelGraph.load(tmp_path / "ext.onnx")
    assert all(t.raw_data for t in g.model.graph.initializer)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in g.model.graph.initializer)


def test_missing_or_garbage_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not found"):
        ModelGraph.load(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\x00garbage" * 10)
    with pytest.raises(InvalidArgument):
        ModelGraph.load(bad)
