"""The over-the-air update index: its format, parsing and signing, and publishing.

An *update source* is a directory, or an HTTP(S) URL, holding ``index.json``
(:data:`INDEX_NAME`) and one ``.tar.gz`` archive per published bundle version
(``splitgate publish`` writes both; any static file server can serve them)::

    {"format": "splitgate-updates/1",
     "models": {"mobilenet": [
        {"version": "v2", "plan_digest": "<64 hex>", "archive": "mobilenet/mobilenet-v2-3f2a9c1b0d4e.tar.gz",
         "sha256": "<64 hex of the archive>", "size": 2712345}]}}

The last entry of a model's list is the version its edges should run
(:class:`splitgate.edge._updates.Updater` acts on it).

**Signed index (TUF-lite).** ``publish(..., key=...)`` (``splitgate publish
--key``) gives the index an integer ``sequence`` (the previous index's + 1), an
``expires`` time (UTC, ``YYYY-MM-DDTHH:MM:SSZ``) and a ``signatures`` list of
``{"algorithm", "key_id", "signature"}`` inside ``index.json`` itself (one file,
replaced atomically, so an edge never reads an index with another index's
signature; edges that predate signing ignore the extra keys). The signature
covers :func:`splitgate.planner._bundle.canonical_json` of the document without
``signatures``. Each entry records the ``sequence`` of the index that published
it. What an edge with trust keys accepts is the updater's part
(:mod:`splitgate.edge._updates`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

from splitgate.planner import PlanBundle

from splitgate.errors import BundleError, ConfigError
from splitgate.planner._bundle import canonical_json
from splitgate.security._signing import load_signing_key, sign_payload

__all__ = [
    "DEFAULT_EXPIRES_DAYS",
    "INDEX_FORMAT",
    "INDEX_NAME",
    "IndexEntry",
    "publish",
    "read_index",
    "sign_index",
    "write_archive",
]

INDEX_NAME = "index.json"
INDEX_FORMAT = "splitgate-updates/1"
#: Days a signed index stays valid by default (``splitgate publish --expires-days``).
DEFAULT_EXPIRES_DAYS = 30.0
_SIGNATURES = "signatures"
_EXPIRES_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class IndexEntry:
    """One published bundle version.

    Attributes:
        model: the bundle's model name.
        version: a label for people (``--version``; default the digest's first 12 hex).
        plan_digest: the bundle's ``plan_digest``.
        archive: the archive's path relative to the index (``/``-separated).
        sha256: sha256 hex of the archive file.
        size: the archive's size in bytes.
        sequence: the sequence of the index that published (or re-published)
            it; None in an index written before indexes had sequences.
    """

    model: str
    version: str
    plan_digest: str
    archive: str
    sha256: str
    size: int
    sequence: int | None = field(default=None, compare=False)  # when it was listed, not what it is

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["model"]
        if self.sequence is None:
            del out["sequence"]
        return out


class _InvalidIndex(BundleError):
    """The index document is not a valid update index."""


# -- names and the index ----------------------------------------------------------


def _safe_name(text: str) -> str:
    """``text`` as one safe path component (letters, digits, ``._-``)."""
    name = _UNSAFE.sub("_", text).strip("._") or "_"
    return name[:80]

def _relative_archive(path: str, where: str) -> str:
    """``path`` if it is a relative, ``/``-separated path inside the index's folder."""
    pure = PurePosixPath(path)
    if (not path or pure.is_absolute() or ".." in pure.parts or "\\" in path or ":" in path
            or "?" in path or "#" in path):
        raise _InvalidIndex(f"{where}: archive {path!r} must be a relative path below the index (no '..', no URL)")
    return path


@dataclass
class _Index:
    """A parsed index: its entries, and what its signature covers."""

    models: dict[str, list[IndexEntry]]
    where: str
    sequence: int | None = None
    expires: datetime | None = None
    signatures: list[Any] | None = None  # None: unsigned
    payload: bytes = b""  # canonical JSON of the document without its signatures
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level keys, kept on re-signing


def read_index(data: bytes, where: str = INDEX_NAME) -> dict[str, list[IndexEntry]]:
    """Parse an update index (its signature, if any, is not checked here).

    Args:
        data: the index file's bytes.
        where: the index's location, for messages.

    Returns:
        model -> its versions in publish order (the last is the one to run).

    Raises:
        BundleError: not JSON, another format, or a malformed entry (the message names it).
    """
    return _parse_index(data, where).models


def _parse_index(data: bytes, where: str) -> _Index:
    """Parse an index with its sequence, expiry and signatures (not verified).

    Raises:
        BundleError (_InvalidIndex): not JSON, another format, a malformed entry,
            sequence, expiry or signature list.
    """
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _InvalidIndex(f"{where}: not a JSON update index ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise _InvalidIndex(f"{where}: format {got!r} is not {INDEX_FORMAT!r}")
    models = doc.get("models")
    if not isinstance(models, dict):
        raise _InvalidIndex(f"{where}: 'models' must map model names to lists of versions")
    out: dict[str, list[IndexEntry]] = {}
    for model, versions in models.items():
        if not isinstance(versions, list):
            raise _InvalidIndex(f"{where}: model {model!r}: versions must be a list")
        out[model] = [_entry(model, v, f"{where}: model {model!r} entry {i}") for i, v in enumerate(versions)]
    signatures = doc.pop(_SIGNATURES, None)
    if signatures is not None and not isinstance(signatures, list):
        raise _InvalidIndex(f"{where}: {_SIGNATURES!r} must be a list of signatures")
    sequence = _sequence(doc.get("sequence"), f"{where}: 'sequence'")
    expires = _expires(doc.get("expires"), where)
    extra = {k: v for k, v in doc.items() if k not in ("format", "models", "sequence", "expires")}
    return _Index(models=out, where=where, sequence=sequence, expires=expires, signatures=signatures,
                  payload=canonical_json(doc), extra=extra)


def _sequence(value: Any, where: str) -> int | None:
    """An index or entry sequence: None, or an integer >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _InvalidIndex(f"{where} must be an integer >= 0, got {value!r}")
    return value


def _expires(value: Any, where: str) -> datetime | None:
    """The index's ``expires`` (UTC), or None when it has none."""
    if value is None:
        return None
    try:
        return datetime.strptime(str(value), _EXPIRES_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise _InvalidIndex(f"{where}: 'expires' {value!r} is not a UTC time like 2026-12-31T23:59:59Z") from None


def _entry(model: str, data: Any, where: str) -> IndexEntry:
    if not isinstance(data, dict):
        raise _InvalidIndex(f"{where}: not an object")
    try:
        entry = IndexEntry(
            model=model, version=str(data["version"]), plan_digest=str(data["plan_digest"]),
            archive=_relative_archive(str(data["archive"]), where), sha256=str(data["sha256"]).lower(),
            size=data["size"],
        )
    except KeyError as exc:
        raise _InvalidIndex(f"{where}: missing {exc.args[0]!r}") from None
    if not _HEX64.match(entry.sha256) or not _HEX64.match(entry.plan_digest):
        raise _InvalidIndex(f"{where}: sha256 and plan_digest must be 64 lower-case hex digits")
    if isinstance(entry.size, bool) or not isinstance(entry.size, int) or entry.size <= 0:
        raise _InvalidIndex(f"{where}: size must be a positive integer, got {entry.size!r}")
    sequence = _sequence(data.get("sequence"), f"{where}: 'sequence'")
    return entry if sequence is None else IndexEntry(**{**asdict(entry), "sequence": sequence})


def _index_doc(index: dict[str, list[IndexEntry]], sequence: int | None = None,
               expires: datetime | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {**(extra or {}), "format": INDEX_FORMAT,
                           "models": {m: [e.to_json() for e in es] for m, es in index.items()}}
    if sequence is not None:
        doc["sequence"] = sequence
    if expires is not None:
        doc["expires"] = expires.strftime(_EXPIRES_FORMAT)
    return doc


# -- publishing -------------------------------------------------------------------


def write_archive(bundle_dir: str | os.PathLike[str], dest: str | os.PathLike[str]) -> tuple[str, int]:
    """Write ``bundle_dir``'s files to a ``.tar.gz`` at ``dest`` (the same thing as
    ``tar czf DEST -C BUNDLE .``, but reproducible: sorted, no owners, time 0).

    Returns:
        (sha256 hex, size in bytes) of the archive.

    Raises:
        BundleError: the bundle holds a symbolic link or a special file.
    """
    root, dest = Path(bundle_dir), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise BundleError(f"{path}: bundles hold regular files only (a link or special file cannot be published)")
            info = tar.gettarinfo(str(path), arcname=rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = 0o755 if path.is_dir() else 0o644
            if path.is_file():
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
    os.replace(tmp, dest)
    return _file_sha256(dest), dest.stat().st_size


def _write_index(to_dir: Path, doc: dict[str, Any]) -> None:
    tmp = to_dir / f".{INDEX_NAME}.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, to_dir / INDEX_NAME)  # readers see the old index or the new one, whole


def _expiry(expires_days: float) -> datetime:
    """Now plus ``expires_days`` (UTC, whole seconds). Raises ConfigError for days <= 0."""
    if isinstance(expires_days, bool) or not isinstance(expires_days, (int, float)) or not (
            0 < expires_days <= 3650):
        raise ConfigError(f"--expires-days must be a number of days in (0, 3650], got {expires_days!r}")
    return (datetime.now(UTC) + timedelta(days=expires_days)).replace(microsecond=0)


def _signed_doc(doc: dict[str, Any], key: Any) -> dict[str, Any]:
    """``doc`` with a ``signatures`` list holding ``key``'s signature over its canonical JSON."""
    return {**doc, _SIGNATURES: [sign_payload(canonical_json(doc), key)]}


def _read_existing(index_path: Path) -> _Index | None:
    return _parse_index(index_path.read_bytes(), str(index_path)) if index_path.exists() else None


def sign_index(
    to_dir: str | os.PathLike[str], key: str | os.PathLike[str], *, expires_days: float = DEFAULT_EXPIRES_DAYS,
) -> int:
    """Re-sign ``to_dir/index.json`` as it is: the next sequence, a new expiry, a new
    signature (after editing the index by hand, or to renew it before it expires:
    edges refuse an expired index).

    Args:
        to_dir: the update directory.
        key: the ed25519 private key (``signing.key``).
        expires_days: days until the signed index expires.

    Returns:
        The new sequence.

    Raises:
        BundleError: there is no index, or it is invalid.
        ConfigError: the key cannot be read, or expires_days is out of range.
    """
    to = Path(to_dir)
    signing_key, expires = load_signing_key(key), _expiry(expires_days)
    old = _read_existing(to / INDEX_NAME)
    if old is None:
        raise BundleError(f"{to / INDEX_NAME}: no update index to sign (publish a bundle first)")
    sequence = (old.sequence or 0) + 1
    _write_index(to, _signed_doc(_index_doc(old.models, sequence, expires, old.extra), signing_key))
    return sequence


def publish(
    bundles: Iterable[str | os.PathLike[str]], to_dir: str | os.PathLike[str], *, version: str | None = None,
    key: str | os.PathLike[str] | None = None, expires_days: float = DEFAULT_EXPIRES_DAYS,
) -> list[IndexEntry]:
    """Publish bundle versions to an update directory: write each bundle's archive
    and append it to ``to_dir/index.json`` as its model's newest version (serve
    ``to_dir`` with any static file server, or use it as a directory source).

    Publishing a plan digest that is already listed moves it to the end again
    (the way to send a fleet back to an earlier version).

    The index's ``sequence`` becomes the previous index's + 1, and the new
    entries record it. With ``key`` the index is signed and expires after
    ``expires_days``: edges with trust keys accept only such an index, with a
    sequence no lower than the last they accepted (module docstring).

    Args:
        bundles: plan bundle directories (each verified first).
        to_dir: the update directory (created if missing).
        version: the version label (default: each plan digest's first 12 hex).
        key: the ed25519 private key to sign the index with (``signing.key``);
            None writes an unsigned index.
        expires_days: days until a signed index expires (renew with another
            publish or :func:`sign_index` before then).

    Returns:
        The entries written, one per bundle.

    Raises:
        BundleError: a bundle fails verification, or the existing index is invalid.
        ConfigError: ``version`` is already published for another plan of that
            model; the key cannot be read; expires_days out of range; or the
            existing index is signed and no ``key`` is given (it would drop the
            signature every trusting edge needs).
    """
    to = Path(to_dir)
    index_path = to / INDEX_NAME
    signing_key = load_signing_key(key) if key is not None else None
    expires = _expiry(expires_days) if key is not None else None
    old = _read_existing(index_path)
    if old is not None and old.signatures and signing_key is None:
        raise ConfigError(f"{index_path} is signed: publish with --key signing.key (publish(..., key=...)) to keep it "
                          "signed; edges with --trust refuse an unsigned index")
    index = old.models if old is not None else {}
    sequence = (old.sequence or 0) + 1 if old is not None else 1
    loaded = [PlanBundle.load(source) for source in bundles]  # every bundle whole before anything is written
    labels: dict[tuple[str, str], str] = {
        (e.model, e.version): e.plan_digest for entries in index.values() for e in entries
    }
    for bundle in loaded:
        key = (bundle.model_name, version or bundle.plan_digest[:12])
        if labels.setdefault(key, bundle.plan_digest) != bundle.plan_digest:
            raise ConfigError(
                f"model '{key[0]}' version {key[1]!r} is already published with plan {labels[key][:12]}; "
                f"pick another --version"
            )
    to.mkdir(parents=True, exist_ok=True)
    written = []
    for bundle in loaded:
        model, digest = bundle.model_name, bundle.plan_digest
        label = version or digest[:12]
        entries = index.setdefault(model, [])
        rel = f"{_safe_name(model)}/{_safe_name(model)}-{_safe_name(label)}-{digest[:12]}.tar.gz"
        sha, size = write_archive(bundle.root, to / rel)
        entry = IndexEntry(model=model, version=label, plan_digest=digest, archive=rel, sha256=sha, size=size,
                           sequence=sequence)
        index[model] = [e for e in entries if e.plan_digest != digest] + [entry]
        written.append(entry)
    doc = _index_doc(index, sequence, expires, old.extra if old is not None else None)
    _write_index(to, _signed_doc(doc, signing_key) if signing_key is not None else doc)
    return written


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
