"""Planning a model: named stages from a model graph to measured partitions and decision tables.

:func:`plan_model` is what :func:`splitgate.planner.build_bundle` runs between loading the
model and writing files. A :class:`Planner` runs these stages in order, one
method each:

1. :meth:`~Planner.resolve_shapes`: the shape buckets (``input_shapes``,
   samples), a first run of the model at each, the device profile;
2. :meth:`~Planner.find_cuts`: the cut problem at each bucket and the
   reference chain cuts (``reference_cuts``, or every chain cut);
3. :meth:`~Planner.profile_nodes`: per-node profiles of the full model
   (device threads, cloud threads; the device one optionally imported);
4. :meth:`~Planner.search`: DADS min-cut over the condition space on those
   estimates -> a shortlist of splits;
5. :meth:`~Planner.extract`: prefix and suffix models of every split;
   then, with ``PlanOptions.quantize``, :meth:`~Planner.quantize`: guarded int8
   twins of the prefixes and of the full model (``cut-9~int8``, ``device~int8``);
6. :meth:`~Planner.measure`: the real prefix and suffix sessions of every
   partition (``device``, ``cloud``, the splits) timed at every bucket (int8
   twins neither faster nor smaller than their fp32 prefix are dropped);
7. :meth:`~Planner.encode`: encoded twins (``cut-3@int8``, ``cloud@int8``) of
   the splits and of ``cloud`` that pass the accuracy guard, at every bucket;
8. :meth:`~Planner.decide`: one decision table per bucket; partitions that win
   nowhere are dropped (reference cuts and their int8 twins, ``device``,
   ``device~int8`` and ``cloud`` stay);
9. :meth:`~Planner.document`: the typed ``profile.json``
   (:class:`~splitgate.planner._partition_profile.Profile`).

Without profiling (``PlanOptions.profile=False``) only stages 1, 2 and 5 run.

Partition ids: ``device``, ``cloud``, ``cut-<k>`` for a partition whose cut is
the single tensor of chain cut k (numbered as :func:`splitgate.planner.chain_cuts`), and
``dag-<k>`` for a cut of several tensors, k = 1, 2, ... in order of device
node count (ties by the first crossing tensor's topological position);
``P~int8`` for the int8 twin of ``P``'s prefix and ``P@E`` (``cut-9~int8@fp16``)
for an encoded twin (:func:`splitgate.planner._quantize.candidate_parts`).
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from splitgate.planner._accuracy import Calibration, load_calibration
from splitgate.planner._cascade import INT8, PlannedCascade, check_interface, load_cascade_model, measure_cascade, \
    plan_cascade, with_device_ms
from splitgate.planner._cost import Conditions, Constraints, EnergyModel, Estimate
from splitgate.planner._cuts import chain_cuts
from splitgate.planner._decide import DecisionTable, Grid, build_table, search_candidates
from splitgate.planner._device import DeviceProfile, load_device_profile
from splitgate.planner._encoding import add_encoded
from splitgate.planner._extract import Extractor
from splitgate.planner._graph import ModelGraph
from splitgate.planner._mincut import CutProblem, DagCut
from splitgate.planner._options import PlanOptions
from splitgate.planner._partition_profile import (
    BucketProfile,
    PartitionProfile,
    PlannedPartition,
    Profile,
    partition_estimate,
)
from splitgate.planner._profile import NodeProfile, profile_nodes, time_partitions
from splitgate.planner._quantize import PrefixQuantizer, QuantizeResult
from splitgate.planner._reference import ReferenceStats, reference_from_model
from splitgate.planner._shapes import ShapeBucket, load_samples, resolve_buckets, seeded_feeds, tensor_nbytes
from splitgate.errors import BundleError, InvalidArgument

__all__ = ["Plan", "Planner", "plan_model", "table_for"]

Progress = Callable[[str, int, int], None]


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
        reference: the drift reference statistics of the calibration inputs
            (:mod:`splitgate.planner._reference`; None without real inputs).
        cascade: the confident-on-device cascade (``PlanOptions.cascade``;
            :mod:`splitgate.planner._cascade`), or None.
    """

    partitions: list[PlannedPartition]
    profile: Profile | None
    table: DecisionTable | None
    shapes: list[ShapeBucket] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: list[DecisionTable] = field(default_factory=list)
    reference: ReferenceStats | None = None
    cascade: PlannedCascade | None = None


def _bytes(problem: CutProblem, tensors: list[str]) -> int:
    return int(sum(problem.nbytes.get(t, 0) for t in tensors))


def _mem_bytes(problem: CutProblem, prefix: onnx.ModelProto | None, device_set: frozenset[str]) -> int:
    """Rough peak device memory of a prefix: its serialized weights plus twice its largest activation."""
    weights = prefix.ByteSize() if prefix is not None else 0
    act = max((problem.nbytes.get(t, 0) for u in device_set for t in problem.writes.get(u, [])), default=0)
    return int(weights + 2 * min(act, 1 << 34))


def table_for(
    stats: Mapping[str, PartitionProfile],
    energy: EnergyModel,
    constraints: Constraints,
    grid: Grid,
) -> DecisionTable:
    """The decision table of one shape bucket from its partitions' figures.

    Partitions over the device memory limit are excluded (unless every one is);
    ``cloud`` and ``device`` are always candidates.

    Args:
        stats: partition id -> its figures at the bucket.
        energy: device power figures.
        constraints: latency SLO and device memory.
        grid: the condition grid.

    Returns:
        The :class:`DecisionTable`.
    """

    def est(pid: str, c: Conditions) -> Estimate:
        return partition_estimate(stats[pid], stats[pid].kind, c, energy)

    excluded = _excluded(stats, constraints.device_memory_mb)
    return build_table(
        est, list(stats), grid,
        ref=lambda c: est("device", c), slo_ms=constraints.slo_ms,
        excluded=excluded, always=("cloud", "device"),
    )


def _excluded(stats: Mapping[str, PartitionProfile], limit_mb: float | None) -> frozenset[str]:
    excluded = frozenset(
        pid for pid, e in stats.items()
        if limit_mb is not None and e.kind != "cloud" and e.device_mem_bytes > limit_mb * 1e6
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
    stats: dict[str, PartitionProfile] = field(default_factory=dict)
    table: DecisionTable | None = None


def plan_model(
    g: ModelGraph, options: PlanOptions, extractor: Extractor, progress: Progress | None = None,
    *, model_sha256: str | None = None,
) -> Plan:
    """Choose, extract and (optionally) measure a model's partitions (:class:`Planner`'s stages).

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
    return Planner(g, options, extractor, progress, model_sha256=model_sha256).run()


class Planner:
    """One planning run of one model: each public method is a stage, :meth:`run` runs them in order.

    Args:
        g: the model graph.
        options: planning options (validated here).
        extractor: the extractor to cut ``g`` with.
        progress: ``callback(step, done, total)``.
        model_sha256: the model file's digest, to refuse a device profile of another model.

    Raises:
        InvalidArgument: bad options.
    """

    def __init__(self, g: ModelGraph, options: PlanOptions, extractor: Extractor,
                 progress: Progress | None = None, *, model_sha256: str | None = None) -> None:
        options.validate()
        self.g = g
        self.options = options
        self.extractor = extractor
        self.report: Progress = progress or (lambda step, done, total: None)
        self.model_sha256 = model_sha256
        self.samples: list[dict[str, Any]] | None = None
        self.shapes: list[ShapeBucket] = []
        self.notes: list[str] = []
        self.device: DeviceProfile | None = None
        self.buckets: list[_Bucket] = []
        self.splits: _Splits | None = None
        self.parts: list[PlannedPartition] = []
        self.encodings: dict[str, Any] = {}
        self.planning_ms = 0.0
        self.quantization: dict[str, Any] = {}
        self._int8: dict[str, QuantizeResult] = {}
        self._calibration: Calibration | None = None
        self._cascade: tuple[onnx.ModelProto | None, str] | None = None  # (user model or None = int8, output)

    def run(self) -> Plan:
        """Run every stage.

        Returns:
            The :class:`Plan`.

        Raises:
            see :func:`plan_model`.
        """
        self.resolve_shapes()
        self.check_calibration()
        self.check_cascade()
        self.find_cuts()
        if not self.options.profile:
            self.extract()
            return Plan(self.parts, None, None, self.shapes, self.notes, reference=self.reference(),
                        cascade=self.cascade())
        self.profile_nodes()
        self.search()
        self.extract()
        self.quantize()
        self.measure()
        self.encode()
        cascade = self.cascade()
        kept = self.decide()
        return Plan(kept, self.document(kept), self.buckets[0].table, self.shapes, self.notes,
                    [b.table for b in self.buckets if b.table is not None], reference=self.reference(),
                    cascade=cascade)

    def resolve_shapes(self) -> None:
        """The shape buckets to plan at (``input_shapes``, samples, a dynamic batch),
        each run once through the model; the device profile, checked against the model.

        Raises:
            InvalidArgument: unreadable samples or device profile, one of another
                model, or a model that fails on a bucket's inputs.
            DynamicShapeError: a dynamic non-batch dimension without a size.
        """
        g, options = self.g, self.options
        self.samples = load_samples(options.samples, g.inputs) if options.samples is not None else None
        self.shapes, self.notes = resolve_buckets(g, options.shapes(), self.samples, batch=options.batch)
        self.extractor.feeds = self.shapes[0].feeds  # types of cut tensors inference left open: from a real run
        _check_runs(g, self.shapes)
        if options.device_profile is not None and options.profile:
            self.device = load_device_profile(options.device_profile)
            self.device.check_model(self.model_sha256, what=str(g.source or "the model"), nodes=g.order)

    def find_cuts(self) -> None:
        """The cut problem at every bucket (tensor bytes at its shapes) and the reference chain cuts."""
        self.report("find cuts", 0, len(self.shapes))
        structure = CutProblem(self.g)
        for i, shape in enumerate(self.shapes):
            problem = CutProblem(self.g, tensor_nbytes(self.g.model, shape, structure.tensors))
            self.buckets.append(_Bucket(shape, problem))
            self.report("find cuts", i + 1, len(self.shapes))
        self.splits = _Splits(self.g, self.buckets[0].problem)
        self.splits.add_references(self.options)

    def profile_nodes(self) -> None:
        """Per-node device and cloud times of the full model at every bucket."""
        _profile_nodes(self.g, self.buckets, self.options, self.report, self.device)

    def search(self) -> None:
        """Min-cut candidates over the condition space at every bucket (``candidates="optimal"``)."""
        if self.options.candidates == "optimal":
            assert self.splits is not None
            self.planning_ms += _search(self.splits, self.buckets, self.options, self.report)

    def extract(self) -> None:
        """Order the partitions (cloud, splits, device; ``dag-K`` ids) and extract every split's
        prefix and suffix.

        Raises:
            BundleError: a partition cannot be extracted as a valid model.
        """
        assert self.splits is not None
        self.parts = self.splits.ordered()
        _extract(self.extractor, self.parts, self.report)
        problem = self.buckets[0].problem
        for p in self.parts:
            p.up_bytes = _bytes(problem, p.tensors)

    def quantize(self) -> None:
        """Int8 twins (``cut-9~int8``, ``device~int8``) of every split's prefix and of the full
        model that pass the accuracy guard (``PlanOptions.quantize``; :mod:`splitgate.planner._quantize`),
        each placed after its fp32 partition. :meth:`measure` times them with the others
        and drops those neither faster nor smaller than their fp32 prefix.

        Raises:
            InvalidArgument: unreadable calibration inputs.
            BundleError: onnxruntime cannot run the fp32 model on them.
        """
        if not self.options.quantize:
            return
        calibration = self.calibration()
        guard = self.options.guard()
        bases = [p.id for p in self.parts if (p.kind == "split" and p.prefix is not None) or p.kind == "device"]
        out: list[PlannedPartition] = []
        with PrefixQuantizer(self.g.model, calibration, guard, threads=self.options.cloud_threads) as quantizer:
            for p in self.parts:
                out.append(p)
                if p.id not in bases:
                    continue
                self.report("quantize prefixes", len(self._int8), len(bases))
                int8, result = quantizer.quantize(p.id, p.prefix, p.suffix)
                self._int8[result.pid] = result
                if int8 is not None:
                    out.append(replace(p, id=result.pid, prefix=int8, precision="int8",  # (a reference's twin stays too)
                                       fp32_prefix=p.prefix if p.prefix is not None else self.g.model))
            self.report("quantize prefixes", len(bases), len(bases))
            self.quantization = {
                "method": quantizer.method, "per_channel": quantizer.per_channel, "guard": guard.to_dict(),
                "calibration": {"source": calibration.source, "samples": calibration.samples,
                                "requests": len(calibration.requests)},
                "calibration_s": round(quantizer.calibration_s, 3), "measured": {}, "dropped": {},
            }
        self.parts = out
        if calibration.source == "random" or calibration.samples < 300:
            self.notes.append(
                f"int8 prefixes calibrated and guarded on {calibration.samples} "
                f"{'random ' if calibration.source == 'random' else ''}calibration samples: no disagreement "
                f"in n samples bounds the rate at about 3/n (95%), so a 99% agreement claim needs about 300 "
                f"real ones (--calibration)")

    def _keep_helpful_int8(self) -> None:
        """Drop the int8 twins whose prefix is neither measured faster nor smaller than the fp32 one;
        record every twin tried in ``self.quantization``."""
        main = self.buckets[0].stats
        for p in self.parts:
            if p.precision != "fp32":
                r = self._int8[p.id]
                r.fp32_ms, r.int8_ms = main[r.base].device_ms, main[p.id].device_ms
                if not (r.int8_ms < r.fp32_ms or r.int8_bytes < r.fp32_bytes):
                    r.dropped = (f"neither faster ({r.int8_ms:.3f} ms vs {r.fp32_ms:.3f} ms) nor smaller "
                                 f"({r.int8_bytes} vs {r.fp32_bytes} bytes) than the fp32 prefix")
        gone = {pid for pid, r in self._int8.items() if r.dropped}
        self.parts = [p for p in self.parts if p.id not in gone]
        for b in self.buckets:
            for pid in gone:
                b.stats.pop(pid, None)
        if self.quantization:
            self.quantization["measured"] = {pid: r.to_dict() for pid, r in self._int8.items()}
            self.quantization["dropped"] = {pid: r.dropped for pid, r in self._int8.items() if r.dropped}

    def measure(self) -> None:
        """Time every partition's real sessions at every bucket.

        Raises:
            BundleError: onnxruntime cannot run a partition.
        """
        many = len(self.buckets) > 1
        for b in self.buckets:
            step = f"measure partitions {b.shape.label}" if many else "measure partitions"
            _measure(self.g, self.parts, b, self.options, self.report, step, self.device)
        for p in self.parts:
            p.profile = self.buckets[0].stats[p.id]
        self._keep_helpful_int8()

    def encode(self) -> None:
        """Encoded twins of the splits and of ``cloud`` that pass the accuracy guard, their figures
        at every bucket.

        Raises:
            BundleError: onnxruntime fails while measuring encodings.
            InvalidArgument: unreadable calibration inputs.
        """
        main = self.buckets[0]
        calibration = self.calibration()
        self.parts, self.encodings = add_encoded(self.g, self.parts, self.options, self.report,
                                                 calibration=calibration)
        if self.device is not None:
            _device_encode_ms(self.parts, main, self.device)
        main.stats = {p.id: p.measured() for p in self.parts}
        for b in self.buckets[1:]:
            _encoded_stats(self.parts, main, b)

    def check_calibration(self) -> None:
        """Refuse ``--quantize`` and ``--cascade`` where the accuracy guard would
        compare copies of one request, before any measuring.

        Without ``--calibration`` or ``--sample`` the guard's requests are
        generated, and a generated integer input is all ones in every one of
        them (:func:`seeded_feeds`: a random token id, index or length may be
        out of range for the graph). A byte or token classifier would then be
        "guarded" on a single input: its int8 twin and cascade kept at 100 %
        agreement, and confidently wrong on real traffic (seen on a real
        byte-level classifier: 0 % top-1 agreement on random bytes).

        Without ``--quantize`` or ``--cascade`` a plan note says the same of the
        lossy wire encodings' guard.

        Raises:
            InvalidArgument: ``quantize`` or ``cascade`` is set, the calibration
                would be generated, and the model has an integer input.
        """
        o = self.options
        if o.calibration is not None:
            return
        main = self.shapes[0].shapes
        if any(all(tuple(np.shape(s[k])) == v for k, v in main.items()) for s in self.samples or []):
            return
        integers = [f"{i.name} ({i.datatype})" for i in self.g.inputs
                    if i.datatype.startswith(("INT", "UINT"))]
        if not integers:
            return
        wanted = [flag for flag, on in (("--quantize", o.quantize), ("--cascade", o.cascade is not None)) if on]
        if not wanted:
            self.notes.append(
                f"lossy wire encodings, if any, are guarded on generated requests whose integer inputs "
                f"({', '.join(integers)}) are all 1: pass --calibration or --sample for a guard that means something")
            return
        raise InvalidArgument(
            f"{' and '.join(wanted)} need real calibration inputs for a model with integer inputs "
            f"({', '.join(integers)}): generated ones are all 1, so the accuracy guard would compare one "
            f"request with itself; pass --calibration FILE.npz or --sample FILE.npz at the planned shape")

    def check_cascade(self) -> None:
        """Read the cascade model (``PlanOptions.cascade``) and check its interface, before any
        measuring.

        Raises:
            InvalidArgument: the file is missing or unreadable, or its inputs or
                outputs do not match the model's (one line), or the model has no
                classifier output.
        """
        source = self.options.cascade
        if source is None:
            return
        g = self.g
        if str(source) == INT8:
            self._cascade = (None, check_interface(g.inputs, g.outputs, g.model, what="int8"))
            return
        small = load_cascade_model(source)
        self._cascade = (small, check_interface(g.inputs, g.outputs, small, what=str(source)))

    def cascade(self) -> PlannedCascade | None:
        """The cascade's threshold calibrated on the calibration requests and, when profiling,
        its small model timed against the full model (:mod:`splitgate.planner._cascade`).
        ``--cascade int8`` takes the kept ``device~int8`` partition's model, else quantizes
        the full model for it (whether or not it passed the guard as a partition: the
        threshold is what guards the cascade).

        Raises:
            InvalidArgument: unreadable calibration inputs, a model failing on them,
                or nothing to quantize for ``int8``.
        """
        if self._cascade is None:
            return None
        small, output = self._cascade
        calibration = self.calibration()
        guard = self.options.guard()
        source = str(self.options.cascade)
        if small is None:
            small = self._int8_full_model(calibration, guard)
            source = INT8
        else:
            source = os.path.basename(source)
        self.report("calibrate cascade", 0, 1)
        planned = plan_cascade(self.g.model, small, source=source, output=output, calibration=calibration,
                               guard=guard, threads=self.options.cloud_threads)
        stats = self.buckets[0].stats if self.buckets else {}
        if self.options.profile and "device" in stats:
            o = self.options
            twin = stats.get("device~int8") if source == INT8 else None
            measured_on_device = self._device_cascade_ms(planned)
            if measured_on_device is not None:  # the device's own timing (plan --device-profile)
                planned = with_device_ms(planned, measured_on_device, stats["device"].device_ms)
            elif twin is not None and any(p.id == "device~int8" and p.prefix is small for p in self.parts):
                # the cascade is the kept device~int8 model: its time is that partition's, measured with
                # the others (a second timing of the same model differs by noise, and would make the
                # cascade "pay" in front of device~int8 itself)
                planned = with_device_ms(planned, twin.device_ms, stats["device"].device_ms)
            else:
                planned = measure_cascade(planned, self.g.model, self.shapes[0].feeds,
                                          full_device_ms=stats["device"].device_ms,
                                          threads=o.device_threads, warmup=o.warmup, repeats=o.repeats)
        if calibration.source == "random":
            self.notes.append("cascade threshold calibrated on seeded random inputs: pass real ones "
                              "(--calibration or --sample) for a meaningful exit rate")
        if planned.spec.exit_rate == 0.0:
            self.notes.append(f"cascade {source}: no calibration sample exits within the guard "
                              f"(top-1 agreement >= {guard.min_top1_agreement:g}); the edge will not use it")
        self.report("calibrate cascade", 1, 1)
        return planned

    def _device_cascade_ms(self, planned: PlannedCascade) -> float | None:
        """The device profile's own timing of this small model (``splitgate profile`` of a
        bundle carrying the same cascade model), or None (with a note when a profile is
        given but timed no such model: the planning machine's ratio is used)."""
        if self.device is None:
            return None
        sha = hashlib.sha256(planned.model.SerializeToString()).hexdigest()
        ms = self.device.cascade_ms(sha, self.shapes[0].shapes)
        if ms is None:
            self.notes.append(
                f"the device profile ({self.device.label}) has no timing of this cascade model: its device time "
                "is this machine's small/full ratio times the device's full-model time (profile a bundle "
                "carrying it with `splitgate profile`, then plan with that profile or `splitgate refit`)")
        return ms

    def _int8_full_model(self, calibration: Calibration, guard: Any) -> onnx.ModelProto:
        """The int8 full model: the kept ``device~int8`` partition's, else quantized here.

        Raises:
            InvalidArgument: the model has nothing onnxruntime's tools quantize.
        """
        for p in self.parts:
            if p.id == "device~int8" and p.prefix is not None:
                return p.prefix
        with PrefixQuantizer(self.g.model, calibration, guard, threads=self.options.cloud_threads) as q:
            if q.method is None:
                raise InvalidArgument("--cascade int8: the model has nothing to quantize "
                                      "(no Conv, MatMul, Gemm, LSTM, GRU or Attention)")
            try:
                return q._quantize(q.model, "cascade")  # noqa: SLF001 - the same tools and ranges as device~int8
            except Exception as exc:  # noqa: BLE001 - the tools raise many types
                raise InvalidArgument(f"--cascade int8: quantizing the model failed: {type(exc).__name__}: "
                                      f"{str(exc).splitlines()[0] if str(exc) else ''}") from None

    def calibration(self) -> Calibration:
        """The calibration requests (the encoding guard's and the drift reference's), loaded once.

        Raises:
            InvalidArgument: unreadable calibration inputs.
        """
        if self._calibration is None:
            self._calibration = _calibration(self.g, self.options, self.shapes[0], self.samples)
        return self._calibration

    def reference(self) -> ReferenceStats | None:
        """The drift reference statistics of the model on the calibration inputs
        (:mod:`splitgate.planner._reference`), when they are real (``calibration`` or
        ``samples``); None for generated inputs, which say nothing about real traffic.

        Raises:
            InvalidArgument: unreadable calibration inputs, or the model fails on one.
        """
        if self.options.calibration is None and not self.samples:
            return None
        calibration = self.calibration()
        if calibration.source == "random":
            return None
        self.report("drift reference", 0, 1)
        ref = reference_from_model(self.g.model.SerializeToString(), calibration.requests, calibration.source)
        self.report("drift reference", 1, 1)
        return ref

    def decide(self) -> list[PlannedPartition]:
        """One decision table per bucket.

        Returns:
            The partitions kept: those that win somewhere (and an encoded
            winner's raw twin), the reference cuts, ``device``, ``cloud`` and
            every guarded ``cloud@E`` twin that wins or sends fewer bytes than
            ``cloud`` (the honest cloud-only baselines).
        """
        self.report("decision table", 0, len(self.buckets))
        t0 = time.perf_counter()
        o = self.options
        for i, b in enumerate(self.buckets):
            b.table = table_for(b.stats, o.energy, o.constraints, o.grid)
            self.report("decision table", i + 1, len(self.buckets))
        self.planning_ms += (time.perf_counter() - t0) * 1e3
        winners = {pid for b in self.buckets if b.table is not None for pid in b.table.candidates}
        keep = {p.id for p in self.parts if p.id in winners or p.reference or p.kind != "split"}
        keep -= {p.id for p in self.parts if p.kind == "cloud" and p.base and p.id not in winners
                 and p.measured().up_bytes >= self.buckets[0].stats[p.base].up_bytes}  # cloud@E not smaller
        keep |= {p.base for p in self.parts if p.base and p.id in keep}  # an encoded winner keeps its raw twin
        return [p for p in self.parts if p.id in keep]

    def document(self, kept: list[PlannedPartition]) -> Profile:
        """The ``profile.json`` document of the kept partitions."""
        measured = [p for p in self.parts if p.kind == "split" and not p.base and p.precision == "fp32"] + \
            [p for p in self.parts if p.kind != "split" and not p.base and p.precision == "fp32"]
        profile = _profile_doc(self.buckets, kept, measured, self.options, self.encodings, self.notes)
        profile.planning_ms = round(self.planning_ms, 3)
        profile.quantization = self.quantization or None
        return profile


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
    sides = [(g.model if p.kind == "device" and p.prefix is None else p.prefix, g.model if p.kind == "cloud" else p.suffix)
             for p in parts]
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
            if device is not None:  # (an int8 twin the device did not time: the per-node sum, corrected)
                measured = device.partition_ms(p.id, b.shape.shapes, kind=p.kind, tensors=p.tensors)
                device_ms = measured if measured is not None else device_ms
        b.stats[p.id] = PartitionProfile(
            kind=p.kind,
            tensors=tuple(p.tensors),
            device_nodes=len(p.device_set),
            up_bytes=_bytes(problem, p.tensors),
            down_bytes=down if p.kind != "device" else 0,
            sends_input=bool(inputs & set(p.tensors)),
            device_ms=round(device_ms, 4),
            cloud_ms=round(cloud_t.typical_ms, 4) if cloud_t is not None else 0.0,
            device_timing=dev_t,
            cloud_timing=cloud_t,
            est_device_ms=round(est_d, 4),
            est_cloud_ms=round(est_c, 4),
            device_mem_bytes=_mem_bytes(problem, pre_model if p.kind != "cloud" else None, p.device_set),
            reference=p.reference,
            precision=None if p.precision == "fp32" else p.precision,
        )


def _device_encode_ms(parts: list[PlannedPartition], main: _Bucket, device: DeviceProfile) -> None:
    """Encoded twins cost the device's encode time (measured there, else this
    machine's scaled by the device's full-model speed against this machine's)."""
    here = main.stats["device"].device_timing
    p25 = round(here.p25_ms, 4) if here and here.p25_ms else None  # as profile.json stores it
    speed = device.model_ms(main.shape.shapes) / p25 if p25 else 1.0
    base = {p.id: p for p in parts}
    for p in parts:
        if not p.base:
            continue
        twin = p.measured()
        enc = device.encode_ms(p.id, main.shape.shapes, tensors=base[p.base].tensors)
        enc = enc if enc is not None else (twin.encode_ms or 0.0) * speed
        p.profile = replace(twin, encode_ms=round(enc, 4),
                            device_ms=round(base[p.base].measured().device_ms + enc, 4))


def _encoded_stats(parts: list[PlannedPartition], main: _Bucket, b: _Bucket) -> None:
    """An encoded twin's figures at another bucket: its raw twin's there, with the
    wire bytes and the coding times of the main bucket scaled by the cut's bytes."""
    for p in parts:
        if not p.base:
            continue
        twin = p.measured()
        raw0, raw = main.stats[p.base], b.stats[p.base]
        scale = raw.up_bytes / raw0.up_bytes if raw0.up_bytes else 1.0
        b.stats[p.id] = raw.encoded(
            p.encoding, p.base, up_bytes=int(round(twin.up_bytes * scale)),
            encode_ms=(twin.encode_ms or 0.0) * scale, decode_ms=(twin.decode_ms or 0.0) * scale,
            wire_ratio=twin.wire_ratio,
        )


def _profile_doc(buckets: list[_Bucket], kept: list[PlannedPartition], measured: list[PlannedPartition],
                 options: PlanOptions, enc_profile: dict[str, Any], notes: list[str]) -> Profile:
    """The ``profile.json`` document: the main bucket's figures at the top, every bucket under ``buckets``."""
    main = buckets[0]
    assert main.dev_prof is not None and main.cloud_prof is not None
    partitions = {p.id: main.stats[p.id] for p in kept}
    return Profile(
        version=1,
        batch=options.batch,
        shapes=main.shape.to_dict()["shapes"],
        notes=notes,
        device={
            "threads": options.device_threads,
            "slowdown": options.device_slowdown,
            "source": f"imported:{main.imported.source}" if main.imported else "measured",
            "model_ms": round(main.dev_prof.total_ms, 4),
            "attributed": round(main.dev_prof.attributed, 4),
        },
        cloud={
            "threads": options.cloud_threads,
            "model_ms": round(main.cloud_prof.total_ms, 4),
            "attributed": round(main.cloud_prof.attributed, 4),
        },
        energy=options.energy,
        constraints=options.constraints,
        excluded=sorted(_excluded(partitions, options.constraints.device_memory_mb)),
        estimate_error=_errors(measured),
        graph=main.problem.stats(),
        partitions=partitions,
        encodings=enc_profile,
        node_ms=_node_ms(main),
        buckets=[_bucket_profile(b, kept) for b in buckets],
    )


def _node_ms(b: _Bucket) -> dict[str, dict[str, float]]:
    assert b.dev_prof is not None and b.cloud_prof is not None
    return {
        "device": {k: round(v, 5) for k, v in b.dev_prof.node_ms.items()},
        "cloud": {k: round(v, 5) for k, v in b.cloud_prof.node_ms.items()},
    }


def _bucket_profile(b: _Bucket, kept: list[PlannedPartition]) -> BucketProfile:
    assert b.dev_prof is not None and b.cloud_prof is not None
    return BucketProfile(
        shapes=dict(b.shape.shapes),
        elements=b.shape.elements,
        from_sample=b.shape.from_sample,
        model_ms={"device": round(b.dev_prof.total_ms, 4), "cloud": round(b.cloud_prof.total_ms, 4)},
        partitions={p.id: b.stats[p.id] for p in kept},
        node_ms=_node_ms(b),
    )


def _errors(parts: list[PlannedPartition]) -> dict[str, Any]:
    """How far summed per-node estimates are from measured sessions (relative error, %)."""
    out: dict[str, Any] = {}
    for side in ("device", "cloud"):
        rows = []
        for p in parts:
            e = p.measured()
            timing = e.device_timing if side == "device" else e.cloud_timing
            est = e.est_device_ms if side == "device" else e.est_cloud_ms
            if timing and timing.median_ms > 0:
                # the error of the figures as profile.json stores them (rounded to µs)
                median = round(timing.median_ms, 4)
                rows.append({"id": p.id, "estimate_ms": est, "measured_ms": median,
                             "error_pct": round(100.0 * (est - median) / median, 2)})
        errs = [abs(r["error_pct"]) for r in rows]
        out[side] = {
            "median_abs_pct": round(statistics.median(errs), 2) if errs else None,
            "max_abs_pct": round(max(errs), 2) if errs else None,
            "partitions": rows,
        }
    return out
