"""Dynamic batching rules (cloud._batch): which requests share a run, and that
splitting a batched run gives each request exactly its own rows. Pure numpy +
onnxruntime, no Ray (except the drain queue's test: ``cloud._app`` imports Ray Serve)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from splitgate.cloud._batch import Item, group_batches, run_group


def _session(mix_rows: bool = False) -> ort.InferenceSession:
    """y = relu(x @ W); with ``mix_rows`` y = sum over the batch (rows not independent)."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["r"])]
    if mix_rows:
        axes = numpy_helper.from_array(np.array([0], dtype=np.int64), "axes")
        nodes.append(helper.make_node("ReduceSum", ["r", "axes"], ["y"], keepdims=1))
        inits = [w, axes]
    else:
        nodes.append(helper.make_node("Identity", ["r"], ["y"]))
        inits = [w]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _item(x: np.ndarray, key: str = "m/cut-1", dynamic: bool = True) -> Item:
    return Item(key=key, feeds={"x": x}, outputs=("y",), batchable_inputs=frozenset({"x"} if dynamic else ()))


def test_grouping_by_suffix_shape_and_size_limit() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1, 4)).astype(np.float32)
    items = [
        _item(a),  # 0
        _item(a, key="m/cut-2"),  # 1: another suffix
        _item(rng.standard_normal((2, 4)).astype(np.float32)),  # 2: same suffix, 2 rows
        _item(a, dynamic=False),  # 3: fixed batch dim -> alone
        _item(rng.standard_normal((1, 5)).astype(np.float32)),  # 4: other trailing dims
        _item(a.astype(np.float64)),  # 5: other dtype
        _item(a),  # 6: would exceed 4 rows with 0+2+6? (1+2+1=4 fits)
        _item(a),  # 7: 5th row -> new group
    ]
    groups = group_batches(items, max_batch_size=4)
    assert [0, 2, 6] in groups
    assert [1] in groups and [3] in groups and [4] in groups and [5] in groups
    assert [7] in groups
    assert sorted(i for g in groups for i in g) == list(range(len(items)))


def test_batched_run_splits_back_to_each_request() -> None:
    sess = _session()
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((n, 4)).astype(np.float32) for n in (1, 3, 2)]
    items = [_item(x) for x in xs]
    calls: list[int] = []

    def run(outputs, feeds):
        calls.append(feeds["x"].shape[0])
        return sess.run(list(outputs), feeds)

    results = run_group(items, run)
    assert calls == [6], "one onnxruntime run for the whole group"
    for x, (y,) in zip(xs, results):
        np.testing.assert_allclose(y, sess.run(["y"], {"x": x})[0], rtol=1e-6)
        assert y.shape == (x.shape[0], 3)


def test_graph_mixing_rows_falls_back_to_single_runs() -> None:
    sess = _session(mix_rows=True)
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((2, 4)).astype(np.float32) for _ in range(3)]
    calls: list[int] = []

    def run(outputs, feeds):
        calls.append(feeds["x"].shape[0])
        return sess.run(list(outputs), feeds)

    results = run_group([_item(x) for x in xs], run)
    assert calls == [6, 2, 2, 2], "batched output had 1 row, not 6: rerun singly"
    for x, (y,) in zip(xs, results):
        np.testing.assert_allclose(y, sess.run(["y"], {"x": x})[0], rtol=1e-6)


@pytest.mark.integration  # cloud._app imports Ray Serve (seconds); `make test-fast` leaves it out
def test_drain_queue_batches_what_queued_while_busy_and_answers_each() -> None:
    """The replica's drain batcher: a compute thread that was busy takes every
    request queued meanwhile as one batch; each caller gets its own result, and
    a failing batch answers every caller instead of hanging."""
    import asyncio
    import threading

    from splitgate.cloud._app import _DrainQueue

    started, gate = threading.Event(), threading.Event()
    batches: list[list[str]] = []

    def work(entries: list) -> list:
        started.set()
        gate.wait(30)
        batches.append([request for request, _ in entries])
        if any(request == "boom" for request, _ in entries):
            raise RuntimeError("bug")
        return [(True, (request, depth)) for request, depth in entries]

    async def main() -> list:
        queue = _DrainQueue(work, max_rows=8, threads=1)
        first = queue.submit("a", 1)
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)
        rest = [queue.submit(f"r{i}", i + 2) for i in range(5)]
        gate.set()
        answers = await asyncio.gather(first, *rest)
        failed = await queue.submit("boom", 1)
        return [answers, failed]

    answers, failed = asyncio.run(main())
    assert batches[:2] == [["a"], ["r0", "r1", "r2", "r3", "r4"]]
    assert answers == [(True, ("a", 1))] + [(True, (f"r{i}", i + 2)) for i in range(5)]
    assert failed[0] is False and isinstance(failed[1], RuntimeError)
