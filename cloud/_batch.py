"""Dynamic batching of suffix calls: which requests may share one onnxruntime run.

Requests of the same (model, partition) suffix are concatenated on axis 0 when
every cut tensor declares a dynamic first dimension (``-1``) and the requests
agree on every other dimension; each output must then come back with the summed
batch size, and is split back per request. Anything else runs singly. No
padding is ever added: a padded row would cost compute and could change results
of non-row-independent graphs.

Pure numpy; no Ray. The Ray Serve deployment and the unit tests use it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Item", "group_batches", "run_group"]


@dataclass
class Item:
    """One validated request waiting for its suffix to run.

    Attributes:
        key: what must match for two items to share a run, e.g. (model, partition).
        feeds: input name -> array, already validated against the suffix.
        outputs: output names to return.
        batchable_inputs: names of inputs whose first dimension is declared dynamic;
            an item can join a batch only if this covers every feed.
    """

    key: Hashable
    feeds: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    batchable_inputs: frozenset[str] = frozenset()

    def signature(self) -> tuple | None:
        """The shape signature a batch-mate must share, or None if not batchable."""
        if not self.feeds or set(self.feeds) - self.batchable_inputs:
            return None
        sizes = {a.shape[0] for a in self.feeds.values() if a.ndim >= 1}
        if len(sizes) != 1 or any(a.ndim == 0 for a in self.feeds.values()):
            return None  # inputs disagree on the batch size: cannot split outputs back
        return (
            self.key,
            self.outputs,
            tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in self.feeds.items())),
        )

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.feeds.values())).shape[0])


def group_batches(items: Sequence[Item], max_batch_size: int) -> list[list[int]]:
    """Partition item indices into runs: same signature, at most ``max_batch_size`` rows.

    Order inside a group follows arrival order; unbatchable items get a group of one.
    """
    groups: list[list[int]] = []
    open_group: dict[tuple, tuple[list[int], int]] = {}
    for i, item in enumerate(items):
        sig = item.signature()
        if sig is None:
            groups.append([i])
            continue
        rows = item.batch_size
        current = open_group.get(sig)
        if current is not None and current[1] + rows <= max(max_batch_size, 1):
            current[0].append(i)
            open_group[sig] = (current[0], current[1] + rows)
            continue
        members = [i]
        groups.append(members)
        open_group[sig] = (members, rows)
    return groups


def run_group(
    items: Sequence[Item], run: Callable[[tuple[str, ...], dict[str, np.ndarray]], list[Any]]
) -> list[list[Any]]:
    """Run ``items`` (one group from :func:`group_batches`) and return outputs per item.

    ``run(output_names, feeds)`` runs the suffix once. With several items the feeds
    are concatenated on axis 0; if an output does not come back with the summed
    batch size (a graph that mixes rows), the group falls back to one run per item.
    """
    if len(items) == 1:
        return [list(run(items[0].outputs, items[0].feeds))]
    names = list(items[0].feeds)
    feeds = {n: np.concatenate([it.feeds[n] for it in items], axis=0) for n in names}
    sizes = [it.batch_size for it in items]
    values = run(items[0].outputs, feeds)
    total = sum(sizes)
    if not all(isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == total for v in values):
        return [list(run(it.outputs, it.feeds)) for it in items]
    bounds = np.cumsum(sizes)[:-1]
    per_output = [np.split(v, bounds, axis=0) for v in values]
    return [[parts[i] for parts in per_output] for i in range(len(items))]
