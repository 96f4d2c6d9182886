"""Planning a model: profile, search candidates, measure them, build the decision table.

:func:`plan_model` is what :func:`planner.build_bundle` runs between loading the
model and writing files. Steps:

1. per-node profiles of the full model (device threads, cloud threads; the
   device one optionally replaced by an imported profile, or slowed down);
2. DADS min-cut over the condition space on those estimates -> shortlist;
3. the shortlist plus ``device``, ``cloud`` and a few evenly spaced chain
   cuts (``reference_cuts``) are extracted and their real prefix and suffix
   sessions timed;
4. the decision table is built from the measured numbers; partitions that win
   nowhere are dropped (reference cuts, ``device`` and ``cloud`` stay).

Partition ids: ``device``, ``cloud``, ``cut-<k>`` for a partition whose cut is
the single tensor of chain cut k (numbered as :func:`planner.chain_cuts`), and
``dag-<k>`` for a cut of several tensors, k = 1, 2, ... in order of device
node count (ties by the first crossing tensor's topological position).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx

from planner._cost import Conditions, Constraints, EnergyModel, Estimate, estimate
from planner._cuts import chain_cuts
from planner._accuracy import Guard
from planner._decide import DecisionTable, Grid, build_table, search_candidates
from planner._encoding import add_encoded, check_encodings
from planner._extract import Extractor
from planner._graph import ModelGraph, dummy_inputs
from planner._mincut import CutProblem
from planner._profile import NodeProfile, profile_nodes, time_partitions
from splitgate.errors import InvalidArgument

__all__ = ["PlanOptions", "PlannedPartition", "Plan", "plan_model", "partition_estimate"]

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PlanOptions:
    """How to plan a model (the planner's config).

    Attributes:
        candidates: ``"optimal"`` (min-cut candidates that win somewhere, plus
            ``reference_cuts``) or ``"chain"`` (every single-tensor chain cut,
            the Foundation behaviour).
        reference_cuts: evenly spaced chain cuts always kept in ``"optimal"``
            mode (demos and tests want middle splits to exist).
        profile: measure and write ``profile.json`` + ``decision_table.json``;
            False writes only the partitions (fast, deterministic).
        device_threads: intra-op threads of device-side sessions.
        cloud_threads: intra-op threads of cloud-side sessions.
        device_slowdown: multiply measured device times by this (a slower device).
        device_profile: a :class:`NodeProfile` JSON measured on the real device;
            device times become its per-node sums, corrected by the
            measured/estimated ratio of each partition on this machine.
        warmup: untimed runs per session.
        repeats: timed runs per session.
        max_candidates: at most this many min-cut partitions are measured.
        batch: value of dynamic dims while profiling.
        energy: device power figures.
        constraints: latency SLO and device memory.
        grid: the decision table's condition grid.
        encodings: wire encodings of cut tensors to plan with (see
            :mod:`planner._encoding`): every measured split ``P`` also becomes
            ``P@E`` for each non-raw ``E`` that passes the accuracy guard.
            ``("raw",)`` plans raw cut tensors only.
        calibration: calibration inputs for the accuracy guard, bytes and
            encode/decode timings: an ``.npz`` file or a mapping input name ->
            array (samples on axis 0); None = ``calibration_samples`` seeded
            random requests (meaningless for accuracy; pass real inputs).
        calibration_samples: requests generated when ``calibration`` is None.
        min_top1_agreement: guard for classifier outputs (argmax unchanged).
        min_cosine: guard for other float outputs (worst per-sample cosine).
        max_rel_error: guard for other float outputs (``max|dy| / max|y|``; None = off).
        output_kind: ``"auto"``, ``"classifier"`` or ``"other"`` (see :mod:`planner._accuracy`).
    """

    candidates: str = "optimal"
    reference_cuts: int = 3
    profile: bool = True
    device_threads: int = 1
    cloud_threads: int = 2
    device_slowdown: float = 1.0
    device_profile: str | os.PathLike[str] | None = None
    warmup: int = 2
    repeats: int = 10
    max_candidates: int = 8
    batch: int = 1
    energy: EnergyModel = field(default_factory=EnergyModel)
    constraints: Constraints = field(default_factory=Constraints)
    grid: Grid = field(default_factory=Grid)
    encodings: tuple[str, ...] = ("raw", "fp16", "int8", "int8c", "zstd")
    calibration: str | os.PathLike[str] | Mapping[str, Any] | None = field(default=None, compare=False)
    calibration_samples: int = 16
    min_top1_agreement: float = 0.99
    min_cosine: float = 0.999
    max_rel_error: float | None = None
    output_kind: str = "auto"

    def guard(self) -> Guard:
        """The accuracy guard these options describe."""
        return Guard(self.min_top1_agreement, self.min_cosine, self.max_rel_error, self.output_kind)

    def validate(self) -> None:
        """Raises InvalidArgument on a bad option value."""
        if self.candidates not in ("optimal", "chain"):
            raise InvalidArgument(f"candidates must be 'optimal' or 'chain', got {self.candidates!r}")
        if self.device_slowdown <= 0 or self.device_threads < 1 or self.cloud_threads < 1:
            raise InvalidArgument("device_slowdown must be > 0 and thread counts >= 1")
        if self.repeats < 1 or self.warmup < 0 or self.max_candidates < 0 or self.reference_cuts < 0:
            raise InvalidArgument("repeats must be >= 1; warmup, max_candidates, reference_cuts >= 0")
        check_encodings(self.encodings)
        self.guard().validate()
        if self.calibration_samples < 1:
            raise InvalidArgument("calibration_samples must be >= 1")


@dataclass
class PlannedPartition:
    """A partition chosen for the bundle.

    Attributes:
        id: partition id (see module docs).
        kind: ``"device"``, ``"cloud"`` or ``"split"``.
        tensors: crossing tensors (the model inputs for cloud, none for device).
        device_set: non-constant nodes on the device.
        prefix, suffix: extracted models (None where the full model is used or absent).
        stats: its profile entry (bytes, timings, estimates), once measured.
        reference: a reference chain cut (kept even where it never wins).
        encoding: wire encoding of the cut tensors (``"raw"`` or see :mod:`planner._encoding`).
        base: for an encoded candidate, the id of its raw twin (same files).
    """

    id: str
    kind: str
    tensors: list[str]
    device_set: frozenset[str]
    prefix: onnx.ModelProto | None = None
    suffix: onnx.ModelProto | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    reference: bool = False
    encoding: str = "raw"
    base: str | None = None


@dataclass
class Plan:
    """The outcome of :func:`plan_model`.

    Attributes:
        partitions: what goes in the bundle, ordered cloud, splits, device.
        profile: the ``profile.json`` document (None without profiling).
        table: the decision table (None without profiling).
    """

    partitions: list[PlannedPartition]
    profile: dict[str, Any] | None
    table: DecisionTable | None


def partition_estimate(entry: dict[str, Any], kind: str, c: Conditions, energy: EnergyModel) -> Estimate:
    """Estimate of a partition from its ``profile.json`` entry (see :func:`planner._cost.estimate`)."""
    return estimate(
        float(entry["device_ms"]),
        float(entry["cloud_ms"]),
        float(entry["up_bytes"]),
        float(entry["down_bytes"]),
        c,
        energy,
        offload=kind != "device",
    )


def _bytes(problem: CutProblem, tensors: list[str]) -> int:
    return int(sum(problem.nbytes.get(t, 0) for t in tensors))


def _mem_bytes(problem: CutProblem, prefix: onnx.ModelProto | None, device_set: frozenset[str]) -> int:
    """Rough peak device memory of a prefix: its serialized weights plus twice its largest activation."""
    weights = prefix.ByteSize() if prefix is not None else 0
    act = max((problem.nbytes.get(t, 0) for u in device_set for t in problem.writes.get(u, [])), default=0)
    return int(weights + 2 * min(act, 1 << 34))


def plan_model(g: ModelGraph, options: PlanOptions, extractor: Extractor, progress: Progress | None = None) -> Plan:
    """Choose, extract and (optionally) measure a model's partitions.

    Args:
        g: the model graph.
        options: planning options.
        extractor: the extractor to cut ``g`` with.
        progress: ``callback(step, done, total)``.

    Returns:
        The :class:`Plan`.

    Raises:
        InvalidArgument: bad options or an unreadable device profile.
        BundleError: a partition cannot be extracted, or onnxruntime cannot run the model.
    """
    options.validate()
    report = progress or (lambda step, done, total: None)
    # types of every tensor that may cross (one ORT run when inference left gaps)
    report("find cuts", 0, 1)
    pre = CutProblem(g)
    try:
        extractor.ensure_value_infos([t for t in pre.tensors if pre.nbytes[t] >= (1 << 40)])
        problem = CutProblem(g)
    except Exception:  # noqa: BLE001 - untyped tensors stay "never send"
        problem = pre
    chain = chain_cuts(g)
    chain_by_tensor = {c.tensor: c for c in chain}
    report("find cuts", 1, 1)

    all_units = frozenset(problem.units)
    cloud = PlannedPartition("cloud", "cloud", list(g.input_names), frozenset())
    device = PlannedPartition("device", "device", [], all_units)
    splits: dict[tuple[str, ...], PlannedPartition] = {}

    def add_cut(device_set: frozenset[str], tensors: tuple[str, ...], reference: bool = False) -> None:
        if not device_set or device_set >= all_units or not tensors or tensors in splits:
            if tensors in splits and reference:
                splits[tensors].reference = True
            return
        one = chain_by_tensor.get(tensors[0]) if len(tensors) == 1 else None
        pid = f"cut-{one.index}" if one is not None else ""
        splits[tensors] = PlannedPartition(pid, "split", list(tensors), device_set, reference=reference)

    if options.candidates == "chain":
        for c in chain:
            add_cut(frozenset(u for u in c.device_set if u in all_units), (c.tensor,), reference=True)
    elif options.reference_cuts and chain:
        n = min(options.reference_cuts, len(chain))
        for i in range(n):
            c = chain[(i + 1) * len(chain) // (n + 1)]
            add_cut(frozenset(u for u in c.device_set if u in all_units), (c.tensor,), reference=True)

    dev_prof = cloud_prof = imported = None
    planning_ms = 0.0
    if options.profile:
        report("profile nodes", 0, 2)
        dev_prof = profile_nodes(g, threads=options.device_threads, warmup=options.warmup,
                                 repeats=max(3, options.repeats // 2), batch=options.batch)
        report("profile nodes", 1, 2)
        cloud_prof = profile_nodes(g, threads=options.cloud_threads, warmup=options.warmup,
                                   repeats=max(3, options.repeats // 2), batch=options.batch)
        report("profile nodes", 2, 2)
        if options.device_profile is not None:
            imported = NodeProfile.load(options.device_profile)
        est_dev = (imported or dev_prof).node_ms
        slow = 1.0 if imported else options.device_slowdown
        dev_units = {u: est_dev.get(u, 0.0) * slow for u in problem.units}
        cloud_units = {u: cloud_prof.node_ms.get(u, 0.0) for u in problem.units}
        if options.candidates == "optimal":
            report("search partitions", 0, 1)
            t0 = time.perf_counter()
            ref_ms = max(1e-6, sum(dev_units.values()))
            found = search_candidates(problem, dev_units, cloud_units, options.energy, ref_ms,
                                      uplink_mbps=options.grid.uplink_mbps)
            planning_ms += (time.perf_counter() - t0) * 1e3
            ranked = sorted(found.values(), key=lambda cw: (-cw[1], len(cw[0].device_set)))
            taken = 0
            for cut, _wins in ranked:
                if taken >= options.max_candidates:
                    break
                before = len(splits)
                add_cut(cut.device_set, cut.tensors)
                taken += len(splits) - before
            report("search partitions", 1, 1)

    ordered = sorted(
        splits.values(),
        key=lambda p: (len(p.device_set), min((g.graph.nodes[problem.producer[t]]["index"]
                                               if problem.producer.get(t) else -1) for t in p.tensors)),
    )
    k = 0
    for p in ordered:
        if not p.id:
            k += 1
            p.id = f"dag-{k}"
    parts = [cloud, *ordered, device]

    total = len(ordered)
    for i, p in enumerate(ordered):
        report("extract partitions", i, total)
        p.prefix = extractor.prefix(p.tensors)
        p.suffix = extractor.suffix(p.tensors)
        p.tensors = [i.name for i in p.suffix.graph.input if i.name in set(p.tensors)]
    report("extract partitions", total, total)
    if not options.profile:
        return Plan(parts, None, None)

    assert dev_prof is not None and cloud_prof is not None
    feeds = dummy_inputs(g.inputs, dynamic=options.batch)
    down = _bytes(problem, list(g.output_names))
    inputs = set(g.input_names)
    # all partitions measured together, round by round (load drift hits them alike)
    sides = [(g.model if p.kind == "device" else p.prefix, g.model if p.kind == "cloud" else p.suffix) for p in parts]
    timings = time_partitions(
        sides, feeds, device_threads=options.device_threads, cloud_threads=options.cloud_threads,
        warmup=options.warmup, repeats=options.repeats, device_gap_ms=10.0,
        progress=lambda done, total: report("measure partitions", done, total),
    )
    for p, (pre_model, _), (dev_t, cloud_t) in zip(parts, sides, timings):
        est_d = dev_prof.sum(p.device_set)
        est_c = cloud_prof.sum(u for u in problem.units if u not in p.device_set)
        device_ms = 0.0
        if dev_t is not None:
            device_ms = dev_t.typical_ms * options.device_slowdown
            if imported is not None:
                correction = dev_t.typical_ms / est_d if est_d > 0 else 1.0
                device_ms = imported.sum(p.device_set) * correction
        p.stats = {
            "kind": p.kind,
            "tensors": list(p.tensors),
            "device_nodes": len(p.device_set),
            "up_bytes": _bytes(problem, p.tensors),
            "down_bytes": down if p.kind != "device" else 0,
            "sends_input": bool(inputs & set(p.tensors)),
            "device_ms": round(device_ms, 4),
            "cloud_ms": round(cloud_t.typical_ms, 4) if cloud_t is not None else 0.0,
            "device_timing": dev_t.to_dict() if dev_t else None,
            "cloud_timing": cloud_t.to_dict() if cloud_t else None,
            "est_device_ms": round(est_d, 4),
            "est_cloud_ms": round(est_c, 4),
            "device_mem_bytes": _mem_bytes(problem, pre_model if p.kind != "cloud" else None, p.device_set),
            "reference": p.reference,
        }
    parts, enc_profile = add_encoded(g, parts, options, report)

    report("decision table", 0, 1)
    t0 = time.perf_counter()
    stats = {p.id: p.stats for p in parts}
    kinds = {p.id: p.kind for p in parts}
    energy = options.energy

    def est(pid: str, c: Conditions) -> Estimate:
        return partition_estimate(stats[pid], kinds[pid], c, energy)

    limit = options.constraints.device_memory_mb
    excluded = frozenset(
        p.id for p in parts
        if limit is not None and p.kind != "cloud" and p.stats["device_mem_bytes"] > limit * 1e6
    )
    if excluded >= {p.id for p in parts}:
        excluded = frozenset()
    table = build_table(
        est, [p.id for p in parts], options.grid,
        ref=lambda c: est("device", c), slo_ms=options.constraints.slo_ms,
        excluded=excluded, always=("cloud", "device"),
    )
    planning_ms += (time.perf_counter() - t0) * 1e3
    report("decision table", 1, 1)

    winners = set(table.candidates)
    keep = {p.id for p in parts if p.id in winners or p.reference or p.kind != "split"}
    keep |= {p.base for p in parts if p.base and p.id in keep}  # an encoded winner keeps its raw twin
    kept = [p for p in parts if p.id in keep]
    measured = [p for p in parts if p.kind == "split" and not p.base] + [p for p in parts if p.kind != "split"]
    profile = {
        "version": 1,
        "batch": options.batch,
        "device": {
            "threads": options.device_threads,
            "slowdown": options.device_slowdown,
            "source": f"imported:{imported.source}" if imported else "measured",
            "model_ms": round(dev_prof.total_ms, 4),
            "attributed": round(dev_prof.attributed, 4),
        },
        "cloud": {
            "threads": options.cloud_threads,
            "model_ms": round(cloud_prof.total_ms, 4),
            "attributed": round(cloud_prof.attributed, 4),
        },
        "energy": energy.to_dict(),
        "constraints": options.constraints.to_dict(),
        "excluded": sorted(excluded),
        "estimate_error": _errors(measured),
        "graph": problem.stats(),
        "partitions": {p.id: p.stats for p in kept},
        "encodings": enc_profile,
        "node_ms": {
            "device": {k: round(v, 5) for k, v in dev_prof.node_ms.items()},
            "cloud": {k: round(v, 5) for k, v in cloud_prof.node_ms.items()},
        },
    }
    profile["planning_ms"] = round(planning_ms, 3)
    return Plan(kept, profile, table)


def _errors(parts: list[PlannedPartition]) -> dict[str, Any]:
    """How far summed per-node estimates are from measured sessions (relative error, %)."""
    out: dict[str, Any] = {}
    for side in ("device", "cloud"):
        rows = []
        for p in parts:
            timing = p.stats.get(f"{side}_timing")
            est = p.stats.get(f"est_{side}_ms", 0.0)
            if timing and timing["median_ms"] > 0:
                rows.append({"id": p.id, "estimate_ms": est, "measured_ms": timing["median_ms"],
                             "error_pct": round(100.0 * (est - timing["median_ms"]) / timing["median_ms"], 2)})
        errs = [abs(r["error_pct"]) for r in rows]
        out[side] = {
            "median_abs_pct": round(statistics.median(errs), 2) if errs else None,
            "max_abs_pct": round(max(errs), 2) if errs else None,
            "partitions": rows,
        }
    return out
