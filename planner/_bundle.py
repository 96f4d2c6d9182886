"""Plan bundles: the directory the planner writes and the edge and cloud read.

Layout::

    BUNDLE/manifest.json
    BUNDLE/model.onnx                       the full model (shape-inferred copy)
    BUNDLE/partitions/<id>/prefix.onnx      device part of a split partition
    BUNDLE/partitions/<id>/suffix.onnx      cloud part of a split partition
    BUNDLE/profile.json                     measured profile (schema 2, when profiled)
    BUNDLE/decision_table.json              conditions grid -> partition (schema 2, when profiled)
    BUNDLE/reference.json                   drift reference statistics (when planned with real inputs)
    BUNDLE/cascade/model.onnx               the cascade's small model (``--cascade``)
    BUNDLE/cascade/cascade.json             its threshold, exit rate, agreement, device time

``manifest.json`` lists every file with its sha256 and carries ``plan_digest``,
the sha256 of its own canonical JSON without that field and without the
decision data (profile, decision table, device profile: see
:data:`DECISION_KEYS`), so refitting a bundle to a measured device keeps its
digest and the cloud tier keeps serving it. Schema 2 adds the
keys ``profile`` and ``decision_table`` (file names or null) and ``planner``
(the candidate mode); schema 1 bundles still load (no profile). A bundle built
with ``profile=False`` is identical (same digest) whenever it is built from the
same model file; a profiled one carries this run's measurements. Loading verifies
every file and the digest, so a bundle is either whole and untouched or
refused with :class:`~splitgate.errors.BundleError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import onnx

from splitgate.planner._extract import Extractor
from splitgate.planner._graph import ModelGraph, TensorSpec
from splitgate.planner._cost import Conditions, Constraints, EnergyModel, Estimate
from splitgate.planner._decide import DecisionTable, explain, pick
from splitgate.planner._options import PlanOptions
from splitgate.planner._partition_profile import BucketProfile, PartitionProfile, Profile, partition_estimate
from splitgate.planner._cascade import CASCADE_FILE, CASCADE_MODEL, CascadeSpec
from splitgate.planner._plan import plan_model
from splitgate.planner._quantize import PRECISIONS, candidate_parts
from splitgate.planner._reference import REFERENCE_FILE, ReferenceStats
from splitgate.errors import BundleError, InvalidArgument, NotFound

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST",
    "MODEL_FILE",
    "PROFILE_FILE",
    "TABLE_FILE",
    "SUPPORTED_SCHEMAS",
    "Partition",
    "PlanBundle",
    "build_bundle",
    "load_bundle",
    "plan_digest",
    "digest_payload",
    "DECISION_KEYS",
]

SCHEMA_VERSION = 2
#: Manifest versions this code reads (1: Foundation bundles, no profile/decision table).
SUPPORTED_SCHEMAS = (1, 2)
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
PROFILE_FILE = "profile.json"
TABLE_FILE = "decision_table.json"
# Models whose weights exceed this are saved with external data (protobuf's 2 GB limit).
_EXTERNAL_DATA_OVER = 1 << 30

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Partition:
    """One way to run the model: a device prefix, a cloud suffix, or both.

    Attributes:
        id: ``"device"`` (all on the device), ``"cloud"`` (all in the cloud),
            ``"cut-<n>"`` (split at chain cut n: one tensor crosses) or
            ``"dag-<k>"`` (a DAG cut: several tensors cross; k numbers a
            bundle's DAG partitions by device node count); a split id followed
            by ``"@<encoding>"`` (``"cut-12@int8"``) is the same split sending
            its cut tensors in that encoding; ``"~int8"`` after a split id or
            ``device`` (``"cut-9~int8"``, ``"device~int8"``, ``"cut-9~int8@fp16"``)
            is the same partition with an int8 device prefix.
        kind: ``"device"``, ``"cloud"`` or ``"split"``.
        device_nodes: nodes run on the device.
        total_nodes: nodes in the full model.
        cut_tensors: tensors sent from device to cloud (the model inputs for
            ``"cloud"``, none for ``"device"``).
        prefix_path: the device model, or None (``"cloud"``).
        suffix_path: the cloud model, or None (``"device"``).
        cut_bytes: bytes sent to the cloud per request at the main planned
            shape (0 for ``"device"``), or None if unknown (e.g. strings); for
            an encoded candidate, the measured encoded bytes. A request of
            another shape sends other bytes: see :meth:`PlanBundle.costs`.
        encoding: the wire encoding the plan measured for the cut tensors of
            an encoded candidate (``"cut-K@int8"`` -> ``"int8"``; see
            :mod:`splitgate.planner._encoding`), or None for raw cut tensors (older
            bundles, raw candidates): then the edge's configured default
            applies (``GatewayConfig.encoding``, normally ``"raw"``). An
            encoded candidate shares its raw twin's prefix/suffix files.
        prefix_precision: ``"fp32"``, or ``"int8"`` for an int8 twin
            (``"cut-9~int8"``, ``"device~int8"``: its own int8 prefix file, the
            fp32 partition's suffix file); None without a prefix (``"cloud"``).
    """

    id: str
    kind: str
    device_nodes: int
    total_nodes: int
    cut_tensors: list[TensorSpec]
    prefix_path: Path | None
    suffix_path: Path | None
    cut_bytes: int | None
    encoding: str | None = None
    prefix_precision: str | None = None

    @property
    def wire_encoding(self) -> str:
        """The encoding the plan expects on the wire (``"raw"`` when none is named)."""
        return self.encoding or "raw"


#: Manifest keys (and the files they name) that only the device's choice reads:
#: a refit from a device profile rewrites them and keeps the plan digest, so the
#: cloud tier, which serves the unchanged suffixes, still accepts the edge.
DECISION_KEYS = ("profile", "decision_table", "device")


def canonical_json(document: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a JSON document: keys sorted, no whitespace, UTF-8.
    What :func:`plan_digest` hashes, and what a bundle or update-index signature
    (:mod:`splitgate.security`) covers.

    Args:
        document: a JSON-serialisable mapping (strings, integers, lists, mappings;
            no floats, whose text form is not canonical).
    """
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def digest_payload(manifest: dict[str, Any]) -> bytes:
    """The canonical JSON (UTF-8) that :func:`plan_digest` hashes and a bundle
    signature (:mod:`splitgate.security`) signs: the manifest without any
    ``plan_digest`` key and without the decision data (:data:`DECISION_KEYS`
    and their files), keys sorted, no whitespace."""
    decision_files = {manifest.get(k) for k in DECISION_KEYS if isinstance(manifest.get(k), str)}
    body = {k: v for k, v in manifest.items() if k != "plan_digest" and k not in DECISION_KEYS}
    if isinstance(body.get("files"), dict):
        body["files"] = {f: d for f, d in body["files"].items() if f not in decision_files}
    return canonical_json(body)


def plan_digest(manifest: dict[str, Any]) -> str:
    """sha256 hex of the manifest's canonical JSON (:func:`digest_payload`), ignoring
    any ``plan_digest`` key and the decision data (:data:`DECISION_KEYS` and their
    files): two bundles with the same digest have the same partitions, byte for byte."""
    return hashlib.sha256(digest_payload(manifest)).hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 hex of a file's bytes (read in blocks)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _weights_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def _save_model(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Save a model; big ones get their weights in ``<file>.data``. Return files written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if _weights_bytes(model) <= _EXTERNAL_DATA_OVER:
        path.write_bytes(model.SerializeToString())
        return [path]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # saving with external data strips weights from the proto it is given
    location = path.name + ".data"
    onnx.save_model(copy, os.fspath(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location)
    return [path, path.parent / location]


def _generic(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as a bundle stores it: no value infos of intermediate tensors.

    Planning infers (and probes) shapes at the user's sizes; onnxruntime trusts
    value infos it is given and folds shapes with them, so one written into the
    model would make it fail at every other size.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    return out


def _write_sample(root: Path, feeds: dict[str, Any], names: list[str]) -> dict[str, str]:
    """Save one request at the main planned shape (``sample/<i>.npy``, in input
    order): what the edge and the cloud smoke-run a version with. Returns input
    name -> file."""
    import numpy as np

    out: dict[str, str] = {}
    for i, name in enumerate(n for n in names if n in feeds):
        rel = f"sample/{i}.npy"
        (root / "sample").mkdir(exist_ok=True)
        with open(root / rel, "wb") as fh:
            np.save(fh, np.asarray(feeds[name]), allow_pickle=False)
        out[name] = rel
    return out


def build_bundle(
    model_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    progress: Progress | None = None,
    options: PlanOptions | None = None,
    **overrides: Any,
) -> PlanBundle:
    """Analyse a model, plan it and write its plan bundle.

    By default (``candidates="optimal"``) the bundle holds ``cloud``,
    ``device``, the min-cut partitions that are optimal somewhere in the
    condition space (measured, see :mod:`splitgate.planner._plan`) and
    ``reference_cuts`` (3) evenly spaced chain cuts, plus ``profile.json`` and
    ``decision_table.json``. ``candidates="chain"`` keeps every chain cut;
    ``profile=False`` skips measurement (no profile, no table; the bundle is
    then byte-identical across builds of the same model).

    The bundle is written to a temporary sibling directory and renamed into
    place, so ``out_dir`` never holds a half-written bundle. An existing bundle
    at ``out_dir`` is replaced.

    Args:
        model_path: the ONNX model file (external data next to it is fine).
        out_dir: the bundle directory to create or replace.
        model_name: name the model is served under; default: the file's stem.
        progress: optional ``callback(step, done, total)`` for a progress bar.
        options: planning options (:class:`splitgate.planner.PlanOptions`).
        **overrides: :class:`splitgate.planner.PlanOptions` fields overriding ``options``,
            e.g. ``candidates="chain"``, ``profile=False``, ``repeats=3``.

    Returns:
        The written bundle, loaded back (and verified).

    Raises:
        InvalidArgument: the model file is missing or unreadable, ``out_dir``
            exists and is neither empty nor a plan bundle, or a bad option.
        BundleError: a partition could not be extracted as a valid model, or
            onnxruntime cannot run the model while profiling.
    """
    src = Path(model_path)
    out = Path(out_dir)
    report = progress or (lambda step, done, total: None)
    if not src.is_file():
        raise InvalidArgument(f"model file not found: {src}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise InvalidArgument(f"refusing to replace {out}: it exists and is not a plan bundle")
    name = model_name or src.stem
    if not name or "/" in name:
        raise InvalidArgument(f"invalid model name {name!r}")
    try:
        opts = replace(options or PlanOptions(), **overrides)
    except TypeError as exc:
        raise InvalidArgument(f"unknown planning option: {exc}") from None
    opts.validate()

    report("load model", 0, 1)
    model_sha = sha256_file(src)
    g = ModelGraph.load(src)
    if not g.order:
        raise InvalidArgument(f"{src}: the model has no nodes")
    report("load model", 1, 1)
    extractor = Extractor(g)
    plan = plan_model(g, opts, extractor, report, model_sha256=model_sha)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a bundle is read by other services
        written: list[Path] = []
        total = g.total_nodes
        parts: list[dict[str, Any]] = []
        inputs = [s.to_dict() for s in g.inputs]
        saved: set[PurePosixPath] = set()  # an encoded candidate shares its raw twin's files

        def save_once(model: onnx.ModelProto, rel: PurePosixPath) -> str:
            if rel not in saved:
                saved.add(rel)
                written.extend(_save_model(model, tmp / rel))
            return str(rel)

        for i, p in enumerate(plan.partitions):
            report("write partitions", i, len(plan.partitions))
            entry: dict[str, Any] = {"id": p.id, "kind": p.kind, "total_nodes": total}
            if p.kind == "cloud":  # a cloud@E twin sends the inputs encoded, to the same full model
                entry.update(device_nodes=0, cut_tensors=inputs, prefix=None, suffix=MODEL_FILE,
                             cut_bytes=p.measured().up_bytes if p.base else p.up_bytes)
                if p.base:
                    entry.update(encoding=p.encoding)
            elif p.kind == "device":  # device~int8: the int8 full model, in its own folder
                prefix = MODEL_FILE if p.precision == "fp32" or p.prefix is None else \
                    save_once(p.prefix, PurePosixPath("partitions") / p.id / "prefix.onnx")
                entry.update(device_nodes=total, cut_tensors=[], prefix=prefix, suffix=None, cut_bytes=0)
            else:
                assert p.prefix is not None and p.suffix is not None
                base = getattr(p, "base", None)
                rel = PurePosixPath("partitions") / (base or p.id)
                fp32_rel = PurePosixPath("partitions") / candidate_parts(base or p.id)[0]  # an int8 twin's suffix
                specs = [extractor.tensor_spec(t) for t in p.tensors]
                entry.update(
                    device_nodes=len({n.name for n in (p.fp32_prefix or p.prefix).graph.node}),
                    cut_tensors=[s.to_dict() for s in specs],
                    prefix=save_once(p.prefix, rel / "prefix.onnx"),
                    suffix=save_once(p.suffix, fp32_rel / "suffix.onnx"),
                    cut_bytes=p.up_bytes,
                )
                if base:
                    entry.update(encoding=p.encoding, cut_bytes=p.measured().up_bytes)
            if opts.quantize:  # (only then: the manifests and digests of other plans stay as they were)
                entry.update(prefix_precision=p.precision if entry["prefix"] else None, encoding=p.encoding)
            parts.append(entry)
        report("write partitions", len(plan.partitions), len(plan.partitions))
        report("write bundle", 0, 1)
        written += _save_model(_generic(g.model), tmp / MODEL_FILE)
        sample = _write_sample(tmp, plan.shapes[0].feeds if plan.shapes else {}, [s.name for s in g.inputs])
        written += [tmp / rel for rel in sample.values()]
        extra: dict[str, Any] = {"profile": None, "decision_table": None}
        if plan.profile is not None and plan.table is not None:
            table_doc = plan.table.to_dict()
            if len(plan.tables) > 1:
                table_doc["buckets"] = [t.to_dict() for t in plan.tables]
            for key, rel_name, doc in (
                ("profile", PROFILE_FILE, plan.profile.to_dict()),
                ("decision_table", TABLE_FILE, table_doc),
            ):
                path = tmp / rel_name
                path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n", encoding="utf-8")
                written.append(path)
                extra[key] = rel_name
        if plan.reference is not None:  # plan data (in the digest): the reference the edge measures drift from
            (tmp / REFERENCE_FILE).write_text(json.dumps(plan.reference.to_dict(), indent=1) + "\n", encoding="utf-8")
            written.append(tmp / REFERENCE_FILE)
            extra["reference"] = REFERENCE_FILE
        if plan.cascade is not None:  # plan data (in the digest): the small model and its calibrated threshold
            written += _save_model(plan.cascade.model, tmp / CASCADE_MODEL)
            (tmp / CASCADE_FILE).write_text(json.dumps(plan.cascade.spec.to_dict(), indent=1) + "\n",
                                            encoding="utf-8")
            written.append(tmp / CASCADE_FILE)
            extra["cascade"] = CASCADE_FILE
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in written}
        manifest: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "model_name": name,
            "model_sha256": model_sha,
            "opset": g.opset,
            "inputs": inputs,
            "outputs": [s.to_dict() for s in g.outputs],
            "partitions": parts,
            "planner": {"candidates": opts.candidates, "reference_cuts": opts.reference_cuts,
                        **({"quantize": True} if opts.quantize else {})},
            "shapes": [b.to_dict()["shapes"] for b in plan.shapes],
            "sample": sample,
            **extra,
            "files": dict(sorted(files.items())),
        }
        manifest["plan_digest"] = plan_digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report("write bundle", 1, 1)
    return PlanBundle.load(out)


def _replace_dir(new: Path, target: Path) -> None:
    """Move directory ``new`` to ``target``, replacing what is there."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / "bundle")
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / "bundle", target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


class PlanBundle:
    """A verified plan bundle on disk. Open one with :meth:`load`.

    Attributes:
        root: the bundle directory.
        manifest: the parsed ``manifest.json``.
        partitions: partition id -> :class:`Partition`, ordered cloud, splits, device.
        profile: ``profile.json`` as read (a dict; None without a profile).
        plan_profile: the same document typed (:class:`~splitgate.planner.Profile`:
            :class:`~splitgate.planner.PartitionProfile` per partition and shape bucket).
        decision_table: the main bucket's decision table (None without a profile).
        decision_tables: one decision table per shape bucket.
    """

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        """Wrap an already-verified bundle; use :meth:`load` instead."""
        self.root = root
        self.manifest = manifest
        try:
            parts = [self._partition(p) for p in manifest["partitions"]]
            self.inputs = [TensorSpec.from_dict(s) for s in manifest["inputs"]]
            self.outputs = [TensorSpec.from_dict(s) for s in manifest["outputs"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{root / MANIFEST}: malformed manifest ({exc!r})") from exc
        order = {"cloud": 0, "split": 1, "device": 2}
        parts.sort(key=lambda p: (p.device_nodes, order.get(p.kind, 1), p.encoding is not None))
        self.partitions: dict[str, Partition] = {p.id: p for p in parts}
        self.profile: dict[str, Any] | None = None
        self.plan_profile: Profile | None = None
        self.decision_table: DecisionTable | None = None
        self._energy = EnergyModel()
        self._constraints = Constraints()
        self.decision_tables: list[DecisionTable] = []
        self._costs_cache: dict[tuple, dict[str, dict[str, Any]]] = {}
        self._entry_dicts: dict[tuple[int, str], dict[str, Any]] = {}
        self._skeleton: onnx.ModelProto | None = None
        prof_rel, table_rel = manifest.get("profile"), manifest.get("decision_table")
        if prof_rel and table_rel:
            self.profile = self._read_json(prof_rel)
            table_doc = self._read_json(table_rel)
            self.decision_table = DecisionTable.from_dict(table_doc)
            self.decision_tables = [DecisionTable.from_dict(t) for t in table_doc.get("buckets", [])] or [
                self.decision_table
            ]
            try:
                typed = Profile.from_dict(self.profile, kinds={pid: p.kind for pid, p in self.partitions.items()})
                self.plan_profile = typed
                self._energy = typed.energy_model
                self._constraints = typed.constraints_model
                missing = [c for c in self.candidates if c not in typed.partitions or c not in self.partitions]
                buckets = typed.buckets or []
                if buckets and len(buckets) != len(self.decision_tables):
                    raise ValueError(f"{len(buckets)} shape buckets but {len(self.decision_tables)} decision tables")
                missing += [c for b in buckets for c in self.candidates if c not in b.partitions]
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise BundleError(f"{root / str(prof_rel)}: malformed profile ({exc!r})") from exc
            if missing:
                raise BundleError(f"{root}: decision table names partitions without a profile: {missing}")

    def _read_json(self, rel: Any) -> dict[str, Any]:
        path = self._resolve(self.root, str(rel))
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{path}: unreadable ({exc})") from exc
        if not isinstance(data, dict):
            raise BundleError(f"{path}: not a JSON object")
        return data

    # -- run-time choice (schema 2) -------------------------------------------

    @property
    def has_profile(self) -> bool:
        """True if the bundle carries ``profile.json`` and ``decision_table.json``."""
        return self.profile is not None and self.decision_table is not None

    @property
    def candidates(self) -> list[str]:
        """Partition ids the decision tables may answer, over every shape bucket (empty without a profile)."""
        seen = {c for t in self.decision_tables for c in t.candidates}
        return [pid for pid in self.partitions if pid in seen]

    @property
    def shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """The input shapes the bundle was planned at, one dict per shape bucket (main first).

        Older bundles, planned before shapes were recorded, give one bucket
        of the manifest inputs with dynamic dims as 1.
        """
        recorded = self.manifest.get("shapes")
        if recorded:
            return [{k: tuple(int(d) for d in v) for k, v in b.items()} for b in recorded]
        return [{s.name: tuple(d if d >= 0 else 1 for d in s.shape) for s in self.inputs}]

    @property
    def reference(self) -> ReferenceStats | None:
        """The drift reference statistics recorded at plan time (``reference.json``,
        :mod:`splitgate.planner._reference`); None for bundles planned without real inputs
        and older bundles.

        Raises:
            BundleError: the file is unreadable or malformed.
        """
        rel = self.manifest.get("reference")
        if not rel:
            return None
        if "_reference" not in self.__dict__:
            self.__dict__["_reference"] = ReferenceStats.from_dict(self._read_json(rel), where=str(self.root / rel))
        return self.__dict__["_reference"]

    @property
    def cascade(self) -> CascadeSpec | None:
        """The confident-on-device cascade (``cascade/cascade.json``,
        :mod:`splitgate.planner._cascade`); None for bundles planned without one.

        Raises:
            BundleError: the file is unreadable or malformed, or its model is not listed in the manifest.
        """
        rel = self.manifest.get("cascade")
        if not rel:
            return None
        if "_cascade" not in self.__dict__:
            spec = CascadeSpec.from_dict(self._read_json(rel), where=str(self.root / rel))
            if spec.model not in self.manifest.get("files", {}):
                raise BundleError(f"{self.root / MANIFEST}: the cascade model {spec.model} is not listed in 'files'")
            self.__dict__["_cascade"] = spec
        return self.__dict__["_cascade"]

    @property
    def cascade_path(self) -> Path | None:
        """The cascade's small model file, or None without a cascade."""
        spec = self.cascade
        return None if spec is None else self._resolve(self.root, spec.model)

    def sample_inputs(self) -> dict[str, Any]:
        """One valid request at the main planned shape (the planner's run inputs,
        a user's sample when one was given): what a new version is smoke-run with.
        Older bundles without one get zeros with dynamic dims as 1."""
        import numpy as np

        from splitgate.codec import numpy_dtype

        files = self.manifest.get("sample") or {}
        out: dict[str, Any] = {}
        for spec in self.inputs:
            rel = files.get(spec.name)
            if rel is not None:
                out[spec.name] = np.load(self._resolve(self.root, rel), allow_pickle=False)
            else:
                shape = self.shapes[0].get(spec.name, tuple(d if d >= 0 else 1 for d in spec.shape))
                out[spec.name] = np.zeros(shape, dtype=numpy_dtype(spec.datatype, tensor=spec.name))
        return out

    def _need_profile(self) -> tuple[Profile, DecisionTable]:
        if self.plan_profile is None or self.decision_table is None:
            raise BundleError(
                f"plan bundle '{self.model_name}' at {self.root} has no profile: "
                "re-plan it with profiling on (splitgate plan, build_bundle(profile=True))"
            )
        return self.plan_profile, self.decision_table

    def costs(self, shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, dict[str, Any]]:
        """The profile entries of the candidates, for a request with these input shapes.

        Each entry is a copy of the partition's ``profile.json`` entry (keys
        ``device_ms``, ``cloud_ms``, ``up_bytes``, ``down_bytes``, ...), the
        form :meth:`estimate` and :meth:`choose` take as ``costs``. Callers may
        change the copies (e.g. a measured device time) and pass them back.

        Args:
            shapes: input name -> the request's shape; None = the planned shape.

        Raises:
            BundleError: the bundle has no profile.
        """
        profile, _ = self._need_profile()
        buckets = profile.buckets or [BucketProfile(dict(self.shapes[0]), profile.partitions)]
        if shapes is None:
            return {pid: buckets[0].partitions[pid].to_dict() for pid in self.candidates}
        key = tuple((k, tuple(int(d) for d in shapes[k])) for k in sorted(shapes))
        cached = self._costs_cache.get(key)
        if cached is None:
            cached = self._costs_at(buckets, {k: v for k, v in key})
            if len(self._costs_cache) >= 256:
                self._costs_cache.pop(next(iter(self._costs_cache)))
            self._costs_cache[key] = cached
        return {pid: dict(e) for pid, e in cached.items()}

    def _costs_at(self, buckets: list[BucketProfile], shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, Any]]:
        """Entries for a request of ``shapes``: the nearest bucket's (by input
        elements, on a log scale), times scaled by the size ratio, bytes the
        request's own (shape inference of the model at those shapes)."""
        import math

        elements = sum(math.prod(v) for v in shapes.values())
        sizes = [sum(math.prod(v) for v in b.shapes.values()) for b in buckets]
        i = min(range(len(buckets)), key=lambda j: (
            buckets[j].shapes != shapes,
            abs(math.log(max(elements, 1) / max(sizes[j], 1))),
        ))
        scale = elements / sizes[i] if sizes[i] else 1.0
        nbytes = self._tensor_nbytes(shapes)
        outs = [o.name for o in self.outputs]
        down = sum(nbytes[t] for t in outs) if all(t in nbytes for t in outs) else None
        out: dict[str, dict[str, Any]] = {}
        for pid in self.candidates:
            entry = buckets[i].partitions[pid]
            part = self.partitions[pid]
            tensors = [t.name for t in part.cut_tensors]
            raw = sum(nbytes[t] for t in tensors) if all(t in nbytes for t in tensors) else None
            raw_planned = buckets[i].partitions.get(entry.base or pid, entry).up_bytes
            if raw is not None and raw_planned:
                up = int(round(entry.up_bytes * raw / raw_planned))
            else:
                up = int(round(entry.up_bytes * scale))
            down_bytes = entry.down_bytes
            if part.kind != "device":
                down_bytes = down if down is not None else int(round(entry.down_bytes * scale))
            out[pid] = {**self._entry_dict(i, pid, entry), "device_ms": entry.device_ms * scale,
                        "cloud_ms": entry.cloud_ms * scale, "up_bytes": up, "down_bytes": down_bytes,
                        "bucket": i, "scale": scale}
        return out

    def _entry_dict(self, bucket: int, pid: str, entry: PartitionProfile) -> dict[str, Any]:
        """``entry.to_dict()``, made once per bucket and partition (costs at new shapes copy it)."""
        key = (bucket, pid)
        d = self._entry_dicts.get(key)
        if d is None:
            d = self._entry_dicts[key] = entry.to_dict()
        return d

    def _tensor_nbytes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
        """Bytes of the model's tensors at ``shapes``, from shape inference of a
        weightless copy of the model (large initializers emptied: inference
        needs their dims, not their values)."""
        from splitgate.planner._shapes import concrete_model, inferred_nbytes

        if self._skeleton is None:
            skeleton = onnx.load(os.fspath(self.model_path), load_external_data=False)
            for init in skeleton.graph.initializer:
                if len(init.raw_data) > 4096:
                    init.ClearField("raw_data")
                    init.ClearField("data_location")
                    del init.external_data[:]
            self._skeleton = skeleton
        try:
            return inferred_nbytes(concrete_model(self._skeleton, shapes))
        except Exception:  # noqa: BLE001 - sizes stay unknown: the caller scales the planned ones
            return {}

    def estimate(
        self, partition_id: str, c: Conditions, *, costs: Mapping[str, Mapping[str, Any]] | None = None
    ) -> Estimate:
        """Predicted latency and energy of a partition under conditions ``c`` (from ``profile.json``).

        Args:
            partition_id: the partition.
            c: the conditions.
            costs: entries to use instead of the profile's (see :meth:`costs`);
                a partition missing from it uses its profile entry.

        Raises:
            BundleError: the bundle has no profile.
            NotFound: no partition has that id.
        """
        profile, _ = self._need_profile()
        part = self.partition(partition_id)
        entry = (costs or {}).get(part.id) or profile.partitions.get(part.id)
        if entry is None:
            raise BundleError(f"partition '{part.id}' of '{self.model_name}' has no profile entry")
        return partition_estimate(entry, part.kind, c, self._energy)

    def choose(self, c: Conditions, *, costs: Mapping[str, Mapping[str, Any]] | None = None) -> str:
        """The partition to run under ``c``.

        A decision-table lookup: the partitions of the grid cells around ``c``
        (one on a grid point, at most eight between), the one with the best
        objective under ``c`` itself when they differ. Conditions the table does
        not cover — a downlink different from the uplink, a cloud load, a
        measured device speed, the privacy floor, or values outside the grid — fall back to the argmin of
        :meth:`estimate` over :attr:`candidates` (same objective, SLO and
        exclusions as the table). With ``privacy`` the answer is never
        ``"cloud"``, its encoded twins (``cloud@int8``) nor any partition
        sending a raw graph input.

        With ``costs`` (entries for this request, see :meth:`costs`: measured
        device times, the request's own bytes) the table, built for the
        planned figures, is not used: the answer is the argmin under ``c`` of
        the estimates from those entries.

        Raises:
            BundleError: the bundle has no profile.
        """
        profile, table = self._need_profile()
        grid = table.grid
        on_grid = (
            costs is None
            and c.device_factor == 1.0
            and (c.downlink_mbps is None or c.downlink_mbps == c.uplink_mbps)
            and c.cloud_load == 0
            and not c.privacy
            and grid.uplink_mbps[0] <= c.uplink_mbps <= grid.uplink_mbps[-1]
            and grid.rtt_ms[0] <= c.rtt_ms <= grid.rtt_ms[-1]
        )
        if on_grid:
            near = table.around(c)
            if len(near) == 1:
                return near[0]
            ests = {pid: self.estimate(pid, c) for pid in near}
            ref = self.estimate("device", c) if "device" in self.partitions else next(iter(ests.values()))
            return pick(ests, c, ref, slo_ms=self._constraints.slo_ms)
        cands = self.candidates if costs is not None else table.candidates
        excluded = set(profile.excluded or [])
        clouds = {pid for pid in cands if pid in self.partitions and self.partitions[pid].kind == "cloud"}
        if c.privacy:  # never the inputs off the device: raw (cloud) nor encoded (cloud@int8...)
            excluded |= {pid for pid in cands if profile.partitions[pid].sends_input}
            excluded |= clouds | {"cloud"}
        if not set(cands) - excluded:
            excluded = clouds | {"cloud"} if c.privacy else set()
        ests = {pid: self.estimate(pid, c, costs=costs) for pid in cands}
        ref = self.estimate("device", c, costs=costs) if "device" in self.partitions else next(iter(ests.values()))
        return pick(ests, c, ref, slo_ms=self._constraints.slo_ms, excluded=frozenset(excluded))

    def offline_partition(self) -> str:
        """The device-only partition to run when the cloud cannot be used (no cloud, an
        open breaker, a refusal): ``"device~int8"`` when the plan kept it (``--quantize``)
        and the fp32 model is over the device memory limit while the int8 one is not, or
        misses the latency SLO that the int8 one meets; else ``"device"``."""
        profile = self.plan_profile
        if "device~int8" not in self.partitions or profile is None:
            return "device"
        fp32, int8 = profile.partitions.get("device"), profile.partitions.get("device~int8")
        if fp32 is None or int8 is None:
            return "device"
        excluded = set(profile.excluded or ())
        if "device" in excluded and "device~int8" not in excluded:
            return "device~int8"
        slo = self._constraints.slo_ms
        if slo is not None and fp32.device_ms > slo >= int8.device_ms and "device~int8" not in excluded:
            return "device~int8"
        return "device"

    def explain(self, *, rtt_ms: float = 20.0, battery_pct: float = 100.0) -> list[dict[str, Any]]:
        """Why each candidate wins where it does (see :func:`splitgate.planner._decide.explain`).

        Raises:
            BundleError: the bundle has no profile.
        """
        _, table = self._need_profile()
        return explain(table, self.estimate, rtt_ms=rtt_ms, battery_pct=battery_pct)

    @classmethod
    def load(cls, root: str | os.PathLike[str], *, verify: bool = True) -> PlanBundle:
        """Read a bundle and check its integrity.

        Args:
            root: the bundle directory.
            verify: check the sha256 of every file listed in the manifest.

        Returns:
            The bundle.

        Raises:
            BundleError: the directory or manifest is missing or malformed, the
                manifest was edited (plan digest mismatch), the schema version
                is unsupported, or a file is missing or fails its sha256 check
                (the message names the file).
        """
        base = Path(root)
        path = base / MANIFEST
        if not path.is_file():
            raise BundleError(f"{base} is not a plan bundle: {MANIFEST} is missing")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{path}: unreadable manifest ({exc})") from exc
        if not isinstance(manifest, dict):
            raise BundleError(f"{path}: manifest is not a JSON object")
        version = manifest.get("schema_version")
        if version not in SUPPORTED_SCHEMAS:
            raise BundleError(
                f"{path}: schema_version {version!r} is not supported (this planner reads {SUPPORTED_SCHEMAS})"
            )
        if manifest.get("plan_digest") != plan_digest(manifest):
            raise BundleError(f"{path}: plan_digest does not match the manifest (edited or corrupted)")
        files = manifest.get("files")
        if not isinstance(files, dict):
            raise BundleError(f"{path}: manifest has no 'files' table")
        for rel, digest in files.items():
            target = cls._resolve(base, rel)
            if not target.is_file():
                raise BundleError(f"{rel}: file missing from bundle {base}")
            if verify and sha256_file(target) != digest:
                raise BundleError(f"{rel}: sha256 mismatch in bundle {base} (file modified or corrupted)")
        bundle = cls(base, manifest)
        for part in bundle.partitions.values():
            for p in (part.prefix_path, part.suffix_path):
                if p is not None and p.relative_to(base).as_posix() not in files:
                    raise BundleError(f"{path}: partition '{part.id}' uses {p.name} not listed in 'files'")
        return bundle

    @staticmethod
    def _resolve(base: Path, rel: str) -> Path:
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or not pure.parts:
            raise BundleError(f"{base / MANIFEST}: file path {rel!r} escapes the bundle")
        return base.joinpath(*pure.parts)

    def _partition(self, data: dict[str, Any]) -> Partition:
        def path_of(rel: str | None) -> Path | None:
            return None if rel is None else self._resolve(self.root, rel)

        return Partition(
            id=str(data["id"]),
            kind=str(data["kind"]),
            device_nodes=int(data["device_nodes"]),
            total_nodes=int(data["total_nodes"]),
            cut_tensors=[TensorSpec.from_dict(s) for s in data["cut_tensors"]],
            prefix_path=path_of(data["prefix"]),
            suffix_path=path_of(data["suffix"]),
            cut_bytes=None if data["cut_bytes"] is None else int(data["cut_bytes"]),
            encoding=_encoding_of(data),
            prefix_precision=_precision_of(data),
        )

    @property
    def model_name(self) -> str:
        """Name the model is served under."""
        return str(self.manifest["model_name"])

    @property
    def plan_digest(self) -> str:
        """sha256 of the manifest; identifies this exact plan."""
        return str(self.manifest["plan_digest"])

    @property
    def model_sha256(self) -> str:
        """sha256 of the original model file the bundle was built from."""
        return str(self.manifest["model_sha256"])

    @property
    def model_path(self) -> Path:
        """The full model (used for the ``device`` and ``cloud`` partitions)."""
        return self.root / MODEL_FILE

    def partition(self, partition_id: str) -> Partition:
        """Return a partition by id.

        Raises:
            NotFound: no partition has that id; the message lists the valid ones.
        """
        try:
            return self.partitions[partition_id]
        except KeyError:
            valid = ", ".join(self.partitions)
            raise NotFound(
                f"model '{self.model_name}' has no partition '{partition_id}' (valid: {valid})"
            ) from None

    def __repr__(self) -> str:
        return f"<PlanBundle {self.model_name!r} at {self.root}: {len(self.partitions)} partitions, digest {self.plan_digest[:12]}>"


def _encoding_of(data: dict[str, Any]) -> str | None:
    """A manifest partition's ``encoding`` (absent in older bundles and raw candidates)."""
    from splitgate.encoding import ENCODINGS

    enc = data.get("encoding")
    if enc is None or enc == "raw":
        return None
    if enc not in ENCODINGS:
        raise ValueError(f"partition {data.get('id')!r}: unknown encoding {enc!r}")
    return str(enc)


def _precision_of(data: dict[str, Any]) -> str | None:
    """A manifest partition's ``prefix_precision`` (None without a prefix; absent = fp32)."""
    if data.get("prefix") is None:
        return None
    precision = data.get("prefix_precision") or "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"partition {data.get('id')!r}: unknown prefix_precision {precision!r}")
    return str(precision)


def load_bundle(root: str | os.PathLike[str], *, verify: bool = True) -> PlanBundle:
    """Same as :meth:`PlanBundle.load`."""
    return PlanBundle.load(root, verify=verify)
