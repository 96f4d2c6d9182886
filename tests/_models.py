"""Hand-built ONNX models and helpers shared by the planner tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
OPSET = [helper.make_opsetid("", 17)]
# onnx 1.23 defaults to IR 14; onnxruntime 1.31 runs up to IR 13.
IR_VERSION = 10


def light_model(name: str) -> Path:
    """Path of one of the onnx wheel's light models, e.g. ``"squeezenet"``."""
    return LIGHT_DIR / f"light_{name}.onnx"


def session(model: onnx.ModelProto | Path | str, threads: int = 2, optimize: bool = True) -> ort.InferenceSession:
    """A CPU onnxruntime session with a small thread pool and quiet logs.

    ``optimize=False`` skips graph optimisation: much faster session start-up
    for the light models, whose filler weights are ConstantOfShape nodes that
    the optimiser would fold into initializers in every session.
    """
    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the given intermediate tensors."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    return m


def assert_close(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], what: str) -> None:
    """Compare named arrays with rtol 1e-4 and a small atol."""
    assert set(actual) == set(expected), what
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape, f"{what}: {name} shape {got.shape} != {want.shape}"
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"{what}: {name}")


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name + "_value"))


def constant_weights_model(seed: int = 0) -> onnx.ModelProto:
    """An MLP whose weights live in Constant nodes (no initializers), dynamic batch.

    x[N,4] -> MatMul W1 -> Add b1 -> Relu -> MatMul W2 -> Tanh -> y[N,3]; W2 is
    built from a Constant through Transpose (a constant-derived computed tensor).
    """
    rng = np.random.default_rng(seed)
    nodes = [
        _const("W1", rng.standard_normal((4, 8)).astype(np.float32)),
        _const("b1", rng.standard_normal(8).astype(np.float32)),
        _const("W2t", rng.standard_normal((3, 8)).astype(np.float32)),
        helper.make_node("Transpose", ["W2t"], ["W2"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "W1"], ["h1"]),
        helper.make_node("Add", ["h1", "b1"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["h3"]),
        helper.make_node("MatMul", ["h3", "W2"], ["h4"]),
        helper.make_node("Tanh", ["h4"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "const_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    return helper.make_model(graph, opset_imports=OPSET, ir_version=IR_VERSION)


def two_io_model(seed: int = 0) -> onnx.ModelProto:
    """Two inputs (float x[N,3], int64 ids[N,2]) and two outputs.

    emb = sum(table[ids]); h = x @ W + emb; t = Relu(h); logits = t @ W2; score = sum(t).
    """
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "table"),
        numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "W2"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["g"], axis=0),
        helper.make_node("ReduceSum", ["g", "axis1"], ["emb"], keepdims=0),
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "emb"], ["h"]),
        helper.make_node("Relu", ["h"], ["t"]),
        helper.make_node("MatMul", ["t", "W2"], ["logits"]),
        helper.make_node("ReduceSum", ["t", "axis1"], ["score"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "two_io",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 2]),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5]),
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
        ],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=OPSET, ir_version=IR_VERSION)


def dynamic_batch_model(seed: int = 0) -> onnx.ModelProto:
    """A conv net with a dynamic batch dim and a Shape-driven flatten.

    x[batch,2,8,8] -> Conv -> Relu -> MaxPool -> Conv -> Relu = r
    -> Reshape(r, [Shape(r)[0], -1]) -> Gemm -> y[batch,5]. Nodes are unnamed.
    """
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "k1"),
        numpy_helper.from_array(rng.standard_normal((6, 4, 3, 3)).astype(np.float32), "k2"),
        numpy_helper.from_array(rng.standard_normal((5, 6 * 4 * 4)).astype(np.float32) * 0.1, "fc"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "minus1"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "k1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "k2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r"]),
        helper.make_node("Shape", ["r"], ["shp"]),
        helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
        helper.make_node("Concat", ["n", "minus1"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["r", "flat_shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "dyn_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=OPSET, ir_version=IR_VERSION)


def if_model() -> onnx.ModelProto:
    """An If whose branches read the outer tensor ``h`` (an implicit input).

    h = Relu(x); g = Neg(h); cond = ReduceSum(g) < 0; y = If(cond, h + 1, h - 1).
    Only ``h`` is a chain cut: cutting at ``g`` would leave ``h`` crossing too.
    """
    one = numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")
    then_g = helper.make_graph(
        [helper.make_node("Add", ["h", "one"], ["t_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [2, 3])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Sub", ["h", "one"], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [2, 3])],
    )
    zero = numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zerof")
    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="relu"),
        helper.make_node("Neg", ["h"], ["g"], name="neg"),
        helper.make_node("ReduceSum", ["g"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Less", ["s", "zerof"], ["cond"], name="less"),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="if"),
    ]
    graph = helper.make_graph(
        nodes,
        "if_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[one, zero],
    )
    return helper.make_model(graph, opset_imports=OPSET, ir_version=IR_VERSION)


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Check and save a model; return its path."""
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def check_cuts(
    graph, cuts, feeds_list: Sequence[Mapping[str, np.ndarray]], threads: int = 2, optimize: bool = True
) -> int:
    """Prove suffix(prefix(x)) == full(x) for every cut and every feed.

    Also checks the prefix's output against the full model's intermediate
    tensor, so filler-weight models with near-constant outputs still test
    something. Returns the number of (cut, feed) pairs checked.
    """
    from splitgate.planner import Extractor

    ex = Extractor(graph)
    tensors = [c.tensor for c in cuts]
    outs = [o.name for o in graph.outputs]
    full = session(with_outputs(graph.model, tensors), threads, optimize)
    names = outs + [t for t in tensors if t not in outs]
    refs = [dict(zip(names, full.run(names, dict(f)))) for f in feeds_list]
    checked = 0
    for cut in cuts:
        pre = session(ex.prefix([cut.tensor]), threads, optimize)
        suf = session(ex.suffix([cut.tensor]), threads, optimize)
        assert [i.name for i in suf.get_inputs()] == [cut.tensor]
        assert [o.name for o in pre.get_outputs()] == [cut.tensor]
        for feeds, ref in zip(feeds_list, refs):
            what = f"cut-{cut.index} at {cut.tensor!r}"
            (mid,) = pre.run(None, {i.name: feeds[i.name] for i in pre.get_inputs()})
            assert_close({cut.tensor: mid}, {cut.tensor: ref[cut.tensor]}, what + " (prefix)")
            got = dict(zip(outs, suf.run(outs, {cut.tensor: mid})))
            assert_close(got, {o: ref[o] for o in outs}, what + " (suffix)")
            checked += 1
    return checked


def random_dag_model(n: int, seed: int = 0) -> onnx.ModelProto:
    """A random DAG of ``n`` elementwise nodes over two inputs, with fan-out and two outputs.

    Each node reads one or two earlier tensors (inputs included), so tensors
    with several consumers and skip connections are common. Weights come from
    a Constant node (constant-derived, never crossing).
    """
    rng = np.random.default_rng(seed)
    nodes = [_const("w", rng.standard_normal(4).astype(np.float32))]
    avail = ["a", "b"]
    for i in range(n):
        k = 1 if rng.random() < 0.4 else 2
        srcs = [avail[int(j)] for j in rng.choice(len(avail), size=min(k, len(avail)), replace=False)]
        out = f"t{i}"
        if len(srcs) == 1:
            op = ["Relu", "Neg", "Tanh"][int(rng.integers(3))]
            nodes.append(helper.make_node("Mul" if op == "Neg" else op, [srcs[0], "w"] if op == "Neg" else srcs, [out]))
        else:
            nodes.append(helper.make_node(["Add", "Mul", "Sub"][int(rng.integers(3))], srcs, [out]))
        avail.append(out)
    outs = [avail[-1], avail[-2]]
    graph = helper.make_graph(
        nodes,
        f"rdag{seed}",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 4]) for x in ("a", "b")],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", 4]) for o in outs],
    )
    return helper.make_model(graph, opset_imports=OPSET, ir_version=IR_VERSION)


def check_partition(graph, tensors: Sequence[str], feeds_list: Sequence[Mapping[str, np.ndarray]], optimize: bool = True) -> None:
    """Prove suffix(prefix(x)) == full(x) for a cut of several tensors."""
    from splitgate.planner import Extractor

    ex = Extractor(graph)
    outs = [o.name for o in graph.outputs]
    full = session(graph.model, optimize=optimize)
    pre = session(ex.prefix(list(tensors)), optimize=optimize)
    suf = session(ex.suffix(list(tensors)), optimize=optimize)
    assert sorted(i.name for i in suf.get_inputs()) == sorted(tensors)
    for feeds in feeds_list:
        want = dict(zip(outs, full.run(outs, dict(feeds))))
        mid = dict(zip([o.name for o in pre.get_outputs()], pre.run(None, {i.name: feeds[i.name] for i in pre.get_inputs()})))
        got = dict(zip(outs, suf.run(outs, {i.name: mid[i.name] for i in suf.get_inputs()})))
        assert_close(got, want, f"cut {list(tensors)}")


def normal_request(bundle, seed: int = 0) -> dict[str, np.ndarray]:
    """A request for a one-input float bundle: seeded standard normal values at its
    declared shape, dynamic dimensions at 1."""
    (spec,) = bundle.inputs
    shape = [d if d >= 0 else 1 for d in spec.shape]
    return {spec.name: np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}
