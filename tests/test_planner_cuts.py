"""Chain cuts and sub-model extraction: suffix(prefix(x)) == full(x) on real onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _models import (
    check_cuts,
    constant_weights_model,
    dynamic_batch_model,
    if_model,
    light_model,
    session,
    two_io_model,
)

from splitgate.planner import Cut, Extractor, ModelGraph, chain_cuts, extract_prefix, extract_suffix
from splitgate.planner._cuts import crossing_tensors
from splitgate.planner._graph import dummy_inputs
from splitgate.errors import InvalidArgument


def _feeds(g: ModelGraph, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    return dummy_inputs(g.inputs, dynamic=batch, seed=seed)


@pytest.mark.parametrize(
    ("name", "expected_cuts"),
    [("squeezenet", 33), pytest.param("resnet50", 39, marks=pytest.mark.slow)],
)
def test_light_models_every_cut_is_exact(name: str, expected_cuts: int) -> None:
    g = ModelGraph.load(light_model(name))
    cuts = chain_cuts(g)
    assert len(cuts) == expected_cuts
    # unoptimised sessions: the filler weights are not re-folded for each of ~80 sessions
    assert check_cuts(g, cuts, [_feeds(g, seed=1)], optimize=False) == expected_cuts


def test_cut_properties_on_a_dag() -> None:
    # ResNet-50: cuts only between residual blocks, never inside one.
    g = ModelGraph.load(light_model("resnet50"))
    cuts = chain_cuts(g)
    assert [c.index for c in cuts] == list(range(1, len(cuts) + 1))
    positions = [g.graph.nodes[g.producer[c.tensor]]["index"] for c in cuts]
    assert positions == sorted(positions)
    sizes = [c.device_nodes for c in cuts]
    assert sizes == sorted(sizes) and sizes[-1] < g.total_nodes
    for cut in cuts:
        assert crossing_tensors(g, cut.device_set) == {cut.tensor}
        assert len(cut.device_set) == cut.device_nodes
        assert not g.is_constant(cut.tensor)
        assert cut.tensor not in g.output_names
    # a tensor inside a residual block (one branch only) is not a cut
    sums = [n for n in g.order if g.node(n).op_type == "Sum"]
    inside = g.node_outputs(g.order[g.graph.nodes[sums[0]]["index"] - 2])[0]
    assert inside not in {c.tensor for c in cuts}


def test_constant_node_weights_split() -> None:
    g = ModelGraph.from_model(constant_weights_model())
    cuts = chain_cuts(g)
    assert [c.tensor for c in cuts] == ["h1", "h2", "h3", "h4"]
    # The Constant/Transpose nodes feeding the suffix are duplicated into it.
    suffix = extract_suffix(g, ["h3"])
    assert {n.op_type for n in suffix.graph.node} >= {"Constant", "Transpose", "MatMul"}
    assert check_cuts(g, cuts, [_feeds(g, batch=2), _feeds(g, batch=5, seed=3)]) == 8


def test_two_inputs_two_outputs_int64() -> None:
    g = ModelGraph.from_model(two_io_model())
    cuts = chain_cuts(g)
    # before 'h' both inputs are still needed downstream; 't' feeds both outputs.
    assert [c.tensor for c in cuts] == ["h", "t"]
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((4, 3)).astype(np.float32), "ids": rng.integers(0, 10, (4, 2))}
    assert check_cuts(g, cuts, [feeds]) == 2
    prefix = extract_prefix(g, ["h"])
    assert [i.name for i in prefix.graph.input] == ["x", "ids"]
    suffix = extract_suffix(g, ["t"])
    assert [o.name for o in suffix.graph.output] == ["logits", "score"]


def test_dynamic_batch_split_runs_batch_1_and_3() -> None:
    g = ModelGraph.from_model(dynamic_batch_model())
    cuts = chain_cuts(g)
    # the Shape-driven flatten runs in the suffix when cutting at r
    assert [c.tensor for c in cuts] == ["c1", "r1", "p1", "c2", "r", "flat"]
    for cut in cuts:
        prefix = Extractor(g).prefix([cut.tensor])
        dim0 = prefix.graph.output[0].type.tensor_type.shape.dim[0]
        assert not dim0.HasField("dim_value"), "batch dim must stay dynamic"
    assert check_cuts(g, cuts, [_feeds(g, batch=1), _feeds(g, batch=3, seed=7)]) == 12


def test_if_subgraph_outer_reads_block_cuts() -> None:
    g = ModelGraph.from_model(if_model())
    cuts = chain_cuts(g)
    assert [c.tensor for c in cuts] == ["h"]
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    assert check_cuts(g, cuts, [feeds]) == 1


def test_untyped_cut_tensor_is_probed_with_onnxruntime() -> None:
    m = dynamic_batch_model()
    g = ModelGraph.from_model(m, infer_shapes=False)
    assert g.value_info("p1") is None
    ex = Extractor(g)
    suffix = ex.suffix(["p1"])
    (vi,) = suffix.graph.input
    tt = vi.type.tensor_type
    assert tt.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    assert dims == [None, None, None, None]  # rank only: one run's sizes are never written into a model
    onnx.checker.check_model(suffix)
    x = _feeds(g, batch=3)
    full = session(m).run(None, x)[0]
    mid = session(ex.prefix(["p1"])).run(None, x)[0]
    np.testing.assert_allclose(session(suffix).run(None, {"p1": mid})[0], full, rtol=1e-4, atol=1e-5)


def test_extracted_models_keep_ir_and_opset() -> None:
    g = ModelGraph.load(light_model("squeezenet"))
    cut = chain_cuts(g)[5]
    for sub in (extract_prefix(g, [cut.tensor]), extract_suffix(g, [cut.tensor])):
        assert sub.ir_version == g.model.ir_version == 3
        assert [(o.domain, o.version) for o in sub.opset_import] == [("", 9)]
        onnx.checker.check_model(sub)


def test_bad_cut_arguments() -> None:
    g = ModelGraph.from_model(two_io_model())
    with pytest.raises(InvalidArgument, match="nope"):
        extract_prefix(g, ["nope"])
    with pytest.raises(InvalidArgument, match="ids"):
        extract_suffix(g, ["xw"])  # the suffix would still need graph input 'ids'
    with pytest.raises(InvalidArgument):
        extract_suffix(g, [])


def test_cut_dataclass() -> None:
    c = Cut(1, "t", 3)
    assert c.tensors == ("t",)
    assert c == Cut(1, "t", 3, frozenset({"a"}))


def test_model_without_chain_cuts(tmp_path) -> None:
    from onnx import TensorProto, helper

    from _models import IR_VERSION, OPSET, save
    from splitgate.planner import build_bundle

    # every stage reads the input again: no single tensor separates input from output
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Add", ["a", "x"], ["b"]),
        helper.make_node("Mul", ["b", "x"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "nocut", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=IR_VERSION)
    assert chain_cuts(ModelGraph.from_model(model)) == []
    bundle = build_bundle(save(model, tmp_path / "nocut.onnx"), tmp_path / "bundle")
    # (plus the cloud's encoded-input twins, cloud@fp16...: no split either)
    assert [p for p in bundle.partitions if not p.startswith("cloud@")] == ["cloud", "device"]
