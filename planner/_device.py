"""The device measures itself: ``splitgate profile`` and the device profile it writes.

Neurosurgeon profiles on the device; so does splitgate. :func:`measure_device`
runs on the device with the plain install (onnxruntime, onnx, numpy: no torch,
no Ray) and measures, per shape bucket:

* the full model (median / p10 / p90 / p25 after warm-up), run with the same
  idle gap before each run as the planner's device measurement;
* per-node times from onnxruntime's profiler (:func:`splitgate.planner.profile_nodes`);
* for a plan bundle, every candidate partition as it will run there: its
  prefix in a real onnxruntime session, its suffix run locally (the time of a
  fallback when the cloud fails), all interleaved round by round
  (:func:`splitgate.planner._profile.time_partitions`), and the encode time of every
  encoded twin's cut tensors (``cut-3@int8``);
* for a bundle planned with ``--quantize``, every int8 prefix file
  (``cut-9~int8``, and ``device~int8``: the int8 full model) timed itself,
  with the fp32 ones: an int8 twin shares its fp32 partition's suffix, which
  is measured once;
* for a bundle planned with ``--cascade``, the cascade's small model
  (``cascade/model.onnx``), interleaved with the partitions: the decision
  "does the cascade pay" then weighs the device's own time for it
  (:meth:`DeviceProfile.cascade_ms`, applied by ``splitgate refit``);
* for a ``cloud@E`` twin, the time to encode the model's own inputs; for
  ``cloud@uint8`` on byte-derived data of the input's shape (``k/255``, or the
  bundle's own sample where it already holds 8-bit data): the plan keeps that
  twin only for 8-bit inputs, and a random sample would time the raw fallback.

The result is a :class:`DeviceProfile` (JSON, ``"schema": "splitgate-device-profile"``)
with the device's identity (:func:`identity`). The planner reads it
(``splitgate plan --device-profile``): :meth:`DeviceProfile.node_profile` for
per-node times at a shape, :meth:`DeviceProfile.partition_ms` for a measured
partition. A bundle is refitted from it with :func:`splitgate.planner.refit_bundle`.
Partitions are matched by their cut (the crossing tensors) and prefix precision,
not by id: ``dag-K`` ids are numbered per plan, a cut is the same in every plan
of the model; ``cut-9~int8`` is matched as the cut of ``cut-9`` at int8, never
as ``cut-9`` itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from splitgate.planner._profile import NodeProfile, Timing, make_session, profile_nodes, time_partitions
from splitgate.planner._quantize import PRECISION_SEP, candidate_parts
from splitgate.errors import BundleError, InvalidArgument

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "PartitionTimes",
    "BucketTimes",
    "DeviceProfile",
    "identity",
    "cut_key",
    "measure_device",
    "load_device_profile",
    "profile_table",
]

SCHEMA = "splitgate-device-profile"
SCHEMA_VERSION = 1
#: idle time before each device run, as the planner measures its device side
DEVICE_GAP_MS = 10.0

Progress = Callable[[str, int, int], None]
Shapes = Mapping[str, Sequence[int]]


def cut_key(kind: str, tensors: Sequence[str] = (), precision: str | None = "fp32") -> str:
    """How a partition is matched across plans: ``"device"``, ``"cloud"``, or its
    crossing tensors sorted and joined by ``"|"`` (a split); an int8 prefix adds
    ``"~int8"`` (``"device~int8"``, ``"a|b~int8"``).

    Args:
        kind: ``"device"``, ``"cloud"`` or ``"split"``.
        tensors: a split's crossing tensors.
        precision: the prefix precision (``"fp32"`` or None: no suffix added).

    Returns:
        The key.
    """
    key = kind if kind in ("device", "cloud") else "|".join(sorted(tensors))
    return key if precision in (None, "fp32") else f"{key}{PRECISION_SEP}{precision}"


def _cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (x86 ``model name``, ARM
    ``Hardware``/``Model``), else what :mod:`platform` says."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "Hardware", "Model", "Processor", "cpu model"):
        for line in text.splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == key and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def identity(threads: int = 1) -> dict[str, Any]:
    """Who measured: CPU model, cores, memory, OS/arch, Python, onnxruntime and
    its execution providers, the threads used, and when (UTC).

    Args:
        threads: intra-op threads of the measured sessions.

    Returns:
        A JSON-ready dict.
    """
    import onnxruntime as ort

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    physical = memory = None
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        memory = int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - optional detail
        pass
    try:
        from importlib.metadata import version

        splitgate_version = version("splitgate")
    except Exception:  # noqa: BLE001 - running from a source tree
        splitgate_version = None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 1,
        "usable_cores": usable,
        "physical_cores": physical,
        "memory_bytes": memory,
        "os": f"{platform.system()} {platform.release()}".strip(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "providers": list(ort.get_available_providers()),
        "threads": int(threads),
        "splitgate": splitgate_version,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class PartitionTimes:
    """One candidate partition of a bundle, measured on the device.

    Attributes:
        id: its id in the profiled bundle.
        kind: ``"device"`` or ``"split"`` (``cloud`` has no device side).
        cut: crossing tensors (empty for ``device``).
        device: the prefix session (the full model for ``device``).
        suffix: the suffix run locally (what a fallback costs), or None.
        encode_ms: encoding -> median ms to encode the cut tensors into a request.
        precision: the prefix's precision: ``"fp32"``, or ``"int8"`` for an int8
            twin (``cut-9~int8``, ``device~int8``), timed on its own int8 file.
    """

    id: str
    kind: str
    cut: list[str]
    device: Timing
    suffix: Timing | None = None
    encode_ms: dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"

    @property
    def key(self) -> str:
        """See :func:`cut_key`."""
        return cut_key(self.kind, self.cut, self.precision)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "id": self.id,
            "kind": self.kind,
            "cut": list(self.cut),
            "device": self.device.to_dict(),
            "suffix": self.suffix.to_dict() if self.suffix else None,
            "encode_ms": {k: round(v, 4) for k, v in self.encode_ms.items()},
        } | ({"precision": self.precision} if self.precision != "fp32" else {})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PartitionTimes:
        """Inverse of :meth:`to_dict`. A profile written before precisions were
        recorded takes an int8 twin's precision from its id (``cut-9~int8``)."""
        suffix = d.get("suffix")
        return cls(
            str(d["id"]), str(d["kind"]), [str(t) for t in d.get("cut", [])], Timing.from_dict(d["device"]),
            Timing.from_dict(suffix) if suffix else None,
            {str(k): float(v) for k, v in (d.get("encode_ms") or {}).items()},
            str(d.get("precision") or candidate_parts(str(d["id"]))[1]),
        )


@dataclass
class BucketTimes:
    """Everything measured at one shape bucket.

    Attributes:
        shapes: input name -> shape (empty for an imported legacy node profile).
        elements: total input elements (what buckets are compared by).
        model: the full model's timing.
        node_ms: node name -> ms (onnxruntime's profiler).
        attributed: share of kernel time attributed to nodes by name.
        partitions: measured partitions (a bundle only).
        input_encode_ms: encoding -> median ms to encode the model's own inputs
            into a request (a bundle with ``cloud@E`` twins only).
        cascade: the cascade's small model (a bundle planned with ``--cascade``
            only; None in profiles of other bundles and in older profiles).
    """

    shapes: dict[str, tuple[int, ...]]
    elements: int
    model: Timing
    node_ms: dict[str, float]
    attributed: float = 1.0
    partitions: list[PartitionTimes] = field(default_factory=list)
    input_encode_ms: dict[str, float] = field(default_factory=dict)
    cascade: Timing | None = None

    @property
    def label(self) -> str:
        """``"x=1x3x64x64"``: the shapes as the CLI writes them."""
        return ",".join(f"{k}={'x'.join(map(str, v)) or 'scalar'}" for k, v in self.shapes.items()) or "planned"

    def partition(self, key: str) -> PartitionTimes | None:
        """The measured partition with this :func:`cut_key`, if any."""
        return next((p for p in self.partitions if p.key == key), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "elements": self.elements,
            "model": self.model.to_dict(),
            "attributed": round(self.attributed, 4),
            "partitions": [p.to_dict() for p in self.partitions],
            "node_ms": {k: round(v, 5) for k, v in self.node_ms.items()},
        } | ({"input_encode_ms": {k: round(v, 4) for k, v in self.input_encode_ms.items()}}
             if self.input_encode_ms else {}) | ({"cascade": self.cascade.to_dict()} if self.cascade else {})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BucketTimes:
        """Inverse of :meth:`to_dict`."""
        return cls(
            {str(k): tuple(int(x) for x in v) for k, v in d["shapes"].items()},
            int(d["elements"]),
            Timing.from_dict(d["model"]),
            {str(k): float(v) for k, v in d["node_ms"].items()},
            float(d.get("attributed", 1.0)),
            [PartitionTimes.from_dict(p) for p in d.get("partitions", [])],
            {str(k): float(v) for k, v in (d.get("input_encode_ms") or {}).items()},
            Timing.from_dict(d["cascade"]) if d.get("cascade") else None,
        )


def _scale(t: Timing, factor: float) -> Timing:
    return Timing(t.median_ms * factor, t.p10_ms * factor, t.p90_ms * factor, t.runs,
                  None if t.p25_ms is None else t.p25_ms * factor)


def _elements(shapes: Shapes) -> int:
    return int(sum(int(np.prod([int(x) for x in s], dtype=np.int64)) for s in shapes.values()))


@dataclass
class DeviceProfile:
    """A device's measurements of one model (what ``splitgate profile`` writes).

    Attributes:
        device: the device's identity (:func:`identity`).
        model_name: the profiled model's name.
        model_sha256: sha256 of the original model file (a bundle's
            ``model_sha256``), or None for an imported legacy node profile.
        plan_digest: the profiled bundle's plan digest, or None (a model file).
        buckets: per shape bucket, in the order measured (bucket 0 first).
        settings: threads, warm-up, repeats and idle gap of the measurement.
        notes: what was assumed (e.g. a dynamic batch dimension at 1).
        cascade_sha256: sha256 of the cascade model the buckets' ``cascade``
            timings measured (a bundle planned with ``--cascade``), else None.
    """

    device: dict[str, Any]
    model_name: str
    model_sha256: str | None
    plan_digest: str | None
    buckets: list[BucketTimes]
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    cascade_sha256: str | None = None

    # -- what the planner asks --------------------------------------------------

    @property
    def label(self) -> str:
        """A short name of the device (its CPU model and threads)."""
        return f"{self.device.get('cpu', 'device')} x{self.threads}"

    @property
    def threads(self) -> int:
        """Intra-op threads the device was measured with."""
        return int(self.settings.get("threads", self.device.get("threads", 1)))

    def check_model(self, sha256: str | None, *, what: str = "the model", nodes: Sequence[str] | None = None) -> None:
        """Refuse a profile of another model (node names and cuts would not match).

        Args:
            sha256: the sha256 of the model being planned (the original file), or None to skip.
            what: how to name that model in the message.
            nodes: the model's node names: a profile without a model digest
                (a legacy per-node profile) must time at least one of them.

        Raises:
            InvalidArgument: the profile was measured on a different model.
        """
        if sha256 is not None and self.model_sha256 is not None and sha256 != self.model_sha256:
            raise InvalidArgument(
                f"device profile of model '{self.model_name}' (sha256 {self.model_sha256[:12]}) does not match "
                f"{what} (sha256 {sha256[:12]}): profile that model on the device (splitgate profile)"
            )
        timed = self.buckets[0].node_ms
        if nodes is not None and timed and not set(nodes) & set(timed):
            raise InvalidArgument(f"device profile '{self.model_name}' times none of the nodes of {what}: "
                                  "it was measured on another model")

    def bucket_for(self, shapes: Shapes | None = None) -> tuple[BucketTimes, float]:
        """The bucket measured at ``shapes``, else the nearest by input elements.

        Args:
            shapes: input name -> concrete shape; None = bucket 0.

        Returns:
            (bucket, scale): multiply the bucket's times by ``scale`` (the
            elements ratio; 1.0 for an exact match, for None, or for a legacy
            profile without shapes).
        """
        first = self.buckets[0]
        if shapes is None or not first.shapes:
            return first, 1.0
        want = {k: tuple(int(x) for x in v) for k, v in shapes.items()}
        for b in self.buckets:
            if b.shapes == want:
                return b, 1.0
        n = max(1, _elements(want))
        best = min(self.buckets, key=lambda b: abs(math.log(n / max(1, b.elements))))
        return best, n / max(1, best.elements)

    def node_profile(self, shapes: Shapes | None = None) -> NodeProfile:
        """Per-node device times at ``shapes`` (the nearest bucket, scaled by elements).

        Args:
            shapes: input name -> concrete shape; None = bucket 0.

        Returns:
            A :class:`NodeProfile` (source: the device's label).
        """
        b, scale = self.bucket_for(shapes)
        return NodeProfile(
            {k: v * scale for k, v in b.node_ms.items()}, b.model.median_ms * scale, self.threads, b.attributed,
            self.label, {"shapes": {k: list(v) for k, v in b.shapes.items()}, "scale": scale},
        )

    def model_ms(self, shapes: Shapes | None = None) -> float:
        """The full model's measured time on the device (``Timing.typical_ms``) at ``shapes``."""
        b, scale = self.bucket_for(shapes)
        return b.model.typical_ms * scale

    def _times(self, pid: str, shapes: Shapes | None, kind: str | None,
               tensors: Sequence[str] | None) -> tuple[PartitionTimes | None, float, str]:
        """(measured partition or None, scale, encoding) for a partition id / cut; the
        prefix precision is the id's (``cut-9~int8`` is the int8 prefix of its cut)."""
        part, precision, enc = candidate_parts(pid)
        b, scale = self.bucket_for(shapes)
        if kind is None:
            kind = part if part in ("device", "cloud") else "split"
        if tensors is not None or kind != "split":
            return b.partition(cut_key(kind, tensors or (), precision)), scale, enc
        own = pid.partition("@")[0]
        return next((p for p in b.partitions if p.id == own), None), scale, enc

    def partition_ms(self, pid: str, shapes: Shapes | None = None, *, kind: str | None = None,
                     tensors: Sequence[str] | None = None) -> float | None:
        """The device time of a partition as measured on the device, or None if it was not measured.

        The prefix session's ``typical_ms`` (the lower quartile, as the
        planner costs sessions), at the nearest bucket scaled by elements; for
        an encoded candidate (``cut-3@int8``) plus the measured encode time;
        0.0 for ``cloud``.

        Args:
            pid: partition id (``device``, ``cut-3``, ``dag-2@fp16``,
                ``cut-9~int8``, ``device~int8``).
            shapes: input name -> concrete shape; None = bucket 0.
            kind: the partition's kind (default: from the id).
            tensors: its crossing tensors: matches the cut in any plan of the
                model (without them a split is matched by id, which is only
                safe for the very bundle that was profiled). The prefix
                precision always comes from the id.

        Returns:
            ms, or None when the device did not measure this partition (or,
            for an encoded candidate, its encoding; an int8 twin is never
            answered with its fp32 partition's time).
        """
        if (kind or pid) == "cloud" and "@" not in pid:
            return 0.0
        if pid.partition("@")[0] == "cloud":  # cloud@E: nothing runs here but the encoding
            return self.encode_ms(pid, shapes)
        times, scale, enc = self._times(pid, shapes, kind, tensors)
        if times is None:
            return None
        ms = times.device.typical_ms
        if enc != "raw":
            if enc not in times.encode_ms:
                return None
            ms += times.encode_ms[enc]
        return ms * scale

    def cascade_ms(self, sha256: str | None = None, shapes: Shapes | None = None) -> float | None:
        """The cascade's small model as measured on the device (``Timing.typical_ms``, as
        partitions are costed) at ``shapes`` (the nearest bucket, scaled by elements).

        Args:
            sha256: the small model file's sha256: a profile that timed another
                cascade model answers None. None = do not check.
            shapes: input name -> concrete shape; None = bucket 0.

        Returns:
            ms, or None when the device did not time this cascade model (a profile
            of a bundle without a cascade, or from before cascades were timed).
        """
        if sha256 is not None and self.cascade_sha256 != sha256:
            return None
        b, scale = self.bucket_for(shapes)
        return None if b.cascade is None else b.cascade.typical_ms * scale

    def encode_ms(self, pid: str, shapes: Shapes | None = None, *,
                  tensors: Sequence[str] | None = None) -> float | None:
        """Measured time to encode an encoded candidate's cut tensors (``cut-3@int8``; for
        ``cloud@int8`` the model's inputs), or None."""
        base, _, enc = pid.partition("@")
        if base == "cloud":
            b, scale = self.bucket_for(shapes)
            return b.input_encode_ms[enc] * scale if enc in b.input_encode_ms else None
        times, scale, enc = self._times(pid, shapes, "split", tensors)
        if times is None or enc not in times.encode_ms:
            return None
        return times.encode_ms[enc] * scale

    def suffix_ms(self, pid: str, shapes: Shapes | None = None, *,
                  tensors: Sequence[str] | None = None) -> float | None:
        """Measured time of a split's suffix run on the device (a fallback's cost), or None.
        An int8 twin (``cut-9~int8``) runs its fp32 partition's suffix: that one's time."""
        times, scale, _ = self._times(pid, shapes, "split", tensors)
        if (times is None or times.suffix is None) and candidate_parts(pid)[1] != "fp32":
            times, scale, _ = self._times(candidate_parts(pid)[0], shapes, "split", tensors)
        if times is None or times.suffix is None:
            return None
        return times.suffix.typical_ms * scale

    def scaled(self, factor: float) -> DeviceProfile:
        """A copy with every time multiplied by ``factor`` (an emulated slower device).

        Raises:
            InvalidArgument: ``factor`` is not positive.
        """
        if not factor > 0:
            raise InvalidArgument(f"scale factor must be > 0, got {factor}")
        buckets = [
            BucketTimes(dict(b.shapes), b.elements, _scale(b.model, factor),
                        {k: v * factor for k, v in b.node_ms.items()}, b.attributed,
                        [PartitionTimes(p.id, p.kind, list(p.cut), _scale(p.device, factor),
                                        None if p.suffix is None else _scale(p.suffix, factor),
                                        {k: v * factor for k, v in p.encode_ms.items()}, p.precision)
                         for p in b.partitions],
                        {k: v * factor for k, v in b.input_encode_ms.items()},
                        None if b.cascade is None else _scale(b.cascade, factor))
            for b in self.buckets
        ]
        device = dict(self.device, scaled=factor * float(self.device.get("scaled", 1.0)))
        return DeviceProfile(device, self.model_name, self.model_sha256, self.plan_digest, buckets,
                             dict(self.settings), list(self.notes), self.cascade_sha256)

    # -- JSON -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``"schema"``, ``"version"``, device, model, settings, buckets)."""
        return {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "device": self.device,
            "model": {"name": self.model_name, "sha256": self.model_sha256, "plan_digest": self.plan_digest}
            | ({"cascade_sha256": self.cascade_sha256} if self.cascade_sha256 else {}),
            "settings": self.settings,
            "notes": list(self.notes),
            "buckets": [b.to_dict() for b in self.buckets],
        }

    def sha256(self) -> str:
        """sha256 of the canonical JSON form (identifies this measurement)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeviceProfile:
        """Inverse of :meth:`to_dict`; also reads a legacy :class:`NodeProfile` JSON
        (one bucket without shapes, no measured partitions).

        Raises:
            InvalidArgument: malformed, or a schema version this code does not read.
        """
        if not isinstance(d, Mapping):
            raise InvalidArgument("malformed device profile: not a JSON object")
        if d.get("schema") != SCHEMA:
            if "node_ms" in d:
                return cls.from_node_profile(NodeProfile.from_dict(d))
            raise InvalidArgument(f"not a device profile (schema {d.get('schema')!r}, expected {SCHEMA!r})")
        if d.get("version") != SCHEMA_VERSION:
            raise InvalidArgument(
                f"device profile version {d.get('version')!r} is not supported (this splitgate reads "
                f"{SCHEMA_VERSION}): profile the device again with this version"
            )
        try:
            model = d["model"]
            buckets = [BucketTimes.from_dict(b) for b in d["buckets"]]
            out = cls(dict(d["device"]), str(model["name"]), model.get("sha256"), model.get("plan_digest"),
                      buckets, dict(d.get("settings", {})), [str(n) for n in d.get("notes", [])],
                      model.get("cascade_sha256"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidArgument(f"malformed device profile: {exc!r}") from exc
        if not buckets:
            raise InvalidArgument("malformed device profile: no buckets")
        return out

    @classmethod
    def from_node_profile(cls, prof: NodeProfile) -> DeviceProfile:
        """Wrap a legacy per-node profile (``NodeProfile.save``): one bucket, no shapes."""
        timing = Timing(prof.total_ms, prof.total_ms, prof.total_ms, 1)
        bucket = BucketTimes({}, 0, timing, dict(prof.node_ms), prof.attributed)
        return cls({"cpu": prof.source, "threads": prof.threads}, "unknown", None, None, [bucket],
                   {"threads": prof.threads}, ["imported from a per-node profile"])

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the profile as JSON (atomically: a temp file renamed into place).

        Raises:
            InvalidArgument: the file cannot be written (no such directory, a directory, no permission).
        """
        p = Path(path)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, p)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise InvalidArgument(f"cannot write device profile {p}: {exc.strerror or exc}") from exc
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DeviceProfile:
        """Read a device profile (or a legacy :class:`NodeProfile` JSON).

        Raises:
            InvalidArgument: missing, unreadable or malformed file.
        """
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"cannot read device profile {p}: {exc}") from exc
        try:
            return cls.from_dict(data)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{p}: {exc}") from exc


def load_device_profile(source: DeviceProfile | str | os.PathLike[str]) -> DeviceProfile:
    """A :class:`DeviceProfile` from itself or a JSON path (either format)."""
    return source if isinstance(source, DeviceProfile) else DeviceProfile.load(source)


# -- measuring ---------------------------------------------------------------------


def _is_bundle(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file()


def _precision(part: Any) -> str:
    """A bundle partition's prefix precision (``"fp32"`` when the manifest names none)."""
    return str(getattr(part, "prefix_precision", None) or candidate_parts(part.id)[1])


def _split_key(part: Any, precision: str | None = None) -> str:
    """:func:`cut_key` of a bundle split, at its own precision or ``precision``."""
    return cut_key("split", [t.name for t in part.cut_tensors], precision or _precision(part))


def _bundle_buckets(bundle: Any, g: Any, input_shapes: Any, samples: Any) -> tuple[list[Any], list[str]]:
    """A bundle's buckets: the user's shapes/samples, else those it was planned at
    (the manifest's ``shapes``, else profile.json's buckets), run on the bundle's
    own sample request where it has one. An older bundle with neither resolves
    like a model file: a dynamic non-batch dimension needs ``--input-shape``."""
    from splitgate.planner._shapes import resolve_buckets

    if input_shapes or samples:
        return resolve_buckets(g, input_shapes, samples)
    planned = bundle.manifest.get("shapes") or [b["shapes"] for b in (bundle.profile or {}).get("buckets") or []]
    if not planned:
        return resolve_buckets(g, None, None)
    own: list[dict[str, np.ndarray]] = []
    if bundle.manifest.get("sample") and hasattr(bundle, "sample_inputs"):
        try:
            own = [bundle.sample_inputs()]
        except Exception:  # noqa: BLE001 - fall back to seeded inputs
            own = []
    buckets, notes = [], []
    for shapes in planned:
        given = {str(k): [tuple(int(x) for x in v)] for k, v in shapes.items()}
        got, more = resolve_buckets(g, given, own or None)
        buckets += [b for b in got if b not in buckets]
        notes += [n for n in more if n not in notes]
    return buckets, notes


def _time_encodings(prefix: Any, cut: Sequence[str], encodings: Sequence[str], feeds: Mapping[str, np.ndarray],
                    threads: int, warmup: int, repeats: int) -> dict[str, float]:
    """Median ms to encode a prefix's real cut tensors into an OIP request, per encoding."""
    sess = make_session(prefix, threads)
    names = [o.name for o in sess.get_outputs()]
    args = {i.name: feeds[i.name] for i in sess.get_inputs()}
    try:
        outs = dict(zip(names, sess.run(names, args)))
    except Exception as exc:  # noqa: BLE001 - ORT run failures
        raise BundleError(f"onnxruntime failed running a prefix: {str(exc).splitlines()[0]}") from exc
    return _encode_times({t: outs[t] for t in cut if t in outs}, encodings, warmup, repeats)


def _byte_derived(feeds: Mapping[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """``feeds`` as 8-bit data (what ``uint8`` encodes): each float input that does not
    already hold it replaced by ``k/255`` values (k uniform in 0..255, seeded) of its
    shape and dtype; other inputs (ints, strings, 8-bit floats) as given."""
    from splitgate.encoding import uint8_codes

    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, a in feeds.items():
        a = np.asarray(a)
        if a.dtype.kind == "f" and uint8_codes(a) is None:
            a = (rng.integers(0, 256, size=a.shape) / 255.0).astype(a.dtype)
        out[name] = a
    return out


def _input_encode_times(feeds: Mapping[str, np.ndarray], encodings: Sequence[str], warmup: int,
                        repeats: int) -> dict[str, float]:
    """Median ms to encode the model's own inputs per ``cloud@E`` encoding: ``uint8``
    on byte-derived data (:func:`_byte_derived`; the plan keeps ``cloud@uint8`` only
    for 8-bit inputs, and other data would time the raw fallback), the others on ``feeds``."""
    out: dict[str, float] = {}
    for enc in encodings:
        arrays = _byte_derived(feeds) if enc == "uint8" else feeds
        out |= _encode_times(arrays, [enc], warmup, repeats)
    return out


def _encode_times(arrays: Mapping[str, np.ndarray], encodings: Sequence[str], warmup: int,
                  repeats: int) -> dict[str, float]:
    """Median ms to encode ``arrays`` into an OIP request (the edge's path), per encoding."""
    from splitgate.encoding import add_encoded_inputs
    from splitgate.protocol import inference_pb2 as pb

    out: dict[str, float] = {}
    for enc in encodings:
        samples = []
        for r in range(max(0, warmup) + max(1, repeats)):
            t0 = time.perf_counter()
            add_encoded_inputs(pb.ModelInferRequest(), arrays, enc)
            if r >= warmup:
                samples.append((time.perf_counter() - t0) * 1e3)
        out[enc] = Timing.of(samples).median_ms
    return out


def measure_device(
    source: str | os.PathLike[str],
    *,
    input_shapes: Mapping[str, Sequence[Sequence[int]]] | None = None,
    samples: str | os.PathLike[str] | None = None,
    threads: int = 1,
    warmup: int = 2,
    repeats: int = 10,
    gap_ms: float = DEVICE_GAP_MS,
    progress: Progress | None = None,
) -> DeviceProfile:
    """Measure a model (an ONNX file) or a plan bundle's partitions on this device.

    Args:
        source: an ``.onnx`` file or a plan bundle directory.
        input_shapes: input name -> shapes (``--input-shape``; several = buckets).
            Default for a bundle: the buckets it was planned at.
        samples: an ``.npz`` of real inputs (samples on axis 0).
        threads: intra-op threads of every session (use what the Gateway runs with).
        warmup: untimed runs (rounds) first.
        repeats: timed runs (rounds).
        gap_ms: idle time before each device run (the Gateway runs a prefix
            after waiting on the app or the network; as the planner measures).
        progress: ``callback(step, done, total)``.

    Returns:
        The :class:`DeviceProfile`.

    Raises:
        InvalidArgument: no such file, not an ONNX model or bundle, bad shapes
            or samples, a dynamic dimension without a size, bad settings.
        BundleError: a bundle that fails verification, or onnxruntime cannot
            run the model or a partition at these shapes.
    """
    from splitgate.planner._bundle import PlanBundle
    from splitgate.planner._graph import ModelGraph
    from splitgate.planner._shapes import load_samples, resolve_buckets

    if threads < 1 or repeats < 1 or warmup < 0 or gap_ms < 0:
        raise InvalidArgument("threads and repeats must be >= 1, warmup and gap_ms >= 0")
    report = progress or (lambda step, done, total: None)
    src = Path(source)
    bundle = None
    report("load model", 0, 1)
    if _is_bundle(src):
        bundle = PlanBundle.load(src)
        g = ModelGraph.load(bundle.model_path)
        name, sha, digest = bundle.model_name, bundle.model_sha256, bundle.plan_digest
    elif src.is_file():
        g = ModelGraph.load(src)
        from splitgate.planner._bundle import sha256_file

        name, sha, digest = src.stem, sha256_file(src), None
    else:
        raise InvalidArgument(f"{src}: no such ONNX file or plan bundle")
    if not g.order:
        raise InvalidArgument(f"{src}: the model has no nodes")
    real = load_samples(samples, g.inputs) if samples is not None else None
    if bundle is not None:
        buckets, notes = _bundle_buckets(bundle, g, input_shapes, real)
    else:
        buckets, notes = resolve_buckets(g, input_shapes, real)
    report("load model", 1, 1)

    # the full model first (the ``device`` partition), then each int8 full model (``device~int8``),
    # then each raw split: prefix and local suffix (an int8 twin's suffix is its fp32 cut's: timed once)
    sides: list[tuple[Any, Any]] = [(g.model if bundle is None else bundle.model_path, None)]
    device_id: str | None = "device" if bundle is None else None
    int8_devices: list[Any] = []
    splits: list[Any] = []
    encoded: dict[str, list[str]] = {}
    cloud_encodings: list[str] = []  # cloud@E twins: the encode time of the model's own inputs
    cascade_sha: str | None = None  # the cascade's small model: timed last, interleaved with the others
    if bundle is not None:
        devices = [p for p in bundle.partitions.values() if p.kind == "device"]
        device_id = next((p.id for p in devices if _precision(p) == "fp32"), None)
        int8_devices = [p for p in devices if _precision(p) != "fp32" and p.prefix_path is not None]
        splits = [p for p in bundle.partitions.values() if p.kind == "split" and p.encoding is None]
        fp32_cuts = {_split_key(p) for p in splits if _precision(p) == "fp32"}
        sides += [(p.prefix_path, None) for p in int8_devices]
        sides += [(p.prefix_path, None if _precision(p) != "fp32" and _split_key(p, "fp32") in fp32_cuts
                   else p.suffix_path) for p in splits]
        for p in bundle.partitions.values():
            if p.kind == "split" and p.encoding is not None:
                encoded.setdefault(p.id.partition("@")[0], []).append(p.encoding)
            elif p.kind == "cloud" and p.encoding is not None:
                cloud_encodings.append(p.encoding)
        cascade_sha = _cascade_side(bundle, sides)

    measured: list[BucketTimes] = []
    for bi, bucket in enumerate(buckets):
        tag = f"[{bi + 1}/{len(buckets)}] {bucket.label}"
        report(f"per-node times {tag}", 0, 1)
        nodes = profile_nodes(g, threads=threads, warmup=warmup, repeats=max(3, repeats // 2),
                              feeds=bucket.feeds, source="device")
        report(f"per-node times {tag}", 1, 1)
        timings = time_partitions(
            sides, bucket.feeds, device_threads=threads, cloud_threads=threads, warmup=warmup, repeats=repeats,
            device_gap_ms=gap_ms, progress=lambda done, total, t=tag: report(f"partitions {t}", done, total),
        )
        model_t = timings[0][0]
        assert model_t is not None
        times = [PartitionTimes(device_id, "device", [], model_t)] if device_id else []
        for p, (dev_t, _) in zip(int8_devices, timings[1:]):
            assert dev_t is not None
            times.append(PartitionTimes(p.id, "device", [], dev_t, precision=_precision(p)))
        for p, (dev_t, suf_t) in zip(splits, timings[1 + len(int8_devices):]):
            assert dev_t is not None
            cut = [t.name for t in p.cut_tensors]
            pt = PartitionTimes(p.id, p.kind, cut, dev_t, suf_t, precision=_precision(p))
            if p.id in encoded:
                report(f"encodings {tag}", 0, 1)
                pt.encode_ms = _time_encodings(p.prefix_path, cut, encoded[p.id], bucket.feeds, threads, warmup,
                                               repeats)
                report(f"encodings {tag}", 1, 1)
            times.append(pt)
        measured.append(BucketTimes(dict(bucket.shapes), bucket.elements, model_t, nodes.node_ms,
                                    nodes.attributed, times, cascade=timings[-1][0] if cascade_sha else None))
        if cloud_encodings:
            report(f"input encodings {tag}", 0, 1)
            measured[-1].input_encode_ms = _input_encode_times(bucket.feeds, cloud_encodings, warmup, repeats)
            report(f"input encodings {tag}", 1, 1)
    settings = {"threads": threads, "warmup": warmup, "repeats": repeats, "gap_ms": gap_ms,
                "source": "bundle" if bundle is not None else "model"}
    return DeviceProfile(identity(threads), name, sha, digest, measured, settings, list(notes), cascade_sha)


def _cascade_side(bundle: Any, sides: list[tuple[Any, Any]]) -> str | None:
    """Append a bundle's cascade model to the sessions to time (a device-only side: it
    runs where the partitions' prefixes run); its file's sha256, or None without a cascade."""
    path = bundle.cascade_path
    if path is None:
        return None
    sides.append((path, None))
    return str(bundle.manifest["files"][bundle.cascade.model])


def profile_table(dp: DeviceProfile) -> Any:
    """A rich table of a device profile: per bucket, each measured partition's
    device time (median, p10-p90) and its suffix run locally."""
    from rich.table import Table

    table = Table(title=f"device profile: {dp.model_name} on {dp.label} (onnxruntime {dp.device.get('onnxruntime')})")
    for col in ("shapes", "partition", "device ms", "p10-p90 ms", "local suffix ms", "encode ms"):
        table.add_column(col, justify="left" if col in ("shapes", "partition") else "right")
    for b in dp.buckets:
        rows = b.partitions or [PartitionTimes("model", "device", [], b.model)]
        for i, p in enumerate(rows):
            table.add_row(
                b.label if i == 0 else "", p.id, f"{p.device.median_ms:.3f}",
                f"{p.device.p10_ms:.3f}-{p.device.p90_ms:.3f}",
                "-" if p.suffix is None else f"{p.suffix.median_ms:.3f}",
                ", ".join(f"{k} {v:.3f}" for k, v in p.encode_ms.items()) or "-",
            )
        if b.cascade is not None:  # the cascade's small model (--cascade)
            table.add_row("", "cascade", f"{b.cascade.median_ms:.3f}", f"{b.cascade.p10_ms:.3f}-{b.cascade.p90_ms:.3f}",
                          "-", "-")
        if b.input_encode_ms:  # the cloud@E twins: the model's inputs, encoded on the device
            table.add_row("", "cloud (inputs)", "-", "-", "-",
                          ", ".join(f"{k} {v:.3f}" for k, v in b.input_encode_ms.items()))
    return table
