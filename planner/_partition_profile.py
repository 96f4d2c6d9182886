"""The typed partition profile: what planning measured, as ``profile.json`` stores it.

``profile.json`` (written by :func:`splitgate.planner.build_bundle`, rewritten by
:func:`splitgate.planner.refit_bundle`) is read back through these classes:

* :class:`PartitionProfile`: one partition's figures at one shape bucket
  (bytes, measured device/cloud times and their timings, per-node estimates,
  device memory; an encoded twin's coding times; a refit's device source);
* :class:`BucketProfile`: one shape bucket (its shapes, whole-model times,
  per-node times and the partitions' figures there);
* :class:`Profile`: the document (the main bucket's figures at the top, every
  bucket under ``buckets``, energy, constraints, encodings, estimate errors).

Each has ``to_dict()`` / ``from_dict()`` that write and read exactly the JSON
the planner has always written (same keys, same order), so existing bundles
load. Older or hand-written entries may lack keys: reading fills them with the
value readers gave an absent key (``0``, ``False``, ``sends_input`` true only
for ``cloud``); keys this module does not know are kept in ``extra`` and
written back after the known ones.

:class:`PlannedPartition` (a partition while the planner works on it) also
lives here, so that the planning stages (:mod:`splitgate.planner._plan`) and the
encoding measurements (:mod:`splitgate.planner._encoding`) share it without
importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import onnx

from splitgate.planner._cost import Conditions, Constraints, EnergyModel, Estimate, estimate
from splitgate.planner._profile import Timing

__all__ = [
    "PartitionProfile",
    "BucketProfile",
    "Profile",
    "PlannedPartition",
    "partition_estimate",
]

# profile.json keys of a partition entry, in the order the planner writes them
_CORE_KEYS = (
    "kind", "tensors", "device_nodes", "up_bytes", "down_bytes", "sends_input", "device_ms", "cloud_ms",
    "device_timing", "cloud_timing", "est_device_ms", "est_cloud_ms", "device_mem_bytes", "reference",
)
# written only when set: an encoded twin's, a refit's, a per-request cost entry's
_OPTIONAL_KEYS = (
    "encoding", "base", "encode_ms", "decode_ms", "wire_ratio",
    "device_source", "planned_device_ms", "device_suffix_ms",
    "bucket", "scale", "precision",
)
_KNOWN = frozenset(_CORE_KEYS + _OPTIONAL_KEYS)


def _timing(value: Any) -> Timing | None:
    return None if value is None else Timing.from_dict(value)


@dataclass(frozen=True)
class PartitionProfile:
    """One partition's figures at one shape bucket (a ``profile.json`` partition entry).

    Attributes:
        kind: ``"device"``, ``"cloud"`` or ``"split"``.
        tensors: the crossing tensors (the model inputs for ``cloud``).
        device_nodes: nodes run on the device.
        up_bytes: bytes sent to the cloud per request (encoded bytes for an encoded twin).
        down_bytes: bytes of the model outputs coming back (0 for ``device``).
        sends_input: a crossing tensor is a model input (privacy).
        device_ms: the device time the choice uses (ms).
        cloud_ms: the cloud time the choice uses (ms).
        device_timing: the prefix session's measured timing on this machine, or None.
        cloud_timing: the suffix session's measured timing, or None.
        est_device_ms: the summed per-node device estimate.
        est_cloud_ms: the summed per-node cloud estimate.
        device_mem_bytes: rough peak device memory of the prefix.
        reference: a reference chain cut (kept even where it never wins).
        encoding: an encoded twin's wire encoding (None: raw).
        base: an encoded twin's raw twin id (None: not a twin).
        encode_ms: an encoded twin's encode time, included in ``device_ms``.
        decode_ms: an encoded twin's decode time, included in ``cloud_ms``.
        wire_ratio: an encoded twin's raw / wire bytes.
        device_source: after a refit: ``"measured"``, ``"node-sum"`` (+ ``"+scaled-encode"``).
        planned_device_ms: after a refit: the plan's own device time.
        device_suffix_ms: after a refit: the device's time for the suffix (a fallback's cost).
        bucket: in a per-request cost entry: the bucket it was scaled from.
        scale: in a per-request cost entry: the size ratio times were scaled by.
        precision: the prefix precision of an int8 twin (``cut-9~int8``) and of its
            encoded twins (``"int8"``; None: fp32, see :mod:`splitgate.planner._quantize`).
        extra: keys this class does not know, kept as read.
    """

    kind: str = "split"
    tensors: tuple[str, ...] = ()
    device_nodes: int = 0
    up_bytes: int = 0
    down_bytes: int = 0
    sends_input: bool = False
    device_ms: float = 0.0
    cloud_ms: float = 0.0
    device_timing: Timing | None = None
    cloud_timing: Timing | None = None
    est_device_ms: float = 0.0
    est_cloud_ms: float = 0.0
    device_mem_bytes: int = 0
    reference: bool = False
    encoding: str | None = None
    base: str | None = None
    encode_ms: float | None = None
    decode_ms: float | None = None
    wire_ratio: float | None = None
    device_source: str | None = None
    planned_device_ms: float | None = None
    device_suffix_ms: float | None = None
    bucket: int | None = None
    scale: float | None = None
    precision: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_twin(self) -> bool:
        """True for an encoded twin (``cut-3@int8``) of a raw partition."""
        return bool(self.base)

    def estimate(self, c: Conditions, energy: EnergyModel) -> Estimate:
        """Latency and energy under ``c`` (see :func:`splitgate.planner._cost.estimate`)."""
        return estimate(self.device_ms, self.cloud_ms, float(self.up_bytes), float(self.down_bytes), c, energy,
                        offload=self.kind != "device")

    def encoded(self, encoding: str, base: str, *, up_bytes: int, encode_ms: float, decode_ms: float,
                wire_ratio: float | None) -> PartitionProfile:
        """The encoded twin of this (raw) partition: coding times added to its
        device and cloud times, ``up_bytes`` the encoded bytes.

        Args:
            encoding: the wire encoding.
            base: this partition's id.
            up_bytes: the encoded bytes per request.
            encode_ms: encode time on the device.
            decode_ms: decode time in the cloud.
            wire_ratio: raw / wire bytes.

        Returns:
            The twin's figures (never a reference cut).
        """
        return replace(
            self, encoding=encoding, base=base, reference=False, up_bytes=int(up_bytes),
            device_ms=round(self.device_ms + encode_ms, 4), cloud_ms=round(self.cloud_ms + decode_ms, 4),
            encode_ms=round(encode_ms, 4), decode_ms=round(decode_ms, 4), wire_ratio=wire_ratio,
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``profile.json`` entry (core keys always, the others when set, then ``extra``)."""
        d: dict[str, Any] = {
            "kind": self.kind,
            "tensors": list(self.tensors),
            "device_nodes": self.device_nodes,
            "up_bytes": self.up_bytes,
            "down_bytes": self.down_bytes,
            "sends_input": self.sends_input,
            "device_ms": self.device_ms,
            "cloud_ms": self.cloud_ms,
            "device_timing": self.device_timing.to_dict() if self.device_timing else None,
            "cloud_timing": self.cloud_timing.to_dict() if self.cloud_timing else None,
            "est_device_ms": self.est_device_ms,
            "est_cloud_ms": self.est_cloud_ms,
            "device_mem_bytes": self.device_mem_bytes,
            "reference": self.reference,
        }
        for key in _OPTIONAL_KEYS:
            value = getattr(self, key)
            if value is not None:
                d[key] = value
        d.update({k: v for k, v in self.extra.items() if k not in d})
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, kind: str | None = None) -> PartitionProfile:
        """Read a ``profile.json`` entry.

        Args:
            d: the entry.
            kind: the partition's kind where the entry has none (older profiles).

        Raises:
            KeyError, TypeError, ValueError: a malformed entry (a timing without its fields, a non-number).
        """
        kind = str(d.get("kind", kind or "split"))

        def opt(key: str, conv: Any) -> Any:
            value = d.get(key)
            return None if value is None else conv(value)

        return cls(
            kind=kind,
            tensors=tuple(str(t) for t in d.get("tensors") or ()),
            device_nodes=int(d.get("device_nodes", 0)),
            up_bytes=int(d.get("up_bytes", 0)),
            down_bytes=int(d.get("down_bytes", 0)),
            sends_input=bool(d.get("sends_input", kind == "cloud")),
            device_ms=float(d.get("device_ms", 0.0)),
            cloud_ms=float(d.get("cloud_ms", 0.0)),
            device_timing=_timing(d.get("device_timing")),
            cloud_timing=_timing(d.get("cloud_timing")),
            est_device_ms=float(d.get("est_device_ms") or 0.0),
            est_cloud_ms=float(d.get("est_cloud_ms") or 0.0),
            device_mem_bytes=int(d.get("device_mem_bytes", 0)),
            reference=bool(d.get("reference", False)),
            encoding=opt("encoding", str),
            base=opt("base", str),
            encode_ms=opt("encode_ms", float),
            decode_ms=opt("decode_ms", float),
            wire_ratio=opt("wire_ratio", float),
            device_source=opt("device_source", str),
            planned_device_ms=opt("planned_device_ms", float),
            device_suffix_ms=opt("device_suffix_ms", float),
            bucket=opt("bucket", int),
            scale=opt("scale", float),
            precision=opt("precision", str),
            extra={k: v for k, v in d.items() if k not in _KNOWN},
        )


def partition_estimate(
    entry: PartitionProfile | Mapping[str, Any], kind: str, c: Conditions, energy: EnergyModel
) -> Estimate:
    """Estimate of a partition from its figures: a :class:`PartitionProfile`, or a
    ``profile.json``-style entry (e.g. a per-request cost entry an edge changed).

    Args:
        entry: the figures (``device_ms``, ``cloud_ms``, ``up_bytes``, ``down_bytes``).
        kind: the partition's kind (a ``device`` partition sends nothing).
        c: the conditions.
        energy: device power figures.

    Raises:
        KeyError: a mapping without one of those four keys.
    """
    if isinstance(entry, PartitionProfile):
        device_ms, cloud_ms, up, down = entry.device_ms, entry.cloud_ms, entry.up_bytes, entry.down_bytes
    else:
        device_ms, cloud_ms = entry["device_ms"], entry["cloud_ms"]
        up, down = entry["up_bytes"], entry["down_bytes"]
    return estimate(float(device_ms), float(cloud_ms), float(up), float(down), c, energy, offload=kind != "device")


def _node_ms(d: Mapping[str, Any] | None) -> dict[str, dict[str, float]]:
    return {side: dict(times) for side, times in (d or {}).items()}


@dataclass
class BucketProfile:
    """One shape bucket of ``profile.json`` (an element of ``buckets``).

    Attributes:
        shapes: input name -> shape planned at.
        elements: input elements of a request of these shapes.
        from_sample: the shapes came from the user's sample.
        model_ms: ``{"device": ms, "cloud": ms}`` of the whole model (per-node profile totals).
        partitions: partition id -> its figures at this bucket.
        node_ms: ``{"device": {node: ms}, "cloud": {node: ms}}``.
        extra: keys this class does not know, kept as read.
    """

    shapes: dict[str, tuple[int, ...]]
    partitions: dict[str, PartitionProfile]
    elements: int | None = None
    from_sample: bool | None = None
    model_ms: dict[str, float] | None = None
    node_ms: dict[str, dict[str, float]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``buckets`` element."""
        d: dict[str, Any] = {"shapes": {k: list(v) for k, v in self.shapes.items()}}
        if self.elements is not None:
            d["elements"] = self.elements
        if self.from_sample is not None:
            d["from_sample"] = self.from_sample
        if self.model_ms is not None:
            d["model_ms"] = dict(self.model_ms)
        d["partitions"] = {pid: e.to_dict() for pid, e in self.partitions.items()}
        if self.node_ms is not None:
            d["node_ms"] = _node_ms(self.node_ms)
        d.update({k: v for k, v in self.extra.items() if k not in d})
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], kinds: Mapping[str, str] | None = None) -> BucketProfile:
        """Read a ``buckets`` element (``kinds``: partition id -> kind, for entries without one)."""
        kinds = kinds or {}
        known = {"shapes", "elements", "from_sample", "model_ms", "partitions", "node_ms"}
        return cls(
            shapes={str(k): tuple(int(x) for x in v) for k, v in d["shapes"].items()},
            partitions={str(pid): PartitionProfile.from_dict(e, kind=kinds.get(pid))
                        for pid, e in d["partitions"].items()},
            elements=None if d.get("elements") is None else int(d["elements"]),
            from_sample=None if d.get("from_sample") is None else bool(d["from_sample"]),
            model_ms=None if d.get("model_ms") is None else dict(d["model_ms"]),
            node_ms=d.get("node_ms"),  # per-node times: read as they are (large, never changed in place)
            extra={k: v for k, v in d.items() if k not in known},
        )


# profile.json top-level keys, in the order the planner writes them
_PROFILE_KEYS = (
    "version", "batch", "shapes", "notes", "device", "cloud", "energy", "constraints", "excluded",
    "estimate_error", "graph", "partitions", "encodings", "node_ms", "buckets", "planning_ms", "quantization",
)


@dataclass
class Profile:
    """The ``profile.json`` document.

    Attributes:
        partitions: partition id -> figures at the main (first) bucket.
        buckets: every shape bucket (None in profiles older than shape buckets).
        energy: device power figures the plan was made with.
        constraints: latency SLO and device memory the plan was made with.
        excluded: partitions over the device memory limit.
        version: document version (1).
        batch: the size a dynamic batch dimension was planned at.
        shapes: the main bucket's shapes (input name -> dims).
        notes: what planning assumed.
        device: how device times were obtained (threads, slowdown, ``source``,
            ``model_ms``, ``attributed``; after a refit the device's identity and
            the ``planned`` section it replaced).
        cloud: cloud-side threads and whole-model times.
        estimate_error: summed per-node estimates vs measured sessions.
        graph: the cut problem's sizes.
        encodings: the encoding measurements (options, guard, calibration,
            ``measured`` and ``dropped`` candidates).
        node_ms: the main bucket's per-node times.
        planning_ms: time spent in search and decision tables.
        quantization: the int8 prefix twins tried (``PlanOptions.quantize``):
            method, calibration, guard, ``measured`` and ``dropped`` twins
            (see :mod:`splitgate.planner._quantize`).
        extra: keys this class does not know, kept as read.
    """

    partitions: dict[str, PartitionProfile]
    buckets: list[BucketProfile] | None = None
    energy: EnergyModel | None = None
    constraints: Constraints | None = None
    excluded: list[str] | None = None
    version: int | None = None
    batch: int | None = None
    shapes: dict[str, list[int]] | None = None
    notes: list[str] | None = None
    device: dict[str, Any] | None = None
    cloud: dict[str, Any] | None = None
    estimate_error: dict[str, Any] | None = None
    graph: dict[str, Any] | None = None
    encodings: dict[str, Any] | None = None
    node_ms: dict[str, dict[str, float]] | None = None
    planning_ms: float | None = None
    quantization: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def energy_model(self) -> EnergyModel:
        """The plan's energy model (defaults where the profile has none)."""
        return self.energy or EnergyModel()

    @property
    def constraints_model(self) -> Constraints:
        """The plan's constraints (none where the profile has none)."""
        return self.constraints or Constraints()

    def to_dict(self) -> dict[str, Any]:
        """The ``profile.json`` document (keys that are None are left out)."""
        values: dict[str, Any] = {
            "version": self.version,
            "batch": self.batch,
            "shapes": None if self.shapes is None else {k: list(v) for k, v in self.shapes.items()},
            "notes": None if self.notes is None else list(self.notes),
            "device": self.device,
            "cloud": self.cloud,
            "energy": None if self.energy is None else self.energy.to_dict(),
            "constraints": None if self.constraints is None else self.constraints.to_dict(),
            "excluded": None if self.excluded is None else list(self.excluded),
            "estimate_error": self.estimate_error,
            "graph": self.graph,
            "partitions": {pid: e.to_dict() for pid, e in self.partitions.items()},
            "encodings": self.encodings,
            "node_ms": None if self.node_ms is None else _node_ms(self.node_ms),
            "buckets": None if self.buckets is None else [b.to_dict() for b in self.buckets],
            "planning_ms": self.planning_ms,
            "quantization": self.quantization,
        }
        d = {k: values[k] for k in _PROFILE_KEYS if values[k] is not None}
        d.update({k: v for k, v in self.extra.items() if k not in d and k not in _PROFILE_KEYS})
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], kinds: Mapping[str, str] | None = None) -> Profile:
        """Read a ``profile.json`` document.

        Args:
            d: the document.
            kinds: partition id -> kind, for entries without one (older profiles).

        Raises:
            KeyError, TypeError, ValueError, AttributeError: a malformed document.
        """
        kinds = kinds or {}
        energy, constraints = d.get("energy"), d.get("constraints")
        return cls(
            partitions={str(pid): PartitionProfile.from_dict(e, kind=kinds.get(pid))
                        for pid, e in d["partitions"].items()},
            buckets=None if d.get("buckets") is None else [BucketProfile.from_dict(b, kinds) for b in d["buckets"]],
            energy=None if energy is None else EnergyModel.from_dict(energy),
            constraints=None if constraints is None else Constraints.from_dict(constraints),
            excluded=None if d.get("excluded") is None else [str(x) for x in d["excluded"]],
            version=d.get("version"),
            batch=d.get("batch"),
            shapes=None if d.get("shapes") is None else {str(k): list(v) for k, v in d["shapes"].items()},
            notes=None if d.get("notes") is None else list(d["notes"]),
            device=d.get("device"),
            cloud=d.get("cloud"),
            estimate_error=d.get("estimate_error"),
            graph=d.get("graph"),
            encodings=d.get("encodings"),
            node_ms=d.get("node_ms"),
            planning_ms=d.get("planning_ms"),
            quantization=d.get("quantization"),
            extra={k: v for k, v in d.items() if k not in _PROFILE_KEYS},
        )


@dataclass
class PlannedPartition:
    """A partition while the planner works on it.

    Attributes:
        id: partition id (see :mod:`splitgate.planner._plan`).
        kind: ``"device"``, ``"cloud"`` or ``"split"``.
        tensors: crossing tensors (the model inputs for cloud, none for device).
        device_set: non-constant nodes on the device.
        prefix, suffix: extracted models (None where the full model is used or absent).
        profile: its figures at the main shape bucket, once measured.
        reference: a reference chain cut (kept even where it never wins).
        encoding: wire encoding of the cut tensors (``"raw"`` or see :mod:`splitgate.planner._encoding`).
        base: for an encoded candidate, the id of its raw twin (same files).
        up_bytes: bytes of the cut tensors at the main shape bucket.
        precision: the prefix's precision: ``"fp32"``, or ``"int8"`` for an int8
            twin (``cut-9~int8``, ``device~int8``; see :mod:`splitgate.planner._quantize`).
        fp32_prefix: an int8 twin's fp32 prefix (its node count is the twin's
            ``device_nodes``; its suffix file is the twin's).
    """

    id: str
    kind: str
    tensors: list[str]
    device_set: frozenset[str]
    prefix: onnx.ModelProto | None = None
    suffix: onnx.ModelProto | None = None
    profile: PartitionProfile | None = None
    reference: bool = False
    encoding: str = "raw"
    base: str | None = None
    up_bytes: int | None = None
    precision: str = "fp32"
    fp32_prefix: onnx.ModelProto | None = None

    def measured(self) -> PartitionProfile:
        """Its figures.

        Raises:
            RuntimeError: not measured yet (a planner bug, not a user error).
        """
        if self.profile is None:
            raise RuntimeError(f"partition '{self.id}' has not been measured")
        return self.profile
