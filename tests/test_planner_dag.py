"""DAG partitions: DADS min-cut == exhaustive enumeration; DAG cuts run exactly on real onnxruntime."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from _models import check_partition, constant_weights_model, if_model, light_model, random_dag_model, two_io_model

from splitgate.planner import ModelGraph, chain_cuts
from splitgate.planner._mincut import CutProblem, exhaustive_cut, min_cut
from splitgate.planner._graph import dummy_inputs
from splitgate.planner._mincut import down_sets, partition_cost
from splitgate.errors import InvalidArgument


def _costs(p: CutProblem, seed: int, *, cloud: float = 0.3, per_byte: float = 0.05):
    r = random.Random(seed)
    dc = {u: r.random() for u in p.units}
    cc = {u: cloud * r.random() for u in p.units}
    tc = {t: per_byte * r.random() * p.nbytes[t] for t in p.tensors}
    return dc, cc, tc


@pytest.mark.parametrize("seed", range(12))
def test_min_cut_equals_exhaustive_on_random_dags(seed: int) -> None:
    g = ModelGraph.from_model(random_dag_model(9 + seed % 4, seed=seed))
    p = CutProblem(g)
    assert len(p.units) == 9 + seed % 4  # the Constant weight takes no part
    for k in range(6):
        dc, cc, tc = _costs(p, seed * 10 + k, cloud=[0.05, 0.3, 1.0][k % 3], per_byte=[0.001, 0.05, 1.0][k // 2 % 3])
        fast, slow = min_cut(p, dc, cc, tc), exhaustive_cut(p, dc, cc, tc)
        assert fast.cost == pytest.approx(slow.cost, rel=1e-9, abs=1e-9)
        assert p.is_closed(fast.device_set)
        assert fast.cost == pytest.approx(partition_cost(p, fast.device_set, dc, cc, tc))


def test_shared_tensor_is_sent_once() -> None:
    # 'h' feeds both outputs' branches: sending it costs once, not twice
    g = ModelGraph.from_model(two_io_model())
    p = CutProblem(g)
    assert sorted(p.consumers["t"]) == ["MatMul_5", "ReduceSum_6"]
    big = {u: 100.0 for u in p.units}
    dev = {u: (0.0 if u in {"Gather_0", "ReduceSum_1", "MatMul_2", "Add_3", "Relu_4"} else 100.0) for u in p.units}
    cut = min_cut(p, dev, {u: 1.0 for u in p.units} | {"Gather_0": 50.0}, {t: 1.0 for t in p.tensors})
    assert cut.tensors == ("t",)
    # cost = device(0) + cloud(MatMul_5 + ReduceSum_6 = 2) + t once (1)
    assert cut.cost == pytest.approx(3.0)
    assert min_cut(p, big, {u: 0.0 for u in p.units}, {t: 0.0 for t in p.tensors}).device_set == frozenset()


def test_control_flow_node_is_atomic_and_outer_reads_count() -> None:
    g = ModelGraph.from_model(if_model())
    p = CutProblem(g)
    assert "if" in p.units and "h" in p.reads["if"]  # implicit outer-scope input
    for s in down_sets(p):
        if "if" not in s and "relu" in s:
            assert "h" in p.crossing(s)


def test_constant_weights_never_cross() -> None:
    g = ModelGraph.from_model(constant_weights_model())
    p = CutProblem(g)
    assert all(not g.is_constant(t) for t in p.tensors)
    assert [s for s in p.segments if len(s) > 1] == [["MatMul_4", "Add_5", "Relu_6", "MatMul_7", "Tanh_8"]]
    for k in range(5):
        dc, cc, tc = _costs(p, k)
        assert min_cut(p, dc, cc, tc).cost == pytest.approx(exhaustive_cut(p, dc, cc, tc).cost)


def test_enumeration_limit() -> None:
    p = CutProblem(ModelGraph.from_model(random_dag_model(30, seed=1)))
    with pytest.raises(InvalidArgument, match="too many"):
        exhaustive_cut(p, {}, {}, {}, limit=50)


def _dag_cut_near(p: CutProblem, g: ModelGraph, fraction: float) -> tuple[str, ...]:
    """Crossing tensors of the ancestor closure of the first unit from ``fraction`` of the
    order on whose cut has several tensors (else the last one tried)."""
    import networkx as nx

    units = set(p.units)
    tensors: tuple[str, ...] = ()
    for u in p.units[int(len(p.units) * fraction) :][:40]:
        device = frozenset(a for a in nx.ancestors(g.graph, u) | {u} if a in units)
        tensors = p.crossing(device)
        if len(tensors) >= 2:
            break
    return tensors


@pytest.mark.parametrize("name", ["squeezenet", "resnet50", "inception_v1", "inception_v2", "densenet121"])
def test_light_model_dag_cuts_are_exact(name: str) -> None:
    g = ModelGraph.load(light_model(name))
    p = CutProblem(g)
    chain = chain_cuts(g)
    # min-cut under several cost mixes never loses to any chain cut
    for k, per_byte in enumerate((1e-7, 1e-5, 1e-3)):
        dc, cc, tc = _costs(p, k, cloud=0.2, per_byte=per_byte)
        cut = min_cut(p, dc, cc, tc)
        assert p.is_closed(cut.device_set)
        for c in chain[:: max(1, len(chain) // 8)]:
            dev = frozenset(u for u in c.device_set if u in set(p.units))
            assert cut.cost <= partition_cost(p, dev, dc, cc, tc) + 1e-9
    # a cut through a block (several tensors) runs exactly
    tensors = _dag_cut_near(p, g, 0.5)
    if name != "squeezenet":
        assert len(tensors) >= 2, tensors
    check_partition(g, tensors, [dummy_inputs(g.inputs, seed=1)], optimize=False)


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from splitgate.planner.zoo import export_zoo_model

    d = tmp_path_factory.mktemp("zoo-dag")
    for name in ("transformer", "lstm"):
        export_zoo_model(name, d / f"{name}.onnx")
    return d


def test_transformer_dag_cuts(zoo_dir: Path) -> None:
    g = ModelGraph.load(zoo_dir / "transformer.onnx")
    assert g.inputs[0].datatype == "INT64" and g.inputs[0].shape == [-1, -1]
    p = CutProblem(g)
    rng = np.random.default_rng(0)
    feeds = [{"tokens": rng.integers(0, 100, (1, 5))}, {"tokens": rng.integers(0, 100, (3, 9))}]
    cuts = {_dag_cut_near(p, g, f) for f in (0.3, 0.5, 0.7)}
    assert any(len(c) >= 2 for c in cuts), cuts  # residual streams: cuts of several tensors
    for tensors in cuts:
        check_partition(g, tensors, feeds)
    dc, cc, tc = _costs(p, 3, cloud=0.1, per_byte=1e-3)
    cut = min_cut(p, dc, cc, tc)
    if 0 < len(cut.device_set) < len(p.units):
        check_partition(g, cut.tensors, feeds)


def test_lstm_is_atomic_and_splits(zoo_dir: Path) -> None:
    g = ModelGraph.load(zoo_dir / "lstm.onnx")
    p = CutProblem(g)
    (lstm,) = [u for u in p.units if g.node(u).op_type == "LSTM"]
    rng = np.random.default_rng(0)
    feeds = [{"input": rng.standard_normal((1, 4, 16)).astype(np.float32)},
             {"input": rng.standard_normal((3, 7, 16)).astype(np.float32)}]
    for c in chain_cuts(g):
        check_partition(g, (c.tensor,), feeds)
    dc = {u: (5.0 if u == lstm else 0.1) for u in p.units}
    cut = min_cut(p, dc, {u: 0.5 for u in p.units}, {t: 1e-4 * p.nbytes[t] for t in p.tensors})
    assert lstm not in cut.device_set and cut.device_set  # the expensive LSTM goes to the cloud whole
    check_partition(g, cut.tensors, feeds)
