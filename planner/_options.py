"""Planning options: what :func:`splitgate.planner.build_bundle` is asked to do.

:class:`PlanOptions` is the planner's config. It lives apart from the planning
stages (:mod:`splitgate.planner._plan`) and from the encoding measurements
(:mod:`splitgate.planner._encoding`) so that both import it and neither imports
the other.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from splitgate.planner._accuracy import Guard
from splitgate.planner._cost import Constraints, EnergyModel
from splitgate.planner._decide import Grid
from splitgate.planner._shapes import parse_input_shapes
from splitgate.encoding import ENCODINGS
from splitgate.errors import InvalidArgument

__all__ = ["PlanOptions", "check_encodings"]


def check_encodings(encodings: Sequence[str]) -> None:
    """Check wire encoding names.

    Raises:
        InvalidArgument: an unknown encoding name.
    """
    bad = [e for e in encodings if e not in ENCODINGS]
    if bad:
        raise InvalidArgument(f"unknown encodings {bad}; expected some of {list(ENCODINGS)}")


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
            ``("raw",)`` plans raw cut tensors only. The lossless ``uint8``
            applies only where every calibration request's tensors hold
            8-bit data (images scaled from bytes; in practice ``cloud@uint8``).
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
        quantize: also plan int8 twins of the device prefixes (``cut-9~int8``,
            ``device~int8``; :mod:`splitgate.planner._quantize`), each kept only
            when it passes the accuracy guard on the calibration requests and
            its prefix is measured faster or is smaller than the fp32 one.
            Off by default (planning takes longer).
        cascade: a confident-on-device cascade (:mod:`splitgate.planner._cascade`):
            a small ONNX classifier with the model's inputs and outputs, or
            ``"int8"`` for the planner's own int8 full model; its confidence
            threshold is calibrated on the calibration requests so that the
            inputs it answers agree with the full model at least as often as
            ``min_top1_agreement``. None = no cascade.
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
    encodings: tuple[str, ...] = ("raw", "fp16", "int8", "int8c", "zstd", "uint8")
    calibration: str | os.PathLike[str] | Mapping[str, Any] | None = field(default=None, compare=False)
    calibration_samples: int = 16
    min_top1_agreement: float = 0.99
    min_cosine: float = 0.999
    max_rel_error: float | None = None
    output_kind: str = "auto"
    input_shapes: Mapping[str, Sequence[Sequence[int]]] | Sequence[str] | None = field(default=None, compare=False)
    samples: str | os.PathLike[str] | Mapping[str, Any] | None = field(default=None, compare=False)
    quantize: bool = False
    cascade: str | os.PathLike[str] | None = field(default=None, compare=False)

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
        if self.cascade is not None and str(self.cascade) != "int8" and not os.path.isfile(self.cascade):
            raise InvalidArgument(f"cascade model not found: {self.cascade} (a .onnx file, or 'int8')")
        self.shapes()
