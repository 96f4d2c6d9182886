"""Plan bundles: the directory the planner writes and the edge and cloud read.

Layout::

    BUNDLE/manifest.json
    BUNDLE/model.onnx                       the full model (shape-inferred copy)
    BUNDLE/partitions/<id>/prefix.onnx      device part of a split partition
    BUNDLE/partitions/<id>/suffix.onnx      cloud part of a split partition

``manifest.json`` lists every file with its sha256 and carries ``plan_digest``,
the sha256 of its own canonical JSON without that field; a bundle is identical
(same digest) whenever it is built from the same model file. Loading verifies
every file and the digest, so a bundle is either whole and untouched or
refused with :class:`~splitgate.errors.BundleError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import onnx

from planner._cuts import chain_cuts
from planner._extract import Extractor
from planner._graph import ModelGraph, TensorSpec
from splitgate.errors import BundleError, InvalidArgument, NotFound

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST",
    "MODEL_FILE",
    "Partition",
    "PlanBundle",
    "build_bundle",
    "load_bundle",
    "plan_digest",
]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
# Models whose weights exceed this are saved with external data (protobuf's 2 GB limit).
_EXTERNAL_DATA_OVER = 1 << 30

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Partition:
    """One way to run the model: a device prefix, a cloud suffix, or both.

    Attributes:
        id: ``"device"`` (all on the device), ``"cloud"`` (all in the cloud) or
            ``"cut-<n>"`` (split at chain cut n).
        kind: ``"device"``, ``"cloud"`` or ``"split"``.
        device_nodes: nodes run on the device.
        total_nodes: nodes in the full model.
        cut_tensors: tensors sent from device to cloud (the model inputs for
            ``"cloud"``, none for ``"device"``).
        prefix_path: the device model, or None (``"cloud"``).
        suffix_path: the cloud model, or None (``"device"``).
        cut_bytes: bytes per sample sent to the cloud (dynamic dims counted as 1;
            0 for ``"device"``), or None if not fixed-size (e.g. strings).
    """

    id: str
    kind: str
    device_nodes: int
    total_nodes: int
    cut_tensors: list[TensorSpec]
    prefix_path: Path | None
    suffix_path: Path | None
    cut_bytes: int | None


def plan_digest(manifest: dict[str, Any]) -> str:
    """sha256 hex of the manifest's canonical JSON, ignoring any ``plan_digest`` key."""
    body = {k: v for k, v in manifest.items() if k != "plan_digest"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def _cut_bytes(specs: list[TensorSpec]) -> int | None:
    total = 0
    for spec in specs:
        n = spec.nbytes()
        if n is None:
            return None
        total += n
    return total


def build_bundle(
    model_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    progress: Progress | None = None,
) -> PlanBundle:
    """Analyse a model and write its plan bundle.

    The bundle is written to a temporary sibling directory and renamed into
    place, so ``out_dir`` never holds a half-written bundle. An existing bundle
    at ``out_dir`` is replaced.

    Args:
        model_path: the ONNX model file (external data next to it is fine).
        out_dir: the bundle directory to create or replace.
        model_name: name the model is served under; default: the file's stem.
        progress: optional ``callback(step, done, total)`` for a progress bar.

    Returns:
        The written bundle, loaded back (and verified).

    Raises:
        InvalidArgument: the model file is missing or unreadable, or ``out_dir``
            exists and is neither empty nor a plan bundle.
        BundleError: a partition could not be extracted as a valid model.
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

    report("load model", 0, 1)
    model_sha = _sha256_file(src)
    g = ModelGraph.load(src)
    report("load model", 1, 1)
    report("find cuts", 0, 1)
    cuts = chain_cuts(g)
    report("find cuts", 1, 1)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a bundle is read by other services
        extractor = Extractor(g)
        written: list[Path] = []
        total = g.total_nodes
        parts: list[dict[str, Any]] = []
        inputs = [s.to_dict() for s in g.inputs]
        parts.append(
            {
                "id": "cloud",
                "kind": "cloud",
                "device_nodes": 0,
                "total_nodes": total,
                "cut_tensors": inputs,
                "prefix": None,
                "suffix": MODEL_FILE,
                "cut_bytes": _cut_bytes(list(g.inputs)),
            }
        )
        for i, cut in enumerate(cuts):
            report("extract partitions", i, len(cuts))
            pid = f"cut-{cut.index}"
            rel = PurePosixPath("partitions") / pid
            spec = extractor.tensor_spec(cut.tensor)
            written += _save_model(extractor.prefix([cut.tensor]), tmp / rel / "prefix.onnx")
            written += _save_model(extractor.suffix([cut.tensor]), tmp / rel / "suffix.onnx")
            parts.append(
                {
                    "id": pid,
                    "kind": "split",
                    "device_nodes": cut.device_nodes,
                    "total_nodes": total,
                    "cut_tensors": [spec.to_dict()],
                    "prefix": str(rel / "prefix.onnx"),
                    "suffix": str(rel / "suffix.onnx"),
                    "cut_bytes": _cut_bytes([spec]),
                }
            )
        report("extract partitions", len(cuts), len(cuts))
        parts.append(
            {
                "id": "device",
                "kind": "device",
                "device_nodes": total,
                "total_nodes": total,
                "cut_tensors": [],
                "prefix": MODEL_FILE,
                "suffix": None,
                "cut_bytes": 0,
            }
        )
        report("write bundle", 0, 1)
        # After extraction: the full model now also records types probed for cut tensors.
        written += _save_model(g.model, tmp / MODEL_FILE)
        files = {p.relative_to(tmp).as_posix(): _sha256_file(p) for p in written}
        manifest: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "model_name": name,
            "model_sha256": model_sha,
            "opset": g.opset,
            "inputs": inputs,
            "outputs": [s.to_dict() for s in g.outputs],
            "partitions": parts,
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
        parts.sort(key=lambda p: (p.device_nodes, order.get(p.kind, 1)))
        self.partitions: dict[str, Partition] = {p.id: p for p in parts}

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
        if version != SCHEMA_VERSION:
            raise BundleError(f"{path}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
        if manifest.get("plan_digest") != plan_digest(manifest):
            raise BundleError(f"{path}: plan_digest does not match the manifest (edited or corrupted)")
        files = manifest.get("files")
        if not isinstance(files, dict):
            raise BundleError(f"{path}: manifest has no 'files' table")
        for rel, digest in files.items():
            target = cls._resolve(base, rel)
            if not target.is_file():
                raise BundleError(f"{rel}: file missing from bundle {base}")
            if verify and _sha256_file(target) != digest:
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


def load_bundle(root: str | os.PathLike[str], *, verify: bool = True) -> PlanBundle:
    """Same as :meth:`PlanBundle.load`."""
    return PlanBundle.load(root, verify=verify)
