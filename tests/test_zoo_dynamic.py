"""The dynamic-shape zoo models: symbolic dims, exact at every valid shape, Constant weights, a value-driven If."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

pytest.importorskip("torch")

import torch  # noqa: E402

from splitgate.planner.zoo import (  # noqa: E402
    DYNAMIC_MODELS,
    ZOO_MODELS,
    build_zoo_module,
    export_zoo_model,
    make_inputs,
    write_samples,
)
from splitgate.errors import InvalidArgument  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("zoo_dynamic")
    return {name: export_zoo_model(name, d / f"{name}.onnx") for name in DYNAMIC_MODELS}


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _torch_outputs(name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    spec = build_zoo_module(name)
    with torch.no_grad():
        out = spec.module(*[torch.from_numpy(feeds[n]) for n in spec.input_names])
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in dims]


def test_dynamic_models_are_zoo_models() -> None:
    assert set(DYNAMIC_MODELS) == {"detector_dyn", "crnn_dyn", "transformer_dyn", "gru_state", "if_value"}
    assert set(DYNAMIC_MODELS) <= set(ZOO_MODELS)
    for case in DYNAMIC_MODELS.values():
        assert len(case.other) == 2 and case.planned
        assert not any(o in case.planned for o in case.other)


@pytest.mark.parametrize("name", sorted(DYNAMIC_MODELS))
def test_dynamic_dims_are_symbolic(exported: dict[str, Path], name: str) -> None:
    model = onnx.load(str(exported[name]))
    assert model.opset_import[0].version >= 17
    inputs = {i.name: i for i in model.graph.input}
    case = DYNAMIC_MODELS[name]
    assert set(inputs) == set(case.static)
    for inp, static in case.static.items():
        dims = _dims(inputs[inp])
        assert len(dims) == len(static)
        for axis, want in enumerate(static):
            if axis in case.dynamic.get(inp, {}):
                assert isinstance(dims[axis], str), f"{inp} axis {axis} should be symbolic, is {dims[axis]}"
            else:
                assert dims[axis] == want, f"{inp} axis {axis} should be {want}, is {dims[axis]}"
    # shared dims keep one name across inputs (e.g. gru_state's batch, axis 0 of x and axis 1 of h0)
    names: dict[str, set[str]] = {}
    for inp, axes in case.dynamic.items():
        for axis, dim in axes.items():
            names.setdefault(dim, set()).add(str(_dims(inputs[inp])[axis]))
    assert all(len(v) == 1 for v in names.values()), names


@pytest.mark.parametrize("name", sorted(DYNAMIC_MODELS))
def test_onnx_equals_torch_at_planned_and_other_shapes(exported: dict[str, Path], name: str) -> None:
    case = DYNAMIC_MODELS[name]
    sess = _session(exported[name])
    for i, shapes in enumerate(case.planned + case.other):
        feeds = make_inputs(name, shapes, seed=i)
        got = sess.run(None, feeds)
        want = _torch_outputs(name, feeds)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"{name} at {shapes}")
            assert np.isfinite(g).all() and g.std() > 1e-4, f"{name} at {shapes}: degenerate output"


def test_output_shapes_follow_the_inputs(exported: dict[str, Path]) -> None:
    image = make_inputs("detector_dyn", {"image": (2, 3, 120, 100)})
    heatmap, boxes = _session(exported["detector_dyn"]).run(None, image)
    assert heatmap.shape == (2, 4, 15, 13) and boxes.shape == (2, 4, 15, 13)
    (logits,) = _session(exported["crnn_dyn"]).run(None, make_inputs("crnn_dyn", {"image": (1, 1, 32, 100)}))
    assert logits.shape == (1, 25, 37)
    shapes = {"tokens": (3, 37), "attention_mask": (3, 37)}
    logits, pooled = _session(exported["transformer_dyn"]).run(None, make_inputs("transformer_dyn", shapes))
    assert logits.shape == (3, 37, 512) and pooled.shape == (3, 64)
    y, h_n = _session(exported["gru_state"]).run(None, make_inputs("gru_state", {"x": (3, 7, 16), "h0": (2, 3, 32)}))
    assert y.shape == (3, 7, 32) and h_n.shape == (2, 3, 32)
    np.testing.assert_allclose(h_n[-1], y[:, -1], rtol=1e-5, atol=1e-6)  # the last layer's state is its last step


def test_detector_weights_are_constant_nodes(exported: dict[str, Path]) -> None:
    graph = onnx.load(str(exported["detector_dyn"])).graph
    assert len(graph.initializer) == 0
    constants = [n for n in graph.node if n.op_type == "Constant"]
    weights = sum(int(np.prod(c.attribute[0].t.dims)) for c in constants)
    assert weights > 50_000, "the conv weights should live in Constant nodes"
    assert graph.node[0].op_type == "Constant"
    assert {"Conv", "Concat", "Add"} <= {n.op_type for n in graph.node}  # a DAG: residual and concatenated skip


def test_transformer_honours_the_mask(exported: dict[str, Path]) -> None:
    sess = _session(exported["transformer_dyn"])
    feeds = make_inputs("transformer_dyn", {"tokens": (2, 16), "attention_mask": (2, 16)}, seed=3)
    assert (feeds["attention_mask"] == 0).any() and (feeds["attention_mask"] == 1).any()
    assert feeds["tokens"].min() >= 0 and feeds["tokens"].max() < 512
    logits, pooled = sess.run(None, feeds)
    changed = {k: v.copy() for k, v in feeds.items()}
    changed["tokens"][feeds["attention_mask"] == 0] = 7  # padding content must not matter to real tokens
    logits2, pooled2 = sess.run(None, changed)
    real = feeds["attention_mask"].astype(bool)
    np.testing.assert_allclose(logits2[real], logits[real], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pooled2, pooled, rtol=1e-4, atol=1e-4)


def test_if_value_has_an_if_with_both_branches_reachable(exported: dict[str, Path]) -> None:
    graph = onnx.load(str(exported["if_value"])).graph
    assert "If" in {n.op_type for n in graph.node}
    sess = _session(exported["if_value"])
    module = build_zoo_module("if_value").module
    for n, branch in ((16, module.long_frames), (4, module.short_frames)):
        feeds = make_inputs("if_value", {"x": (2, 256), "n": ()}, seed=n, n=n)
        (got,) = sess.run(None, feeds)
        with torch.no_grad():
            want = branch(torch.from_numpy(feeds["x"]).reshape(2, -1, 2, n // 2)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"n={n}")
    for dummy in (0, 1):  # what dummy inputs hold (zeros, ones) is not a valid length
        with pytest.raises(Exception, match="Reshape"):
            sess.run(None, {"x": np.zeros((1, 256), np.float32), "n": np.array(dummy, np.int64)})
    for bad in (3, 5, 1):
        with pytest.raises(InvalidArgument, match="even divisor"):
            make_inputs("if_value", {"x": (1, 100), "n": ()}, n=bad)


def test_write_samples_gives_arrays_onnxruntime_accepts(exported: dict[str, Path], tmp_path: Path) -> None:
    for name, case in DYNAMIC_MODELS.items():
        shapes = case.planned[0]
        path = write_samples(name, shapes, tmp_path / f"{name}.npz", n=4)
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        assert set(arrays) == set(shapes)
        sess = _session(exported[name])
        for k, a in arrays.items():
            assert a.shape == (4, *shapes[k])
        for i in range(4):
            outs = sess.run(None, {k: np.asarray(a[i]) for k, a in arrays.items()})  # a[i] of [n] is a numpy scalar
            assert all(np.isfinite(o).all() for o in outs)
    with np.load(tmp_path / "if_value.npz") as data:
        lengths = data["n"]
    assert (lengths > 8).any() and (lengths <= 8).any(), "the samples should cover both If branches"


def test_make_inputs_rejects_shapes_that_do_not_fit() -> None:
    with pytest.raises(InvalidArgument, match="shape"):
        make_inputs("crnn_dyn", {"image": (1, 1, 64, 128)})
    with pytest.raises(InvalidArgument, match="batch"):
        make_inputs("gru_state", {"x": (2, 5, 16), "h0": (2, 3, 32)})
    with pytest.raises(InvalidArgument, match="inputs"):
        make_inputs("transformer_dyn", {"tokens": (1, 8)})
    with pytest.raises(InvalidArgument, match="not a dynamic zoo model"):
        make_inputs("resnet18", {"input": (1, 3, 64, 64)})
    with pytest.raises(InvalidArgument, match="positions"):
        make_inputs("transformer_dyn", {"tokens": (1, 600), "attention_mask": (1, 600)})


def test_fixed_batch_export_respects_each_batch_axis(tmp_path: Path) -> None:
    path = export_zoo_model("gru_state", tmp_path / "gru1.onnx", batch_dynamic=False)
    inputs = {i.name: _dims(i) for i in onnx.load(str(path)).graph.input}
    assert inputs["x"][0] == 1 and isinstance(inputs["x"][1], str)
    assert inputs["h0"] == [2, 1, 32]
    with pytest.raises(InvalidArgument, match="legacy"):
        export_zoo_model("if_value", tmp_path / "never.onnx", exporter="dynamo")
