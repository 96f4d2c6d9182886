"""Enumerate cut points of a model graph.

A *cut* splits the nodes into a device set P (runs first, on the device) and the
rest (runs in the cloud); the tensors that flow from P to the rest are the
*crossing* tensors. Constant-derived tensors never cross: the extractor
recomputes them on the side that needs them.

This module holds the chain cuts (exactly one crossing tensor). DAG cuts with
several crossing tensors (s-t min-cut) will live alongside, returning the same
:class:`Cut` type with more than one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from splitgate.planner._graph import ModelGraph

__all__ = ["Cut", "chain_cuts", "crossing_tensors"]


@dataclass(frozen=True)
class Cut:
    """One single-tensor cut point.

    Attributes:
        index: 1-based position among the model's cuts, in topological order.
        tensor: the one tensor crossing from the device set to the rest.
        device_nodes: number of nodes in the device set P.
        device_set: names of the nodes in P (ancestor-closed).
    """

    index: int
    tensor: str
    device_nodes: int
    device_set: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    @property
    def tensors(self) -> tuple[str, ...]:
        """The crossing tensors (one, for a chain cut)."""
        return (self.tensor,)


def crossing_tensors(g: ModelGraph, device_set: set[str] | frozenset[str]) -> set[str]:
    """Tensors that must cross from ``device_set`` to the remaining nodes.

    These are non-constant tensors produced in ``device_set`` and consumed
    outside it (or being graph outputs), plus graph inputs consumed outside it.

    Args:
        g: the model graph.
        device_set: node names run on the device (should be ancestor-closed).

    Returns:
        The set of crossing tensor names.
    """
    outputs = set(g.output_names)
    crossing: set[str] = set()
    for name in device_set:
        for t in g.node_outputs(name):
            if g.is_constant(t):
                continue
            if t in outputs or any(c not in device_set for c in g.consumers.get(t, ())):
                crossing.add(t)
    for t in g.input_names:
        if t in outputs or any(c not in device_set for c in g.consumers.get(t, ())):
            crossing.add(t)
    return crossing


def chain_cuts(g: ModelGraph) -> list[Cut]:
    """All single-tensor cut points of a model, in topological order.

    A tensor t (produced by a node, depending on a graph input, not a graph
    output) is a cut when P = its producer plus all the producer's ancestors
    leaves other nodes to run and t is the only tensor crossing from P to
    them (see :func:`crossing_tensors`).

    Found in near-linear time: t's producer n has P's only way out exactly
    when n post-dominates a virtual source feeding every graph input's readers
    (every path from the inputs to the outputs goes through n), so the
    candidates are the post-dominator chain of that source (Lengauer-Tarjan /
    Cooper-Harvey-Kennedy via ``networkx.immediate_dominators`` on the
    reversed graph of non-constant nodes); each is then checked to hand on
    exactly one tensor.

    Args:
        g: the model graph.

    Returns:
        The cuts, ``index`` numbered from 1 in topological order; empty for a
        model with no single-tensor cut (e.g. one whose every stage reads a
        graph input).
    """
    outputs = set(g.output_names)
    inputs = set(g.input_names)
    total = g.total_nodes
    units = [n for n in g.order if not g.graph.nodes[n]["const"]]
    if not units:
        return []
    src, sink = ("__source__",), ("__sink__",)
    rev = nx.DiGraph()
    rev.add_nodes_from(units)
    rev.add_nodes_from((src, sink))
    for u in units:
        succs = [v for v in g.graph.successors(u) if not g.graph.nodes[v]["const"]]
        for v in succs:
            rev.add_edge(v, u)
        preds = [p for p in g.graph.predecessors(u) if not g.graph.nodes[p]["const"]]
        if not preds or inputs.intersection(g.node_inputs(u)):
            rev.add_edge(u, src)
        if not succs or outputs.intersection(g.node_outputs(u)):
            rev.add_edge(sink, u)
    idom = nx.immediate_dominators(rev, sink)
    if src not in idom:
        return []
    chain: list[str] = []
    n = idom[src]
    while n != sink:
        chain.append(n)
        n = idom[n]
    position = {name: i for i, name in enumerate(g.order)}
    cuts: list[Cut] = []
    # The chain nodes are nested (each is an ancestor of the next), so their
    # ancestor sets grow: one backward search over the whole walk, not one per cut.
    closed: set[str] = set()
    preds = g.graph.pred
    for name in sorted(chain, key=position.__getitem__):
        stack = [name]
        while stack:
            v = stack.pop()
            if v not in closed:
                closed.add(v)
                stack.extend(p for p in preds[v] if p not in closed)
        used = [
            t for t in g.node_outputs(name)
            if not g.is_constant(t) and (t in outputs or g.consumers.get(t))
        ]
        if len(used) != 1 or used[0] in outputs or len(closed) >= total:
            continue
        device_set = frozenset(closed)
        cuts.append(Cut(len(cuts) + 1, used[0], len(device_set), device_set))
    return cuts
