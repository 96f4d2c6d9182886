"""Planning a model: profile, search candidates, measure them, build the decision table.

:func:`plan_model` is what :func:`splitgate.planner.build_bundle` runs between loading the
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
the single tensor of chain cut k (numbered as :func:`splitgate.planner.chain_cuts`), and
``dag-<k>`` for a cut of several tensors, k = 1, 2, ... in order of device
node count (ties by the first crossing tensor's topological position).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from splitgate.planner._cost import Conditions, Constraints, EnergyModel, Estimate, estimate
from splitgate.planner._cuts import chain_cuts
from splitgate.planner._accuracy import Calibration, Guard, load_calibration
from splitgate.planner._decide import DecisionTable, Grid, build_table, search_candidates
from splitgate.planner._encoding import add_encoded, check_encodings
from splitgate.planner._extract import Extractor
from splitgate.planner._graph import ModelGraph
from splitgate.planner._mincut import CutProblem, DagCut
from splitgate.planner._device import DeviceProfile, load_device_profile
from splitgate.planner._profile import NodeProfile, profile_nodes, time_partitions
from splitgate.planner._shapes import ShapeBucket, load_samples, parse_input_shapes, resolve_buckets, seeded_feeds, tensor_nbytes
from splitgate.errors import BundleError, InvalidArgument

__all__ = ["PlanOptions", "PlannedPartition", "Plan", "plan_model", "partition_estimate", "table_for"]

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
        batch: the size of a dynamic leading (batch) dimension no shape names.
        energy: device power figures.
        constraints: latency SLO and device memory.
        grid: the decision table's condition grid.
        encodings: wire encodings of cut tensors to plan with (see
            :mod:`splitgate.planner._encoding`): every measured split ``P`` also becomes
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
        output_kind: ``"auto"``, ``"classifier"`` or ``"other"`` (see :mod:`splitgate.planner._accuracy`).
        input_shapes: the real input shapes to plan at: input name -> shapes
            (several = shape buckets, one profile and decision table each), or
            ``--input-shape`` strings (``["x=1x3x640x640", "x=1x3x320x320"]``).
            A dynamic non-batch dimension without a size here or in
            ``samples`` is an error (:class:`splitgate.planner.DynamicShapeError`).
        samples: real inputs (``.npz`` or name -> array, samples on axis 0;
            see :func:`splitgate.planner._shapes.load_samples`): the model runs on them
            while planning (inputs whose values matter) and, without
            ``calibration``, they are the encoding guard's calibration set.
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
    input_shapes: Mapping[str, Sequence[Sequence[int]]] | Sequence[str] | None = field(default=None, compare=False)
    samples: str | os.PathLike[str] | Mapping[str, Any] | None = field(default=None, compare=False)

    def shapes(self) -> dict[str, list[tuple[int, ...]]] | None:
        """``input_shapes`` as input name -> shapes (parsing ``--input-shape`` strings)."""
        if self.input_shapes is None:
            return None
        if isinstance(self.input_shapes, Mapping):
            return {str(k): [tuple(int(d) for d in shape) for shape in v] for k, v in self.input_shapes.items()}
        return parse_input_shapes([str(t) for t in self.input_shapes])

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
        if self.batch < 1:
            raise InvalidArgument("batch must be >= 1")
        self.shapes()


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
        encoding: wire encoding of the cut tensors (``"raw"`` or see :mod:`splitgate.planner._encoding`).
        base: for an encoded candidate, the id of its raw twin (same files).
        up_bytes: bytes of the cut tensors at the main shape bucket.
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
    up_bytes: int | None = None


@dataclass
class Plan:
    """The outcome of :func:`plan_model`.

    Attributes:
        partitions: what goes in the bundle, ordered cloud, splits, device.
        profile: the ``profile.json`` document (None without profiling).
        table: the main bucket's decision table (None without profiling).
        shapes: the shape buckets planned at (the first is the main one).
        notes: what planning assumed (e.g. a dynamic batch planned at 1).
        tables: one decision table per bucket (empty without profiling).
    """

    partitions: list[PlannedPartition]
    profile: dict[str, Any] | None
    table: DecisionTable | None
    shapes: list[ShapeBucket] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: list[DecisionTable] = field(default_factory=list)


def partition_estimate(entry: dict[str, Any], kind: str, c: Conditions, energy: EnergyModel) -> Estimate:
    """Estimate of a partition from its ``profile.json`` entry (see :func:`splitgate.planner._cost.estimate`)."""
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


def table_for(
    stats: Mapping[str, Mapping[str, Any]],
    kinds: Mapping[str, str],
    energy: EnergyModel,
    constraints: Constraints,
    grid: Grid,
) -> DecisionTable:
    """The decision table of one shape bucket from its partitions' profile entries.

    Partitions over the device memory limit are excluded (unless every one is);
    ``cloud`` and ``device`` are always candidates.

    Args:
        stats: partition id -> profile entry (``device_ms``, ``cloud_ms``,
            ``up_bytes``, ``down_bytes``, ``device_mem_bytes``).
        kinds: partition id -> ``"device"``, ``"cloud"`` or ``"split"``.
        energy: device power figures.
        constraints: latency SLO and device memory.
        grid: the condition grid.

    Returns:
        The :class:`DecisionTable`.
    """

    def est(pid: str, c: Conditions) -> Estimate:
        return partition_estimate(stats[pid], kinds[pid], c, energy)

    limit = constraints.device_memory_mb
    excluded = _excluded(stats, kinds, limit)
    return build_table(
        est, list(stats), grid,
        ref=lambda c: est("device", c), slo_ms=constraints.slo_ms,
        excluded=excluded, always=("cloud", "device"),
    )


def _excluded(stats: Mapping[str, Mapping[str, Any]], kinds: Mapping[str, str], limit_mb: float | None) -> frozenset[str]:
    excluded = frozenset(
        pid for pid, e in stats.items()
        if limit_mb is not None and kinds[pid] != "cloud" and e.get("device_mem_bytes", 0) > limit_mb * 1e6
    )
    return frozenset() if excluded >= set(stats) else excluded


@dataclass
class _Bucket:
    """What planning learns at one shape bucket."""

    shape: ShapeBucket
    problem: CutProblem
    dev_prof: NodeProfile | None = None
    cloud_prof: NodeProfile | None = None
    imported: NodeProfile | None = None
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    table: DecisionTable | None = None


def plan_model(
    g: ModelGraph, options: PlanOptions, extractor: Extractor, progress: Progress | None = None,
    *, model_sha256: str | None = None,
) -> Plan:
    """Choose, extract and (optionally) measure a model's partitions.

    Planning happens at the user's shapes (:mod:`splitgate.planner._shapes`): one
    profile and decision table per shape bucket; the extracted models keep
    the original's dynamic dimensions.

    Args:
        g: the model graph.
        options: planning options.
        extractor: the extractor to cut ``g`` with.
        progress: ``callback(step, done, total)``.
        model_sha256: the model file's digest, to refuse a device profile of another model.

    Returns:
        The :class:`Plan`.

    Raises:
        InvalidArgument: bad options, an unreadable device profile or samples,
            a device profile measured on another model.
        DynamicShapeError: a dynamic non-batch dimension without a size.
        BundleError: a partition cannot be extracted, or onnxruntime cannot run the model.
    """
    options.validate()
    report = progress or (lambda step, done, total: None)
    samples = load_samples(options.samples, g.inputs) if options.samples is not None else None
    shapes, notes = resolve_buckets(g, options.shapes(), samples, batch=options.batch)
    extractor.feeds = shapes[0].feeds  # types of cut tensors inference left open: from a real run
    _check_runs(g, shapes)
    device = None
    if options.device_profile is not None and options.profile:
        device = load_device_profile(options.device_profile)
        device.check_model(model_sha256, what=str(g.source or "the model"), nodes=g.order)

    report("find cuts", 0, len(shapes))
    structure = CutProblem(g)
    buckets = []
    for i, shape in enumerate(shapes):
        buckets.append(_Bucket(shape, CutProblem(g, tensor_nbytes(g.model, shape, structure.tensors))))
        report("find cuts", i + 1, len(shapes))
    problem = buckets[0].problem
    splits = _Splits(g, problem)
    splits.add_references(options)

    planning_ms = 0.0
    if options.profile:
        _profile_nodes(g, buckets, options, report, device)
        if options.candidates == "optimal":
            planning_ms += _search(splits, buckets, options, report)

    parts = splits.ordered()
    _extract(extractor, parts, report)
    for p in parts:
        p.up_bytes = _bytes(problem, p.tensors)
    if not options.profile:
        return Plan(parts, None, None, [b.shape for b in buckets], notes)

    for i, b in enumerate(buckets):
        _measure(g, parts, b, options, report, f"measure partitions {b.shape.label}" if len(buckets) > 1 else "measure partitions",
                 device)
    for p in parts:
        p.stats = buckets[0].stats[p.id]
    calibration = _calibration(g, options, shapes[0], samples)
    parts, enc_profile = add_encoded(g, parts, options, report, calibration=calibration)
    if device is not None:
        _device_encode_ms(parts, buckets[0], device)
    for b in buckets[1:]:
        _encoded_stats(parts, buckets[0], b)

    report("decision table", 0, len(buckets))
    t0 = time.perf_counter()
    kinds = {p.id: p.kind for p in parts}
    for i, b in enumerate(buckets):
        if i == 0:
            b.stats = {p.id: p.stats for p in parts}
        b.table = table_for(b.stats, kinds, options.energy, options.constraints, options.grid)
        report("decision table", i + 1, len(buckets))
    planning_ms += (time.perf_counter() - t0) * 1e3

    winners = {pid for b in buckets for pid in b.table.candidates}  # type: ignore[union-attr]
    keep = {p.id for p in parts if p.id in winners or p.reference or p.kind != "split"}
    keep |= {p.base for p in parts if p.base and p.id in keep}  # an encoded winner keeps its raw twin
    kept = [p for p in parts if p.id in keep]
    measured = [p for p in parts if p.kind == "split" and not p.base] + [p for p in parts if p.kind != "split"]
    profile = _profile_doc(buckets, kept, measured, options, enc_profile, notes)
    profile["planning_ms"] = round(planning_ms, 3)
    tables = [b.table for b in buckets]
    return Plan(kept, profile, tables[0], [b.shape for b in buckets], notes, tables)  # type: ignore[arg-type]


def _check_runs(g: ModelGraph, shapes: list[ShapeBucket]) -> None:
    """Run the model once per bucket: a model that fails on the inputs planning
    would time it with is an error that says why and what to pass.

    Raises:
        InvalidArgument: onnxruntime fails on a bucket's inputs.
    """
    import onnxruntime as ort

    from splitgate._ort_errors import clean_reason

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # the failure is reported below, once, not also as an ORT log line
    try:
        session = ort.InferenceSession(g.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises several types
        raise BundleError(f"onnxruntime cannot load the model: {clean_reason(str(exc))[2]}") from None
    for b in shapes:
        try:
            session.run(None, b.feeds)
        except Exception as exc:  # noqa: BLE001 - any ORT failure is reported the same way
            op, node, reason = clean_reason(str(exc))
            at = f" at node {op} '{node}'" if node else ""
            if b.from_sample:
                raise InvalidArgument(f"the model fails on the sample of shape {b.label}{at}: {reason}") from None
            raise InvalidArgument(
                f"the model fails on generated inputs of shape {b.label}{at}: {reason}; if its inputs must "
                "hold sensible values (lengths, sizes, rates), pass real ones with --sample FILE.npz"
            ) from None


class _Splits:
    """The split candidates gathered so far, keyed by their crossing tensors."""

    def __init__(self, g: ModelGraph, problem: CutProblem) -> None:
        self.g = g
        self.problem = problem
        self.all_units = frozenset(problem.units)
        self.chain = chain_cuts(g)
        self.chain_by_tensor = {c.tensor: c for c in self.chain}
        self.splits: dict[tuple[str, ...], PlannedPartition] = {}

    def add(self, device_set: frozenset[str], tensors: tuple[str, ...], reference: bool = False) -> bool:
        """Add a split; True if it is new."""
        if tensors in self.splits:
            if reference:
                self.splits[tensors].reference = True
            return False
        if not device_set or device_set >= self.all_units or not tensors:
            return False
        one = self.chain_by_tensor.get(tensors[0]) if len(tensors) == 1 else None
        pid = f"cut-{one.index}" if one is not None else ""
        self.splits[tensors] = PlannedPartition(pid, "split", list(tensors), device_set, reference=reference)
        return True

    def add_references(self, options: PlanOptions) -> None:
        """Every chain cut (``candidates="chain"``) or ``reference_cuts`` evenly spaced ones."""
        chain = self.chain
        if options.candidates == "chain":
            picked = chain
        else:
            n = min(options.reference_cuts, len(chain))
            picked = [chain[(i + 1) * len(chain) // (n + 1)] for i in range(n)]
        for c in picked:
            self.add(frozenset(u for u in c.device_set if u in self.all_units), (c.tensor,), reference=True)

    def ordered(self) -> list[PlannedPartition]:
        """cloud, the splits by device node count (``dag-K`` ids given in that order), device."""
        g, problem = self.g, self.problem

        def first_index(p: PlannedPartition) -> int:
            return min((g.graph.nodes[problem.producer[t]]["index"] if problem.producer.get(t) else -1)
                       for t in p.tensors)

        ordered = sorted(self.splits.values(), key=lambda p: (len(p.device_set), first_index(p)))
        k = 0
        for p in ordered:
            if not p.id:
                k += 1
                p.id = f"dag-{k}"
        cloud = PlannedPartition("cloud", "cloud", list(g.input_names), frozenset())
        device = PlannedPartition("device", "device", [], self.all_units)
        return [cloud, *ordered, device]


def _profile_nodes(g: ModelGraph, buckets: list[_Bucket], options: PlanOptions, report: Progress,
                   device: DeviceProfile | None) -> None:
    """Per-node device and cloud estimates of every bucket (device: measured here, or imported)."""
    reps = max(3, options.repeats // 2)
    total = 2 * len(buckets)
    for i, b in enumerate(buckets):
        report("profile nodes", 2 * i, total)
        b.dev_prof = profile_nodes(g, threads=options.device_threads, warmup=options.warmup, repeats=reps,
                                   feeds=b.shape.feeds)
        report("profile nodes", 2 * i + 1, total)
        b.cloud_prof = profile_nodes(g, threads=options.cloud_threads, warmup=options.warmup, repeats=reps,
                                     feeds=b.shape.feeds)
        if device is not None:
            b.imported = device.node_profile(b.shape.shapes)
    report("profile nodes", total, total)


def _search(splits: _Splits, buckets: list[_Bucket], options: PlanOptions, report: Progress) -> float:
    """DADS min-cut candidates at every bucket; returns the planning ms spent."""
    ranked: dict[tuple[str, ...], tuple[DagCut, int]] = {}
    spent = 0.0
    for i, b in enumerate(buckets):
        report("search partitions", i, len(buckets))
        assert b.dev_prof is not None and b.cloud_prof is not None
        est_dev = (b.imported or b.dev_prof).node_ms
        slow = 1.0 if b.imported else options.device_slowdown
        dev_units = {u: est_dev.get(u, 0.0) * slow for u in b.problem.units}
        cloud_units = {u: b.cloud_prof.node_ms.get(u, 0.0) for u in b.problem.units}
        t0 = time.perf_counter()
        ref_ms = max(1e-6, sum(dev_units.values()))
        found = search_candidates(b.problem, dev_units, cloud_units, options.energy, ref_ms,
                                  uplink_mbps=options.grid.uplink_mbps)
        spent += (time.perf_counter() - t0) * 1e3
        for cut, wins in found.values():
            prev = ranked.get(cut.tensors)
            ranked[cut.tensors] = (cut, wins + (prev[1] if prev else 0))
    taken = 0
    for cut, _wins in sorted(ranked.values(), key=lambda cw: (-cw[1], len(cw[0].device_set))):
        if taken >= options.max_candidates:
            break
        taken += splits.add(cut.device_set, cut.tensors)
    report("search partitions", len(buckets), len(buckets))
    return spent


def _extract(extractor: Extractor, parts: list[PlannedPartition], report: Progress) -> None:
    splits = [p for p in parts if p.kind == "split"]
    for i, p in enumerate(splits):
        report("extract partitions", i, len(splits))
        p.prefix = extractor.prefix(p.tensors)
        p.suffix = extractor.suffix(p.tensors)
        p.tensors = [i.name for i in p.suffix.graph.input if i.name in set(p.tensors)]
    report("extract partitions", len(splits), len(splits))


def _measure(g: ModelGraph, parts: list[PlannedPartition], b: _Bucket, options: PlanOptions,
             report: Progress, step: str, device: DeviceProfile | None = None) -> None:
    """Time every partition's real sessions at bucket ``b``; fill ``b.stats``.

    Device times: this machine's (times ``device_slowdown``), or with a device
    profile the device's own measurement of the partition, else its per-node
    sum corrected by this machine's measured/estimated ratio."""
    assert b.dev_prof is not None and b.cloud_prof is not None
    problem = b.problem
    down = _bytes(problem, list(g.output_names))
    inputs = set(g.input_names)
    # all partitions measured together, round by round (load drift hits them alike)
    sides = [(g.model if p.kind == "device" else p.prefix, g.model if p.kind == "cloud" else p.suffix) for p in parts]
    timings = time_partitions(
        sides, b.shape.feeds, device_threads=options.device_threads, cloud_threads=options.cloud_threads,
        warmup=options.warmup, repeats=options.repeats, device_gap_ms=10.0,
        progress=lambda done, total: report(step, done, total),
    )
    for p, (pre_model, _), (dev_t, cloud_t) in zip(parts, sides, timings):
        est_d = b.dev_prof.sum(p.device_set)
        est_c = b.cloud_prof.sum(u for u in problem.units if u not in p.device_set)
        device_ms = 0.0
        if dev_t is not None:
            device_ms = dev_t.typical_ms * options.device_slowdown
            if b.imported is not None:
                correction = dev_t.typical_ms / est_d if est_d > 0 else 1.0
                device_ms = b.imported.sum(p.device_set) * correction
            if device is not None:
                measured = device.partition_ms(p.id, b.shape.shapes, kind=p.kind, tensors=p.tensors)
                device_ms = measured if measured is not None else device_ms
        b.stats[p.id] = {
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


def _device_encode_ms(parts: list[PlannedPartition], main: _Bucket, device: DeviceProfile) -> None:
    """Encoded twins cost the device's encode time (measured there, else this
    machine's scaled by the device's full-model speed against this machine's)."""
    here = main.stats["device"]["device_timing"]
    speed = device.model_ms(main.shape.shapes) / here["p25_ms"] if here and here.get("p25_ms") else 1.0
    base = {p.id: p for p in parts}
    for p in parts:
        if not p.base:
            continue
        enc = device.encode_ms(p.id, main.shape.shapes, tensors=base[p.base].tensors)
        enc = enc if enc is not None else p.stats["encode_ms"] * speed
        p.stats.update(encode_ms=round(enc, 4), device_ms=round(base[p.base].stats["device_ms"] + enc, 4))


def _calibration(g: ModelGraph, options: PlanOptions, shape: ShapeBucket,
                 samples: list[dict[str, Any]] | None) -> Calibration:
    """Calibration requests of the encoding guard: the user's, else the samples
    of the main bucket's shape, else seeded requests of that shape."""
    if options.calibration is not None:
        return load_calibration(options.calibration, g.inputs, samples=options.calibration_samples,
                                batch=options.batch)
    same = [s for s in samples or [] if all(tuple(np.shape(s[k])) == v for k, v in shape.shapes.items())]
    if same:
        return Calibration(same, "--sample", len(same))
    types = {s.name: s.datatype for s in g.inputs}
    reqs = [seeded_feeds(shape.shapes, types, seed=10_000 + i) for i in range(options.calibration_samples)]
    return Calibration(reqs, "random", len(reqs))


def _encoded_stats(parts: list[PlannedPartition], main: _Bucket, b: _Bucket) -> None:
    """An encoded twin's entry at another bucket: its raw twin's there, with the
    wire ratio and the coding times of the main bucket scaled by the cut's bytes."""
    for p in parts:
        if not p.base:
            continue
        raw0, raw = main.stats[p.base], b.stats[p.base]
        scale = raw["up_bytes"] / raw0["up_bytes"] if raw0["up_bytes"] else 1.0
        enc_ms, dec_ms = p.stats["encode_ms"] * scale, p.stats["decode_ms"] * scale
        entry = dict(raw)
        entry.update(
            encoding=p.encoding, base=p.base, reference=False,
            up_bytes=int(round(p.stats["up_bytes"] * scale)),
            device_ms=round(raw["device_ms"] + enc_ms, 4), cloud_ms=round(raw["cloud_ms"] + dec_ms, 4),
            encode_ms=round(enc_ms, 4), decode_ms=round(dec_ms, 4), wire_ratio=p.stats.get("wire_ratio"),
        )
        b.stats[p.id] = entry


def _profile_doc(buckets: list[_Bucket], kept: list[PlannedPartition], measured: list[PlannedPartition],
                 options: PlanOptions, enc_profile: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The ``profile.json`` document: the main bucket's figures at the top, every bucket under ``buckets``."""
    main = buckets[0]
    assert main.dev_prof is not None and main.cloud_prof is not None
    kinds = {p.id: p.kind for p in kept}
    keep = set(kinds)
    return {
        "version": 1,
        "batch": options.batch,
        "shapes": main.shape.to_dict()["shapes"],
        "notes": notes,
        "device": {
            "threads": options.device_threads,
            "slowdown": options.device_slowdown,
            "source": f"imported:{main.imported.source}" if main.imported else "measured",
            "model_ms": round(main.dev_prof.total_ms, 4),
            "attributed": round(main.dev_prof.attributed, 4),
        },
        "cloud": {
            "threads": options.cloud_threads,
            "model_ms": round(main.cloud_prof.total_ms, 4),
            "attributed": round(main.cloud_prof.attributed, 4),
        },
        "energy": options.energy.to_dict(),
        "constraints": options.constraints.to_dict(),
        "excluded": sorted(_excluded({k: main.stats[k] for k in keep}, kinds, options.constraints.device_memory_mb)),
        "estimate_error": _errors(measured),
        "graph": main.problem.stats(),
        "partitions": {p.id: main.stats[p.id] for p in kept},
        "encodings": enc_profile,
        "node_ms": {
            "device": {k: round(v, 5) for k, v in main.dev_prof.node_ms.items()},
            "cloud": {k: round(v, 5) for k, v in main.cloud_prof.node_ms.items()},
        },
        "buckets": [_bucket_doc(b, kept) for b in buckets],
    }


def _bucket_doc(b: _Bucket, kept: list[PlannedPartition]) -> dict[str, Any]:
    assert b.dev_prof is not None and b.cloud_prof is not None
    return {
        **b.shape.to_dict(),
        "from_sample": b.shape.from_sample,
        "model_ms": {"device": round(b.dev_prof.total_ms, 4), "cloud": round(b.cloud_prof.total_ms, 4)},
        "partitions": {p.id: b.stats[p.id] for p in kept},
        "node_ms": {
            "device": {k: round(v, 5) for k, v in b.dev_prof.node_ms.items()},
            "cloud": {k: round(v, 5) for k, v in b.cloud_prof.node_ms.items()},
        },
    }


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
