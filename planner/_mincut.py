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

Then the coarse graph is grouped by dominators (:mod:`splitgate.planner._blocks`): the
segments every input-to-output path passes through split it into small
independent blocks (a residual block, an Inception module, a DenseNet layer),
each solved on its own, mostly by enumerating its few closed subsets. One
global flow over a DenseNet-121 is a long chain of blocks that
Boykov-Kolmogorov augments path by path; block by block it is linear.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import networkx as nx
from networkx.algorithms.flow import boykov_kolmogorov

from splitgate.planner._blocks import CLOUD, DEVICE, SPLIT, Block, Link, decompose, whole
from splitgate.planner._graph import ModelGraph
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
        segment_of: unit -> index of its segment.
        links: tensors between segments (:class:`splitgate.planner._blocks.Link`).
        blocks: the dominator grouping (:func:`splitgate.planner._blocks.decompose`).
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
        self.links: list[Link] = self._links()
        splittable = [len(seg) > 1 for seg in self.segments]
        self.blocks: list[Block] = decompose(len(self.segments), self.links, splittable)
        self._whole: Block | None = None

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

    def _links(self) -> list[Link]:
        """Tensors between segments (internal chain tensors left out)."""
        links = []
        for t in self.tensors:
            p = self.producer[t]
            ps = -1 if p is None else self.segment_of[p]
            cons = tuple(dict.fromkeys(self.segment_of[c] for c in self.consumers.get(t, ())))
            if ps >= 0 and cons == (ps,) and t not in self.outputs:
                continue  # inside a chain: the segment's own split point
            links.append(Link(t, ps, cons, t in self.outputs))
        return links

    @property
    def whole_block(self) -> Block:
        """The whole problem as one block (for ``min_cut(..., decompose=False)``)."""
        if self._whole is None:
            self._whole = whole(len(self.segments), self.links, [len(seg) > 1 for seg in self.segments])
        return self._whole

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
        """Sizes before and after coarsening: nodes, units, segments, vertices of the
        whole-graph flow network, articulations, non-empty blocks, the largest
        block, and blocks left to min-cut (too many closed subsets to enumerate)."""
        chains = sum(1 for s in self.segments if len(s) > 1)
        return {
            "nodes": self.g.total_nodes,
            "units": len(self.units),
            "segments": len(self.segments),
            "flow_vertices": len(self.segments) + chains
            + sum(1 for t in self.tensors if len(self.consumers.get(t, ())) + (t in self.outputs) > 1) + 2,
            "articulations": len(self.blocks) - 1,
            "blocks": sum(1 for b in self.blocks if b.segs),
            "max_block_segments": max((len(b.segs) for b in self.blocks), default=0),
            "flow_blocks": sum(1 for b in self.blocks if b.assignments is None),
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


def _segment_costs(
    problem: CutProblem,
    device_cost: Mapping[str, float],
    cloud_cost: Mapping[str, float],
    tensor_cost: Mapping[str, float],
) -> tuple[list[float], list[float], list[float], list[int]]:
    """Per segment: all-device cost, all-cloud cost, best inner split (value, units on device).

    Raises:
        InvalidArgument: a negative cost.
    """
    for costs, what in ((device_cost, "device"), (cloud_cost, "cloud"), (tensor_cost, "tensor")):
        bad = next((k for k, v in costs.items() if v < 0), None)
        if bad is not None:
            raise InvalidArgument(f"min-cut costs must be >= 0, got {what} cost {costs[bad]} for {bad!r}")
    d_all, c_all, split_val, split_k = [], [], [], []
    inf = float("inf")
    for seg in problem.segments:
        d = [device_cost.get(u, 0.0) for u in seg]
        c = [cloud_cost.get(u, 0.0) for u in seg]
        dsum, csum = sum(d), sum(c)
        best, best_k, dp, cs = inf, 0, 0.0, csum
        for k in range(1, len(seg)):
            dp += d[k - 1]
            cs -= c[k - 1]
            val = dp + tensor_cost.get(problem.writes[seg[k - 1]][0], 0.0) + cs
            if val < best:
                best, best_k = val, k
        d_all.append(dsum)
        c_all.append(csum)
        split_val.append(best)
        split_k.append(best_k)
    return d_all, c_all, split_val, split_k


def _flow_states(
    problem: CutProblem, blk: Block, d_all: list[float], c_all: list[float], split_val: list[float],
    tensor_cost: Mapping[str, float],
) -> tuple[int, ...]:
    """Optimal segment states of a block by s-t min-cut (DADS), the block's ends pinned.

    Each segment is a vertex (a chain: two, ``head -> tail`` carrying its best
    inner split, with an infinite ``tail -> head`` edge so a chain is never
    "tail on the device, head in the cloud"); ``s -> head`` carries its cloud
    cost, ``tail -> t`` its device cost; a tensor read by several segments gets
    an auxiliary vertex so it is paid once; consumers point back at producers
    with infinite edges (closure). Tensors of the pinned left end come from
    ``s``; reads by the pinned right end (and graph outputs) go to ``t``.
    """
    cap: dict[tuple[object, object], float] = {}
    inf_edges: list[tuple[object, object]] = []

    def add(u: object, v: object, c: float) -> None:
        if c > 0:
            cap[(u, v)] = cap.get((u, v), 0.0) + c

    head: list[object] = []
    tail: list[object] = []
    for k, s in enumerate(blk.segs):
        if len(problem.segments[s]) == 1:
            head.append(("u", k))
            tail.append(("u", k))
            add("s", ("u", k), c_all[s])
            add(("u", k), "t", d_all[s])
            continue
        a, b = ("a", k), ("b", k)
        head.append(a)
        tail.append(b)
        add("s", a, c_all[s])
        add(b, "t", d_all[s])
        add(a, b, split_val[s])
        inf_edges.append((b, a))
    for i, link in enumerate(blk.links):
        src: object = "s" if blk.source[i] < 0 else tail[blk.source[i]]
        targets: list[object] = [head[c] for c in blk.local[i]]
        if blk.external[i]:
            targets.append("t")
        if not targets:
            continue
        cost = tensor_cost.get(link.name, 0.0)
        if len(targets) == 1:
            add(src, targets[0], cost)
        else:
            x = ("x", i)
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
    return tuple(
        (DEVICE if tail[k] in source_side else SPLIT) if head[k] in source_side else CLOUD
        for k in range(len(blk.segs))
    )


def _less(v: float, best: float) -> bool:
    """``v < best`` by more than round-off (so the first of equal options wins)."""
    return v < best and (best == float("inf") or v < best - 1e-12 * abs(best))


def _block_cost(blk: Block, states: tuple[int, ...], seg_costs: list[tuple[float, float, float]],
                tcs: list[float]) -> float:
    total = sum(sc[st] for sc, st in zip(seg_costs, states))
    for i, (src, cons, ext) in enumerate(zip(blk.source, blk.local, blk.external)):
        if (src < 0 or states[src] == DEVICE) and (ext or any(states[c] == CLOUD for c in cons)):
            total += tcs[i]
    return total


def _solve_block(
    problem: CutProblem, blk: Block, d_all: list[float], c_all: list[float], split_val: list[float],
    tensor_cost: Mapping[str, float],
) -> tuple[float, tuple[int, ...]]:
    """Cheapest states of a block's segments (enumerated, or by min-cut when too many)."""
    seg_costs = [(c_all[s], split_val[s], d_all[s]) for s in blk.segs]
    tcs = [tensor_cost.get(link.name, 0.0) for link in blk.links]
    if blk.assignments is None or blk.crossings is None:
        states = _flow_states(problem, blk, d_all, c_all, split_val, tensor_cost)
        return _block_cost(blk, states, seg_costs, tcs), states
    best, arg = float("inf"), blk.assignments[0]
    for states, crossing in zip(blk.assignments, blk.crossings):
        v = sum(sc[st] for sc, st in zip(seg_costs, states)) + sum(tcs[i] for i in crossing)
        if _less(v, best):
            best, arg = v, states
    return best, arg


def min_cut(
    problem: CutProblem,
    device_cost: Mapping[str, float],
    cloud_cost: Mapping[str, float],
    tensor_cost: Mapping[str, float],
    *,
    decompose: bool = True,
) -> DagCut:
    """Optimal predecessor-closed partition by s-t min-cut (DADS, INFOCOM'19).

    By default the problem is solved block by block between articulation
    segments (dominator grouping, see :mod:`splitgate.planner._blocks`): for each
    articulation, the best split of its chain with everything before on the
    device and everything after in the cloud; for each block, its best closed
    subset with the articulation before it on the device and the one after
    it in the cloud. Blocks are solved by enumeration (their closed subsets are
    listed once in :class:`CutProblem`) or, when large, by min-cut; the answer
    is the same as one min-cut over the whole graph, in time linear in the
    number of blocks.

    Args:
        problem: the model's :class:`CutProblem`.
        device_cost: unit -> cost of running it on the device (>= 0; missing = 0).
        cloud_cost: unit -> cost of running it in the cloud (>= 0; missing = 0).
        tensor_cost: tensor -> cost of sending it once (>= 0; missing = 0).
        decompose: False solves one s-t min-cut over the whole chain-collapsed
            graph instead (the plain DADS construction; slower, same optimum).

    Returns:
        The cheapest partition. Its device set may be every unit (then its cut
        is the graph outputs) or empty (the cut is the graph inputs). Among
        equally cheap partitions, one with fewer device units is preferred.

    Raises:
        InvalidArgument: a negative cost.
    """
    segs = problem.segments
    d_all, c_all, split_val, split_k = _segment_costs(problem, device_cost, cloud_cost, tensor_cost)
    device: list[str] = []
    if not decompose:
        blk = problem.whole_block
        _, states = _solve_block(problem, blk, d_all, c_all, split_val, tensor_cost)
        upto = -1
    else:
        n = len(segs)
        before = [0.0] * (n + 1)  # device cost of segments < i
        after = [0.0] * (n + 1)  # cloud cost of segments >= i
        for i in range(n):
            before[i + 1] = before[i] + d_all[i]
        for i in range(n - 1, -1, -1):
            after[i] = after[i + 1] + c_all[i]
        best = float("inf")
        choice: tuple[Block | None, int, tuple[int, ...]] = (None, -1, ())
        for blk in problem.blocks:
            a = blk.left
            if a >= 0 and len(segs[a]) > 1:
                v = before[a] + split_val[a] + after[a + 1]
                if _less(v, best):
                    best, choice = v, (None, a, ())
            v, states = _solve_block(problem, blk, d_all, c_all, split_val, tensor_cost)
            v += before[a + 1] + after[blk.right]
            if _less(v, best):
                best, choice = v, (blk, a, states)
        chosen, a, states = choice
        if chosen is None:  # split inside articulation a
            for s in range(a):
                device.extend(segs[s])
            device.extend(segs[a][: split_k[a]])
            dset = frozenset(device)
            return DagCut(dset, _cut_of(problem, dset), partition_cost(problem, dset, device_cost, cloud_cost, tensor_cost))
        blk, upto = chosen, a
    for s in range(upto + 1):
        device.extend(segs[s])
    for s, st in zip(blk.segs, states):
        if st == DEVICE:
            device.extend(segs[s])
        elif st == SPLIT:
            device.extend(segs[s][: split_k[s]])
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
