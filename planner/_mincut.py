"""DAG-aware partitions: s-t min-cut (DADS) and exhaustive enumeration.

A *partition* is a set P of device nodes closed under predecessors; its *cut*
is the set of non-constant tensors produced in P (or graph inputs) that are
read outside P or are graph outputs. A tensor read by several cloud nodes is
sent once; constant-derived tensors never cross (each side recomputes them),
so constant-derived nodes take no part in partitioning. Control-flow nodes
(If/Loop/Scan) are single top-level nodes and so atomic.

The optimal partition for a linear cost (device cost per node on the device,
cloud cost per node in the cloud, transfer cost per crossing tensor) is an s-t
minimum cut of a flow network built as in DADS (Hu et al., "Dynamic Adaptive
DNN Surgery for Inference Acceleration on the Edge", INFOCOM'19):

* node v gets ``s -> v`` with its cloud cost and ``v -> t`` with its device cost
  (v on the source side = on the device, pays its device cost);
* a tensor x with several consumers is split into an auxiliary vertex:
  ``producer -> x`` carries x's transfer cost once, ``x -> consumer`` is infinite;
* every data edge gets an infinite reverse edge ``consumer -> producer``, so a
  device node's predecessors are on the device too (closure);
* graph inputs hang off ``s`` (data starts on the device); graph outputs are
  tied to ``t`` (an output computed on the device still travels with the cut).

Graphs are first coarsened exactly: every maximal chain of nodes joined by
single-consumer tensors is replaced by two vertices whose three possible
states (all device, all cloud, split at the chain's best tensor) cost what the
chain would. Chains are where most nodes of CNNs and transformers sit, so the
flow network shrinks several-fold without losing optimality.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import networkx as nx
from networkx.algorithms.flow import boykov_kolmogorov

from planner._graph import ModelGraph
from splitgate.errors import InvalidArgument

__all__ = ["CutProblem", "DagCut", "min_cut", "exhaustive_cut", "partition_cost", "down_sets"]

# Bytes assumed for a tensor whose size is unknown (e.g. strings): never worth sending.
UNKNOWN_BYTES = 1 << 40


@dataclass(frozen=True)
class DagCut:
    """A partition found by :func:`min_cut` or :func:`exhaustive_cut`.

    Attributes:
        device_set: non-constant nodes run on the device (predecessor-closed).
        tensors: crossing tensors, graph inputs first, then in topological order.
        cost: the partition's cost under the costs it was solved for.
    """

    device_set: frozenset[str]
    tensors: tuple[str, ...]
    cost: float


class CutProblem:
    """The partitioning structure of a model, built once and solved many times.

    Args:
        g: the model graph.
        tensor_bytes: bytes of each tensor; default: from shape inference
            (dynamic dims as 1; unknown sizes as :data:`UNKNOWN_BYTES`).

    Attributes:
        units: non-constant nodes, topological order.
        tensors: non-constant tensors that are graph inputs or produced by a unit
            and read by a unit or being a graph output.
        producer: tensor -> producing unit (None for a graph input).
        consumers: tensor -> units reading it (each once).
        outputs: tensors that are graph outputs.
        nbytes: tensor -> bytes per sample.
        segments: the chain coarsening: lists of units, each a maximal chain.
    """

    def __init__(self, g: ModelGraph, tensor_bytes: Mapping[str, int] | None = None) -> None:
        self.g = g
        self.units: list[str] = [n for n in g.order if not g.graph.nodes[n]["const"]]
        unit_set = set(self.units)
        self.outputs: frozenset[str] = frozenset(g.output_names)
        self.producer: dict[str, str | None] = {}
        self.consumers: dict[str, list[str]] = {}
        self.reads: dict[str, list[str]] = {}
        self.writes: dict[str, list[str]] = {u: [] for u in self.units}
        for t in g.input_names:
            self.producer[t] = None
        for u in self.units:
            for t in g.node_outputs(u):
                if not g.is_constant(t):
                    self.producer[t] = u
        for u in self.units:
            ins = [t for t in dict.fromkeys(g.node_inputs(u)) if t in self.producer]
            self.reads[u] = ins
            for t in ins:
                self.consumers.setdefault(t, []).append(u)
        self.tensors: list[str] = [
            t for t in self.producer if self.consumers.get(t) or t in self.outputs
        ]
        for t in self.tensors:
            p = self.producer[t]
            if p is not None:
                self.writes[p].append(t)
        self.nbytes: dict[str, int] = {}
        for t in self.tensors:
            if tensor_bytes is not None and t in tensor_bytes:
                self.nbytes[t] = int(tensor_bytes[t])
                continue
            spec = g.tensor_spec(t)
            n = spec.nbytes() if spec is not None and (spec.shape or t in g.input_names) else None
            self.nbytes[t] = UNKNOWN_BYTES if n is None else n
        self.preds: dict[str, set[str]] = {
            u: {p for t in self.reads[u] if (p := self.producer[t]) is not None} for u in self.units
        }
        assert unit_set >= {p for ps in self.preds.values() for p in ps}
        self.segments: list[list[str]] = self._chains()
        self.segment_of: dict[str, int] = {u: i for i, seg in enumerate(self.segments) for u in seg}

    # -- structure --------------------------------------------------------------

    def _link(self, u: str) -> str | None:
        """The unit u hands its only tensor to, when u -> v is a chain link."""
        outs = self.writes[u]
        if len(outs) != 1:
            return None
        t = outs[0]
        cons = self.consumers.get(t, [])
        if t in self.outputs or len(cons) != 1:
            return None
        v = cons[0]
        return v if self.reads[v] == [t] else None

    def _chains(self) -> list[list[str]]:
        nxt = {u: self._link(u) for u in self.units}
        has_prev = {v for v in nxt.values() if v is not None}
        segments: list[list[str]] = []
        for u in self.units:
            if u in has_prev:
                continue
            seg = [u]
            while (v := nxt[seg[-1]]) is not None:
                seg.append(v)
            segments.append(seg)
        return segments

    def crossing(self, device_set: frozenset[str] | set[str]) -> tuple[str, ...]:
        """Tensors crossing from ``device_set`` to the rest, inputs first then topological.

        Args:
            device_set: units on the device (should be predecessor-closed).

        Returns:
            Non-constant tensors produced on the device (or graph inputs) and
            read by a cloud unit or being graph outputs; empty when every unit is
            on the device (the device-only partition sends nothing).
        """
        if len(device_set) >= len(self.units) and set(self.units) <= set(device_set):
            return ()
        out: list[str] = []
        for t in self.tensors:
            p = self.producer[t]
            if p is not None and p not in device_set:
                continue
            if t in self.outputs or any(c not in device_set for c in self.consumers.get(t, ())):
                out.append(t)
        return tuple(out)

    def is_closed(self, device_set: frozenset[str] | set[str]) -> bool:
        """True if every device unit's producers are on the device too."""
        return all(self.preds[u] <= device_set for u in device_set)

    def stats(self) -> dict[str, int]:
        """Sizes before and after coarsening (nodes, units, segments, flow vertices)."""
        chains = sum(1 for s in self.segments if len(s) > 1)
        return {
            "nodes": self.g.total_nodes,
            "units": len(self.units),
            "segments": len(self.segments),
            "flow_vertices": len(self.segments) + chains
            + sum(1 for t in self.tensors if len(self.consumers.get(t, ())) + (t in self.outputs) > 1) + 2,
        }


def partition_cost(
    problem: CutProblem,
    device_set: frozenset[str] | set[str],
    device_cost: Mapping[str, float],
    cloud_cost: Mapping[str, float],
    tensor_cost: Mapping[str, float],
) -> float:
    """Cost of a partition: device costs of P, cloud costs of the rest, transfer of its cut.

    The all-device set is charged for sending the graph outputs (as the flow
    network does); the device-only *partition* sends nothing and is costed by
    the caller.
    """
    total = sum(device_cost.get(u, 0.0) if u in device_set else cloud_cost.get(u, 0.0) for u in problem.units)
    for t in problem.tensors:
        p = problem.producer[t]
        if p is not None and p not in device_set:
            continue
        if t in problem.outputs or any(c not in device_set for c in problem.consumers.get(t, ())):
            total += tensor_cost.get(t, 0.0)
    return total


def min_cut(
    problem: CutProblem,
    device_cost: Mapping[str, float],
    cloud_cost: Mapping[str, float],
    tensor_cost: Mapping[str, float],
) -> DagCut:
    """Optimal predecessor-closed partition by s-t min-cut (DADS, INFOCOM'19).

    Args:
        problem: the model's :class:`CutProblem`.
        device_cost: unit -> cost of running it on the device (>= 0; missing = 0).
        cloud_cost: unit -> cost of running it in the cloud (>= 0; missing = 0).
        tensor_cost: tensor -> cost of sending it once (>= 0; missing = 0).

    Returns:
        The cheapest partition. Its device set may be every unit (then its cut
        is the graph outputs) or empty (the cut is the graph inputs).

    Raises:
        InvalidArgument: a negative cost.
    """
    inf_edges: list[tuple[object, object]] = []
    cap: dict[tuple[object, object], float] = {}

    def add(u: object, v: object, c: float) -> None:
        if c < 0:
            raise InvalidArgument(f"min-cut costs must be >= 0, got {c} on {u}->{v}")
        if c > 0:
            cap[(u, v)] = cap.get((u, v), 0.0) + c

    split_at: dict[int, int] = {}
    head: dict[int, object] = {}
    tail: dict[int, object] = {}
    for i, seg in enumerate(problem.segments):
        d = [device_cost.get(u, 0.0) for u in seg]
        c = [cloud_cost.get(u, 0.0) for u in seg]
        if len(seg) == 1:
            head[i] = tail[i] = ("u", i)
            add("s", ("u", i), c[0])
            add(("u", i), "t", d[0])
            continue
        d_all, c_all = sum(d), sum(c)
        best, best_k, dp, cs = float("inf"), 1, 0.0, c_all
        for k in range(1, len(seg)):
            dp += d[k - 1]
            cs -= c[k - 1]
            t = problem.writes[seg[k - 1]][0]
            val = dp + tensor_cost.get(t, 0.0) + cs
            if val < best:
                best, best_k = val, k
        split_at[i] = best_k
        a, b = ("a", i), ("b", i)
        head[i], tail[i] = a, b
        add("s", a, c_all)
        add(b, "t", d_all)
        add(a, b, best)
        inf_edges.append((b, a))
    for t in problem.tensors:
        p = problem.producer[t]
        src = "s" if p is None else tail[problem.segment_of[p]]
        cons = problem.consumers.get(t, [])
        if p is not None and cons and problem.segment_of[cons[0]] == problem.segment_of[p]:
            continue  # internal chain tensor: inside the segment's gadget
        targets: list[object] = [head[problem.segment_of[c]] for c in cons]
        if t in problem.outputs:
            targets.append("t")
        cost = tensor_cost.get(t, 0.0)
        if len(targets) == 1:
            add(src, targets[0], cost)
        else:
            x = ("x", t)
            add(src, x, cost)
            inf_edges.extend((x, v) for v in targets)
        if src != "s":
            inf_edges.extend((v, src) for v in targets if v != "t")
    flow = nx.DiGraph()
    flow.add_nodes_from(("s", "t"))
    # Integer capacities: networkx finds the cut side by comparing flow == capacity,
    # which float round-off breaks; 2**40 steps over the total keeps costs exact to ~1e-12.
    scale = float(1 << 40) / max(1e-300, sum(cap.values()))
    for (u, v), c in cap.items():
        flow.add_edge(u, v, capacity=int(round(c * scale)))
    for u, v in inf_edges:
        if u != v:
            flow.add_edge(u, v)  # no 'capacity' attribute: infinite in networkx
    _, (source_side, _) = nx.minimum_cut(flow, "s", "t", flow_func=boykov_kolmogorov)
    device: set[str] = set()
    for i, seg in enumerate(problem.segments):
        if head[i] not in source_side:
            continue
        if tail[i] in source_side:
            device.update(seg)
        else:
            device.update(seg[: split_at[i]])
    dset = frozenset(device)
    return DagCut(dset, _cut_of(problem, dset), partition_cost(problem, dset, device_cost, cloud_cost, tensor_cost))


def _cut_of(problem: CutProblem, device_set: frozenset[str]) -> tuple[str, ...]:
    """Crossing tensors of a set, counting graph outputs even when all units are on the device."""
    out: list[str] = []
    for t in problem.tensors:
        p = problem.producer[t]
        if p is not None and p not in device_set:
            continue
        if t in problem.outputs or any(c not in device_set for c in problem.consumers.get(t, ())):
            out.append(t)
    return tuple(out)


def down_sets(problem: CutProblem, limit: int = 1 << 16) -> Iterator[frozenset[str]]:
    """Every predecessor-closed set of units (the empty and the full set included).

    Args:
        problem: the model's :class:`CutProblem`.
        limit: stop with an error after this many sets.

    Yields:
        Device sets.

    Raises:
        InvalidArgument: more than ``limit`` sets (the graph is too big to enumerate).
    """
    units = problem.units
    count = 0

    def rec(i: int, chosen: frozenset[str]) -> Iterator[frozenset[str]]:
        nonlocal count
        if i == len(units):
            count += 1
            if count > limit:
                raise InvalidArgument(f"more than {limit} partitions: too many to enumerate")
            yield chosen
            return
        u = units[i]
        yield from rec(i + 1, chosen)
        if problem.preds[u] <= chosen:
            yield from rec(i + 1, chosen | {u})

    yield from rec(0, frozenset())


def exhaustive_cut(
    problem: CutProblem,
    device_cost: Mapping[str, float],
    cloud_cost: Mapping[str, float],
    tensor_cost: Mapping[str, float],
    *,
    limit: int = 1 << 16,
) -> DagCut:
    """The cheapest partition by trying every predecessor-closed set (a check on :func:`min_cut`).

    Args and returns as :func:`min_cut`; ``limit`` as :func:`down_sets`.

    Raises:
        InvalidArgument: the graph has more than ``limit`` partitions.
    """
    best: DagCut | None = None
    for s in down_sets(problem, limit):
        cost = partition_cost(problem, s, device_cost, cloud_cost, tensor_cost)
        if best is None or cost < best.cost - 1e-12:
            best = DagCut(s, _cut_of(problem, s), cost)
    assert best is not None
    return best
