"""Grouping a model by dominators: the blocks between articulation segments.

The partition problem of :mod:`splitgate.planner._mincut` lives on the DAG of *segments*
(maximal chains of units, see :class:`splitgate.planner._mincut.CutProblem`), between a virtual
source (the graph inputs) and a virtual sink (the graph outputs). A segment
that lies on every source-sink path — it dominates the sink and post-dominates
the source, like the nodes :func:`splitgate.planner.chain_cuts` finds — is an
*articulation*. Articulations split the problem exactly (the decomposition that
makes QDMP's and DADS's large-model planning fast; here as in
Cooper-Harvey-Kennedy's dominator chain, found by a linear sweep):

* with the segments numbered in topological order, segment p is an
  articulation iff no edge (a -> b) jumps over it (a < p < b): every path climbs
  the numbering one edge at a time, so it must land on p;
* hence every edge stays inside one *block* ``[A_j, A_{j+1}]`` between
  consecutive articulations, and a device set (closed under predecessors) is
  either "everything before A_j, a split of A_j's chain, nothing after" or
  "everything up to A_j, any closed subset Q of block j, nothing from A_{j+1}
  on". Each block is solved on its own, with A_j's outputs (or the graph
  inputs) pinned to the device and A_{j+1} (or the graph outputs) pinned to
  the cloud; the best option over all blocks and articulations is optimal.

Blocks are small (a ResNet residual block, an Inception module, a DenseNet
layer), so their closed subsets are enumerated once, structurally, here; only
a block with more than ``limit`` of them is left to an s-t min-cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Link", "Block", "articulations", "decompose", "whole"]

#: Segment states inside a block: on the cloud, split inside its chain, on the device.
CLOUD, SPLIT, DEVICE = 0, 1, 2


@dataclass(frozen=True)
class Link:
    """A tensor between segments (internal chain tensors excluded).

    Attributes:
        name: the tensor.
        producer: producing segment, or -1 for a graph input.
        consumers: segments reading it (each once).
        output: it is a graph output.
    """

    name: str
    producer: int
    consumers: tuple[int, ...]
    output: bool


@dataclass(frozen=True)
class Block:
    """The segments strictly between two consecutive articulations.

    Attributes:
        left: the articulation before (on the device in every option of this
            block), or -1 for the graph inputs.
        right: the articulation after (on the cloud), or the number of
            segments for the graph outputs.
        segs: the block's segments, topological order.
        links: tensors produced by ``left`` (or graph inputs, for the first
            block) or inside the block; ``producer`` -1 means "pinned to the device".
        external: per link, whether ``right`` or the graph outputs read it
            (then it crosses whenever its producer is on the device).
        local: per link, its consumers as indices into ``segs``.
        source: per link, its producer as an index into ``segs`` (-1: pinned).
        assignments: every closed state vector of ``segs`` (:data:`CLOUD`,
            :data:`SPLIT`, :data:`DEVICE` per segment), or None when there are
            more than the enumeration limit.
        crossings: per assignment, indices into ``links`` of the tensors it sends.
    """

    left: int
    right: int
    segs: tuple[int, ...]
    links: tuple[Link, ...]
    external: tuple[bool, ...]
    local: tuple[tuple[int, ...], ...]
    source: tuple[int, ...]
    assignments: tuple[tuple[int, ...], ...] | None
    crossings: tuple[tuple[int, ...], ...] | None


def articulations(n: int, links: Sequence[Link]) -> list[int]:
    """Segments on every path from the graph inputs to the graph outputs.

    Args:
        n: number of segments, numbered in topological order.
        links: the tensors between segments.

    Returns:
        The articulation segments, ascending. A segment no link enters hangs
        off the source, one no link leaves feeds the sink (so dead branches
        and input-free nodes count as paths too).
    """
    diff = [0] * (n + 2)
    has_in = [False] * n
    has_out = [False] * n

    def edge(a: int, b: int) -> None:  # positions: source -1, segments 0..n-1, sink n
        if b - a >= 2:
            diff[a + 1 + 1] += 1  # shifted by one so the source fits at index 0
            diff[b + 1] -= 1

    for link in links:
        a = link.producer
        if a >= 0:
            has_out[a] = True
        for b in link.consumers:
            has_in[b] = True
            edge(a, b)
        if link.output:
            if a >= 0:
                has_out[a] = True
            edge(a, n)
    for i in range(n):
        if not has_in[i]:
            edge(-1, i)
        if not has_out[i]:
            edge(i, n)
    out, cover = [], 0
    for i in range(n):
        cover += diff[i + 1]
        if cover == 0:
            out.append(i)
    return out


def _block(left: int, right: int, segs: list[int], links: list[Link], splittable: Sequence[bool],
           limit: int) -> Block:
    index = {s: k for k, s in enumerate(segs)}
    external = tuple(link.output or right in link.consumers for link in links)
    local = tuple(tuple(index[c] for c in link.consumers if c in index) for link in links)
    source = tuple(index.get(link.producer, -1) for link in links)
    preds: list[set[int]] = [set() for _ in segs]
    for src, cons in zip(source, local):
        if src >= 0:
            for c in cons:
                preds[c].add(src)
    assignments = _enumerate([sorted(p) for p in preds], [splittable[s] for s in segs], limit)
    crossings = None
    if assignments is not None:
        crossings = tuple(
            tuple(
                i for i, (src, cons, ext) in enumerate(zip(source, local, external))
                if (src < 0 or a[src] == DEVICE) and (ext or any(a[c] == CLOUD for c in cons))
            )
            for a in assignments
        )
    return Block(left, right, tuple(segs), tuple(links), external, local, source, assignments, crossings)


def _enumerate(preds: list[list[int]], splittable: list[bool], limit: int) -> tuple[tuple[int, ...], ...] | None:
    """Closed state vectors (a segment off the cloud needs its predecessors on the device).

    None when there are more than ``limit`` (a block of k segments has at least k + 1).
    """
    if len(preds) + 1 > limit:
        return None
    out: list[tuple[int, ...]] = []
    state = [CLOUD] * len(preds)

    def rec(k: int) -> bool:
        if k == len(preds):
            out.append(tuple(state))
            return len(out) <= limit
        free = all(state[p] == DEVICE for p in preds[k])
        for s in (CLOUD, SPLIT, DEVICE) if free else (CLOUD,):
            if s == SPLIT and not splittable[k]:
                continue
            state[k] = s
            if not rec(k + 1):
                return False
        state[k] = CLOUD
        return True

    return tuple(out) if rec(0) else None


def decompose(n: int, links: Sequence[Link], splittable: Sequence[bool], *, limit: int = 256) -> list[Block]:
    """Split the segment DAG into blocks between consecutive articulations.

    Args:
        n: number of segments (topological numbering).
        links: the tensors between segments.
        splittable: per segment, whether its chain has an inner cut (length > 1).
        limit: enumerate a block's closed subsets only up to this many.

    Returns:
        Blocks in order; block j lies between articulation j-1 and j (the first
        after the graph inputs, the last before the graph outputs). Every
        segment is in exactly one block or is an articulation.
    """
    arts = articulations(n, links)
    bounds = [-1, *arts, n]
    block_of = [-1] * n
    for j in range(len(bounds) - 1):
        for s in range(bounds[j] + 1, bounds[j + 1]):
            block_of[s] = j
    per_block: list[list[Link]] = [[] for _ in range(len(bounds) - 1)]
    art_index = {a: j for j, a in enumerate(arts)}
    for link in links:
        p = link.producer
        # a link leaves its producer's block, or the articulation that opens the next block
        j = 0 if p < 0 else (art_index[p] + 1 if p in art_index else block_of[p])
        per_block[j].append(link)
    return [
        _block(bounds[j], bounds[j + 1], list(range(bounds[j] + 1, bounds[j + 1])), per_block[j], splittable, limit)
        for j in range(len(bounds) - 1)
    ]


def whole(n: int, links: Sequence[Link], splittable: Sequence[bool]) -> Block:
    """The whole problem as one block (no decomposition, no enumeration): for the plain min-cut."""
    return _block(-1, n, list(range(n)), list(links), splittable, limit=0)
