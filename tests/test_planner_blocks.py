"""Dominator grouping: articulations, blocks, and block-by-block min-cut == one global min-cut == exhaustive."""

from __future__ import annotations

import random

import pytest
from _models import light_model, random_dag_model, two_io_model

from splitgate.planner import ModelGraph, chain_cuts
from splitgate.planner._mincut import CutProblem, exhaustive_cut, min_cut
from splitgate.planner._blocks import CLOUD, DEVICE, SPLIT, Link, articulations, decompose
from splitgate.planner._mincut import partition_cost


def _costs(p: CutProblem, seed: int, *, cloud: float = 0.3, per_byte: float = 0.05):
    r = random.Random(seed)
    dc = {u: r.random() for u in p.units}
    cc = {u: cloud * r.random() for u in p.units}
    tc = {t: per_byte * r.random() * p.nbytes[t] for t in p.tensors}
    return dc, cc, tc


def test_articulations_of_small_shapes() -> None:
    chain = [Link("x", -1, (0,), False), Link("a", 0, (1,), False), Link("b", 1, (2,), False), Link("y", 2, (), True)]
    assert articulations(3, chain) == [0, 1, 2]
    # diamond 0 -> {1, 2} -> 3: the branches are not articulations
    diamond = [Link("x", -1, (0,), False), Link("a", 0, (1, 2), False), Link("b", 1, (3,), False),
               Link("c", 2, (3,), False), Link("y", 3, (), True)]
    assert articulations(4, diamond) == [0, 3]
    # a graph input read late jumps over everything before its reader
    late_input = [Link("x", -1, (0, 2), False), Link("a", 0, (1,), False), Link("b", 1, (2,), False),
                  Link("y", 2, (), True)]
    assert articulations(3, late_input) == [2]
    # an output taken from the middle jumps over everything after it
    mid_output = [Link("x", -1, (0,), False), Link("a", 0, (1,), True), Link("b", 1, (2,), False),
                  Link("y", 2, (), True)]
    assert articulations(3, mid_output) == [0]
    # a dead branch (no reader, not an output) still reaches the sink
    dead = [Link("x", -1, (0,), False), Link("a", 0, (1, 2), False), Link("y", 1, (), True)]
    assert articulations(3, dead) == [0]


def test_blocks_partition_the_segments_and_enumerate_closed_states() -> None:
    diamond = [Link("x", -1, (0,), False), Link("a", 0, (1, 2), False), Link("b", 1, (3,), False),
               Link("c", 2, (3,), False), Link("y", 3, (), True)]
    blocks = decompose(4, diamond, [False, True, False, False])
    assert [(b.left, b.right, b.segs) for b in blocks] == [(-1, 0, ()), (0, 3, (1, 2)), (3, 4, ())]
    mid = blocks[1]
    assert mid.assignments is not None and len(mid.assignments) == 3 * 2  # seg 1 splits, seg 2 does not
    assert all(a[1] != SPLIT for a in mid.assignments)
    by_state = dict(zip(mid.assignments, mid.crossings or ()))
    names = [link.name for link in mid.links]
    assert sorted(names[i] for i in by_state[(CLOUD, CLOUD)]) == ["a"]
    assert sorted(names[i] for i in by_state[(DEVICE, DEVICE)]) == ["b", "c"]
    assert sorted(names[i] for i in by_state[(SPLIT, DEVICE)]) == ["c"]  # the split's own tensor is the chain's
    # the enumeration limit leaves a block to min-cut
    assert decompose(4, diamond, [False, True, False, False], limit=3)[1].assignments is None


@pytest.mark.parametrize("seed", range(16))
def test_block_min_cut_equals_global_flow_and_exhaustive(seed: int) -> None:
    g = ModelGraph.from_model(random_dag_model(8 + seed % 5, seed=100 + seed))
    p = CutProblem(g)
    flow_blocks = CutProblem(g)
    splittable = [len(s) > 1 for s in flow_blocks.segments]
    flow_blocks.blocks = decompose(len(flow_blocks.segments), flow_blocks.links, splittable, limit=0)
    for k in range(6):
        dc, cc, tc = _costs(p, seed * 7 + k, cloud=[0.05, 0.3, 1.0][k % 3], per_byte=[0.001, 0.05, 1.0][k // 2 % 3])
        best = exhaustive_cut(p, dc, cc, tc).cost
        for cut in (min_cut(p, dc, cc, tc), min_cut(flow_blocks, dc, cc, tc), min_cut(p, dc, cc, tc, decompose=False)):
            assert cut.cost == pytest.approx(best, rel=1e-9, abs=1e-9)
            assert p.is_closed(cut.device_set)
            assert cut.cost == pytest.approx(partition_cost(p, cut.device_set, dc, cc, tc))


def test_two_inputs_two_outputs_blocks() -> None:
    p = CutProblem(ModelGraph.from_model(two_io_model()))
    assert sum(len(b.segs) for b in p.blocks) + len(p.blocks) - 1 == len(p.segments)
    for k in range(8):
        dc, cc, tc = _costs(p, k, per_byte=[1e-4, 1e-2][k % 2])
        assert min_cut(p, dc, cc, tc).cost == pytest.approx(exhaustive_cut(p, dc, cc, tc).cost)


@pytest.mark.parametrize("name", ["resnet50", "inception_v2", "densenet121"])
def test_light_models_block_cut_equals_global_flow(name: str) -> None:
    g = ModelGraph.load(light_model(name))
    p = CutProblem(g)
    stats = p.stats()
    assert stats["articulations"] > 10 and stats["max_block_segments"] < stats["segments"] // 4
    arts = {b.left for b in p.blocks if b.left >= 0}
    # every chain cut's producer lies on an articulation segment (same dominator chain)
    for c in chain_cuts(g):
        assert p.segment_of[p.producer[c.tensor]] in arts
    for k, per_byte in enumerate((1e-6, 1e-4)):
        dc, cc, tc = _costs(p, k, cloud=0.2, per_byte=per_byte)
        fast, slow = min_cut(p, dc, cc, tc), min_cut(p, dc, cc, tc, decompose=False)
        assert fast.cost == pytest.approx(slow.cost, rel=1e-9)
        assert p.is_closed(fast.device_set)
