"""Over-the-air updates of the edge Gateway's plan bundles.

An *update source* is a directory, or an HTTP(S) URL, holding ``index.json``
(:data:`INDEX_NAME`) and one ``.tar.gz`` archive per published bundle version
(``splitgate publish`` writes both; any static file server can serve them)::

    {"format": "splitgate-updates/1",
     "models": {"mobilenet": [
        {"version": "v2", "plan_digest": "<64 hex>", "archive": "mobilenet/mobilenet-v2-3f2a9c1b0d4e.tar.gz",
         "sha256": "<64 hex of the archive>", "size": 2712345}]}}

The last entry of a model's list is the version its edges should run. An
:class:`Updater` (one per Gateway; :meth:`Gateway.check_updates
<splitgate.edge.Gateway.check_updates>` and the poller started by
``GatewayConfig.update_source``) checks each loaded model: it downloads a new
version's archive resumably (HTTP ``Range`` into ``<sha256>.part``; an
interrupted transfer continues where it stopped on the next check), verifies
the archive's sha256 and size, unpacks it safely (regular files and directories
only, ``tarfile`` ``filter="data"``: no links, no absolute paths, no ``..``) into
``update_dir/<model>/<version>-<digest>``, then hands that directory to
``Gateway.update_bundle``, which verifies every file digest (and the signature,
when trust keys are configured), smoke-runs the model and swaps atomically.
Any failure leaves the running version serving and is reported: a log line,
``splitgate_updates_total{model,outcome}`` in the Gateway's Prometheus registry,
the returned :class:`UpdateOutcome` list and the listeners' callbacks.

**Signed index (TUF-lite).** ``publish(..., key=...)`` (``splitgate publish
--key``) gives the index an integer ``sequence`` (the previous index's + 1), an
``expires`` time (UTC, ``YYYY-MM-DDTHH:MM:SSZ``) and a ``signatures`` list of
``{"algorithm", "key_id", "signature"}`` inside ``index.json`` itself (one file,
replaced atomically, so an edge never reads an index with another index's
signature; edges that predate signing ignore the extra keys). The signature
covers :func:`splitgate.security._signing.canonical_json` of the document without
``signatures``. Each entry records the ``sequence`` of the index that published
it. With trust keys (``GatewayConfig.trust``) the :class:`Updater` refuses an
unsigned (unless ``allow_unsigned``), badly signed, foreign-signed or expired
index, and one whose sequence is lower than the highest it accepted (kept in
``update_dir/index-state.json``, across restarts): outcome ``untrusted-index``.
It never installs an entry published before the running version (a lower entry
``sequence``): outcome ``downgrade``.

**Memory across restarts.** The same file (:class:`_UpdateState`) remembers the
archives refused (by sha256, with the trust keys and splitgate version they were
refused under; outcome ``skipped``, nothing fetched) and the versions the app
rolled back from (``declined``), so a restarted edge neither fetches nor installs
them again; each list keeps its newest :data:`MAX_REFUSED` / :data:`MAX_DECLINED`.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from splitgate.planner import PlanBundle

from splitgate import __version__
from splitgate._archive import unpack_bundle_archive
from splitgate.errors import (
    BundleError,
    ConfigError,
    SplitgateError,
    Unavailable,
    UpdateIndexError,
)
from splitgate.security._signing import (
    TrustedKeys,
    canonical_json,
    load_signing_key,
    sign_payload,
    verify_payload,
)

__all__ = [
    "DEFAULT_EXPIRES_DAYS",
    "INDEX_NAME",
    "INDEX_FORMAT",
    "INDEX_STATE_NAME",
    "OUTCOMES",
    "IndexEntry",
    "UpdateOutcome",
    "Updater",
    "default_update_dir",
    "publish",
    "read_index",
    "sign_index",
    "unpack_archive",
    "write_archive",
]

log = logging.getLogger("splitgate.edge.updates")

INDEX_NAME = "index.json"
INDEX_FORMAT = "splitgate-updates/1"
#: What one model's check can end in (the ``outcome`` label of ``splitgate_updates_total``).
OUTCOMES = (
    "updated",       # the new version verified, smoke-ran and now serves
    "current",       # the index's version is the one serving
    "declined",      # the index's version was rolled back by the app (rollback_bundle): not reinstalled
    "skipped",       # this archive was refused before (same sha256): not fetched again
    "interrupted",   # the download stopped early; the partial file is kept and resumed next time
    "corrupt",       # the archive's size or sha256 is not the index's; the download is dropped
    "refused",       # the archive or bundle failed unpacking, verification, signature or smoke run
    "unavailable",   # the source (index or archive) could not be reached
    "invalid-index", # the index is not a valid update index
    "untrusted-index",  # with trust keys: the index is unsigned, badly or foreign-signed, expired, or replayed
    "downgrade",     # with a signed index: its newest entry was published before the running version
)
#: The file in ``update_dir`` holding what the updater remembers across restarts
#: (:class:`_UpdateState`): the highest index sequence accepted and the entry sequence of
#: each model's installed version (rollback protection), the archives refused and the
#: versions the app rolled back from (neither fetched nor installed again).
INDEX_STATE_NAME = "index-state.json"
#: Refused archives remembered (the oldest is forgotten first: fetched again if listed).
MAX_REFUSED = 64
#: Rolled-back (model, plan digest) pairs remembered (the oldest is forgotten first).
MAX_DECLINED = 64
#: A remembered refusal's reason is cut to this many characters.
MAX_REASON_CHARS = 250
#: Days a signed index stays valid by default (``splitgate publish --expires-days``).
DEFAULT_EXPIRES_DAYS = 30.0
_SIGNATURES = "signatures"
_EXPIRES_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_warned_unverified = threading.Event()  # the "index is not verified" line, once per process
#: The largest index read (an index lists versions, not data).
MAX_INDEX_BYTES = 4 * 1024 * 1024
#: Seconds a download may stall (no byte received) before it counts as interrupted.
READ_TIMEOUT_S = 30.0
_CHUNK = 1 << 16
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


@dataclass
class UpdateOutcome:
    """What one check did for one model (plain data; see :data:`OUTCOMES`).

    Attributes:
        model: the model ("" for a problem with the index or source as a whole).
        outcome: one of :data:`OUTCOMES`.
        version: the index's version label (None when no entry was read).
        plan_digest: the index's plan digest for that version.
        detail: a sentence for people: what happened, or why not.
        fetched_bytes: archive bytes transferred by this check.
        resumed_from: the byte offset a resumed download continued from (0 = from the start).
    """

    model: str
    outcome: str
    version: str | None = None
    plan_digest: str | None = None
    detail: str = ""
    fetched_bytes: int = 0
    resumed_from: int = 0

    @property
    def ok(self) -> bool:
        """True when nothing went wrong (updated, already current, or deliberately not installed)."""
        return self.outcome in ("updated", "current", "declined")


class _Interrupted(Unavailable):
    """A transfer stopped before its last byte (the partial file is kept)."""


class _Corrupt(BundleError):
    """Downloaded bytes are not the archive the index names."""


class _InvalidIndex(BundleError):
    """The index document is not a valid update index."""


# -- names and the index ----------------------------------------------------------


def _safe_name(text: str) -> str:
    """``text`` as one safe path component (letters, digits, ``._-``)."""
    name = _UNSAFE.sub("_", text).strip("._") or "_"
    return name[:80]


def default_update_dir() -> Path:
    """Where downloads and unpacked versions live when ``update_dir`` is not set:
    ``$XDG_CACHE_HOME/splitgate/updates`` (``~/.cache/...``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "splitgate" / "updates"


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


# -- unpacking --------------------------------------------------------------------


def unpack_archive(archive: str | os.PathLike[str], dest: str | os.PathLike[str], *, max_bytes: int) -> Path:
    """Unpack a bundle archive into ``dest`` safely (:func:`splitgate._archive.unpack_bundle_archive`).

    Returns:
        The bundle directory: ``dest``, or its one sub-directory when the
        archive was made from the bundle's parent folder.

    Raises:
        BundleError: unreadable archive, a link or special file, a name that
            escapes ``dest``, more than ``max_bytes`` of content, or no manifest.
    """
    return unpack_bundle_archive(archive, dest, where=f"archive {archive}", max_bytes=max_bytes)


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# -- sources ------------------------------------------------------------------------


class _Source:
    """Where the index and archives come from: a directory or an HTTP(S) URL."""

    def __init__(self, location: str) -> None:
        location = str(location).strip()
        if not location:
            raise ConfigError("update source is empty: give a directory or an http(s):// URL")
        scheme = urllib.parse.urlsplit(location).scheme.lower()
        self.is_http = scheme in ("http", "https")
        if self.is_http:
            self.index_url = location if location.endswith(".json") else location.rstrip("/") + "/" + INDEX_NAME
            self.where = self.index_url
        elif scheme in ("", "file") or len(scheme) == 1:  # (a Windows drive letter is no scheme)
            path = Path(urllib.parse.urlsplit(location).path if scheme == "file" else location)
            self.index_path = path if path.suffix == ".json" else path / INDEX_NAME
            self.where = str(self.index_path)
        else:
            raise ConfigError(f"update source {location!r}: use a directory or an http(s):// URL, not {scheme}://")

    def index(self, timeout_s: float) -> bytes:
        """The index's bytes. Raises Unavailable (unreachable) or BundleError (too large)."""
        if not self.is_http:
            try:
                with open(self.index_path, "rb") as fh:
                    data = fh.read(MAX_INDEX_BYTES + 1)
            except OSError as exc:
                raise Unavailable(f"update index {self.where}: {exc.strerror or exc}") from None
        else:
            request = urllib.request.Request(self.index_url, headers=_headers({"Cache-Control": "no-cache"}))
            try:
                with urllib.request.urlopen(request, timeout=timeout_s) as response:
                    data = response.read(MAX_INDEX_BYTES + 1)
            except urllib.error.HTTPError as exc:
                raise Unavailable(f"update index {self.where}: HTTP {exc.code} {exc.reason}") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                raise Unavailable(f"update index {self.where}: {_reason(exc)}") from None
        if len(data) > MAX_INDEX_BYTES:
            raise _InvalidIndex(f"update index {self.where}: larger than {MAX_INDEX_BYTES} bytes")
        return data

    def archive_location(self, rel: str) -> str:
        if self.is_http:
            return urllib.parse.urljoin(self.index_url, urllib.parse.quote(rel))
        return str(self.index_path.parent.joinpath(*PurePosixPath(rel).parts))

    def fetch(self, rel: str, part: Path, size: int, timeout_s: float, progress: _Progress) -> None:
        """Bring the archive ``rel`` into ``part``, continuing a partial file;
        ``progress`` counts the bytes transferred and the offset resumed from.

        Raises:
            _Interrupted: the transfer stopped early (``part`` keeps what arrived).
            _Corrupt: more bytes than ``size``.
            Unavailable: the archive cannot be reached.
        """
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        if have == size:
            return
        where = self.archive_location(rel)
        if self.is_http:
            _fetch_http(where, part, have, size, timeout_s, progress)
        else:
            _fetch_file(Path(where), part, have, size, progress)


@dataclass
class _Progress:
    """A download's bytes transferred so far and the offset it resumed from."""

    fetched: int = 0
    resumed_from: int = 0
    cancel: threading.Event | None = None  # set: stop the transfer (the partial file is kept)


def _headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"User-Agent": f"splitgate/{__version__}", **(extra or {})}


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason if reason is not None else exc) or type(exc).__name__


def _copy_body(body: Any, part: Path, have: int, size: int, where: str, progress: _Progress) -> None:
    """Write ``body``'s bytes to ``part`` from offset ``have`` on (0: a new file).

    Raises:
        _Interrupted: the body ended or failed early. _Corrupt: it is too long.
    """
    progress.resumed_from, copied = have, 0
    with open(part, "ab" if have else "wb") as out:
        try:
            while True:
                if progress.cancel is not None and progress.cancel.is_set():
                    raise _Interrupted(f"{where}: stopped at byte {have + copied} of {size} (Gateway closing); "
                                       "resumes at the next check")
                chunk = body.read(_CHUNK)
                if not chunk:
                    break
                if have + copied + len(chunk) > size:
                    raise _Corrupt(f"{where}: more than the index's {size} bytes")
                out.write(chunk)
                copied += len(chunk)
                progress.fetched = copied
        except (OSError, http.client.HTTPException, ValueError) as exc:
            out.flush()
            raise _Interrupted(
                f"{where}: transfer stopped at byte {have + copied} of {size} ({_reason(exc)}); resumes next check"
            ) from None
    if have + copied < size:
        raise _Interrupted(f"{where}: transfer stopped at byte {have + copied} of {size}; resumes next check")


def _fetch_http(url: str, part: Path, have: int, size: int, timeout_s: float, progress: _Progress) -> None:
    headers = _headers({"Range": f"bytes={have}-"} if have else None)
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the partial file is no prefix of what is served now
            part.unlink(missing_ok=True)
            raise _Interrupted(f"{url}: the server refused to resume at byte {have}; restarts next check") from None
        raise Unavailable(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise Unavailable(f"{url}: {_reason(exc)}") from None
    with response:
        if have and response.status == 206:
            start = _content_range_start(response.headers.get("Content-Range", ""))
            if start != have:
                part.unlink(missing_ok=True)
                raise _Interrupted(f"{url}: asked for byte {have} on, got range start {start}; restarts next check")
            _copy_body(response, part, have, size, url, progress)
        else:
            _copy_body(response, part, 0, size, url, progress)  # (a server that ignores Range sends it all)


def _content_range_start(value: str) -> int | None:
    match = re.match(r"^\s*bytes\s+(\d+)-", value)
    return int(match.group(1)) if match else None


def _fetch_file(path: Path, part: Path, have: int, size: int, progress: _Progress) -> None:
    try:
        body = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise Unavailable(f"archive {path}: {exc.strerror or exc}") from None
    with body:
        body.seek(have)
        _copy_body(body, part, have, size, str(path), progress)


# -- the updater ----------------------------------------------------------------------


class _GatewayLike(Protocol):
    """What the updater needs of a Gateway."""

    @property
    def models(self) -> list[str]: ...

    def bundle(self, model: str) -> PlanBundle: ...

    def update_bundle(self, source: str | Path, *, smoke: bool = True) -> PlanBundle: ...


Listener = Callable[[UpdateOutcome], Any]


class _UpdateState:
    """What the updater must remember across restarts, kept in ``update_dir/index-state.json``
    (:data:`INDEX_STATE_NAME`), one small JSON file replaced atomically on every change:

    * ``sequence``: the highest signed-index sequence accepted (rollback protection;
      changed only after an index passed every check);
    * ``models``: per model, the plan digest and entry sequence of the version the
      updater installed from a signed index (:meth:`Updater._downgrade` after a restart);
    * ``refused``: archives whose bundle was refused (sha256 -> reason, when, and the
      trust key ids and splitgate version it was refused under: a refusal under other
      keys or other code is tried again), at most :data:`MAX_REFUSED`, oldest dropped;
    * ``declined``: ``[model, plan digest]`` pairs the app rolled back from, at most
      :data:`MAX_DECLINED`, oldest dropped.

    One Updater per ``update_dir``: two writing the same file keep only the last one's view.
    An unreadable file, or an entry that is not what it should be, is ignored (with a WARNING).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sequence = 0
        self.models: dict[str, dict[str, Any]] = {}
        self.refused: dict[str, dict[str, Any]] = {}  # insertion order = age
        self.declined: list[tuple[str, str]] = []  # oldest first
        self._load()

    def _load(self) -> None:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            log.warning("update state %s is unreadable (%s): starting from sequence 0, with no refused archive "
                        "or declined version remembered; rollback protection restarts from the next index "
                        "accepted", self.path, exc)
            return
        if not isinstance(doc, dict):
            log.warning("update state %s is not a JSON object: ignored", self.path)
            return
        sequence, models = doc.get("sequence"), doc.get("models")
        if isinstance(sequence, int) and not isinstance(sequence, bool) and sequence >= 0:
            self.sequence = sequence
        if isinstance(models, dict):
            self.models = {m: v for m, v in models.items() if isinstance(v, dict)}
        refused, declined = doc.get("refused", {}), doc.get("declined", [])
        if isinstance(refused, dict):
            self.refused = {sha: r for sha, r in refused.items() if _HEX64.match(str(sha)) and _valid_refusal(r)}
        if isinstance(declined, list):
            self.declined = [(m, d) for m, d in (p for p in declined if _valid_pair(p))]
        if len(self.refused) != (len(refused) if isinstance(refused, dict) else 0) or len(self.declined) != (
                len(declined) if isinstance(declined, list) else 0):
            log.warning("update state %s: malformed refused or declined entries ignored", self.path)
        self._bound()

    def running_sequence(self, model: str, plan_digest: str) -> int | None:
        """The entry sequence of ``model``'s version with this plan, if this updater installed it."""
        record = self.models.get(model)
        if record and record.get("plan_digest") == plan_digest and isinstance(record.get("sequence"), int):
            return int(record["sequence"])
        return None

    def refusal(self, sha256: str, trust: list[str]) -> str | None:
        """Why the archive ``sha256`` was refused, if it was under these trust key ids
        and this splitgate version (else None: try it again)."""
        record = self.refused.get(sha256)
        if record is None or record["trust"] != trust or record["splitgate"] != __version__:
            return None
        return f"{record['reason']} (refused at {record['at']})"

    def refuse(self, sha256: str, reason: str, trust: list[str], at: float) -> None:
        """Remember that the archive ``sha256`` was refused (in memory; :meth:`save` writes it)."""
        self.refused.pop(sha256, None)  # (refused again: it becomes the newest)
        self.refused[sha256] = {
            "reason": reason[:MAX_REASON_CHARS], "at": datetime.fromtimestamp(at, UTC).strftime(_EXPIRES_FORMAT),
            "trust": list(trust), "splitgate": __version__,
        }
        self._bound()

    def is_declined(self, model: str, plan_digest: str) -> bool:
        """Did the app roll ``model`` back from this plan?"""
        return (model, plan_digest) in self.declined

    def decline(self, model: str, plan_digest: str) -> bool:
        """Remember that the app rolled ``model`` back from this plan; False if it already was."""
        if (model, plan_digest) in self.declined:
            return False
        self.declined.append((model, plan_digest))
        self._bound()
        return True

    def _bound(self) -> None:
        while len(self.refused) > MAX_REFUSED:
            del self.refused[next(iter(self.refused))]
        del self.declined[:-MAX_DECLINED]

    def save(self) -> None:
        """Write the state atomically: a temporary file, flushed to disk, renamed over
        the old one (a crash leaves the old state or the new one, whole).

        Raises:
            OSError: the file cannot be written.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"sequence": self.sequence, "models": self.models, "refused": self.refused,
               "declined": [list(pair) for pair in self.declined]}
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.path.parent)


def _valid_refusal(record: Any) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("reason"), str) and isinstance(record.get("at"), str)
            and isinstance(record.get("splitgate"), str) and isinstance(record.get("trust"), list)
            and all(isinstance(k, str) for k in record["trust"]))


def _valid_pair(pair: Any) -> bool:
    return (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
            and bool(_HEX64.match(pair[1])))


def _fsync_dir(path: Path) -> None:
    """Flush a directory's entries (the rename) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # (Windows: directories cannot be opened)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Updater:
    """Checks an update source for new versions of a Gateway's models and installs them.

    Thread-safe: checks run one at a time (the poller's and on-demand ones).
    Keeps ``update_dir/downloads/<sha256>.part`` (resumable downloads) and
    ``update_dir/<model>/<version>-<digest12>`` (unpacked versions); after each
    check only the serving and the previous version of each model stay.

    Args:
        gateway: the Gateway to update.
        source: a directory or an http(s):// URL (of the index or its folder).
        update_dir: staging and cache directory (default :func:`default_update_dir`).
        interval_s: the poller's period (0 = no poller; :meth:`check` on demand only).
        registry: Prometheus registry for ``splitgate_updates_total`` (None = no metric).
        previous_root: model -> the root of its previous (rollback) version, if any.
        evict: called with a bundle whose files are deleted (drop its cached sessions).
        timeout_s: socket timeout of each request (a stalled download is interrupted).
        trusted: the Gateway's trust keys; non-empty: the index must be signed by
            one of them, unexpired, with a sequence no lower than the highest
            accepted (None or empty: the index is not verified, one WARNING).
        allow_unsigned: with ``trusted``, accept an unsigned index (development
            only; a WARNING per updater). A signed index is still verified.
        clock: seconds since the epoch (``time.time``), for the expiry check.

    Raises:
        ConfigError: a source that is neither a directory nor an http(s) URL, or interval_s < 0.
    """

    def __init__(
        self,
        gateway: _GatewayLike,
        source: str,
        *,
        update_dir: str | os.PathLike[str] | None = None,
        interval_s: float = 300.0,
        registry: Any = None,
        previous_root: Callable[[str], Path | None] = lambda model: None,
        evict: Callable[[PlanBundle], None] = lambda bundle: None,
        timeout_s: float = READ_TIMEOUT_S,
        trusted: TrustedKeys | None = None,
        allow_unsigned: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(interval_s, bool) or not (isinstance(interval_s, (int, float)) and interval_s >= 0):
            raise ConfigError(f"update_interval_s must be seconds >= 0 (0 = on demand only), got {interval_s!r}")
        self.source = _Source(source)
        self.dir = Path(update_dir) if update_dir else default_update_dir()
        self.interval_s = float(interval_s)
        self.timeout_s = timeout_s
        self._gateway = gateway
        self._previous_root = previous_root
        self._evict = evict
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._installed: dict[str, str] = {}  # model -> plan digest this updater installed (this process)
        self._staged: dict[Path, PlanBundle] = {}  # unpacked versions this updater installed
        self._trusted = trusted
        self._allow_unsigned = allow_unsigned
        self._clock = clock
        self._warned_unsigned = False
        # sequence, installed entry sequences, refused archives, declined versions (across restarts)
        self._state = _UpdateState(self.dir / INDEX_STATE_NAME)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counter = None
        if registry is not None:
            from prometheus_client import Counter

            self._counter = Counter(
                "splitgate_updates", "Over-the-air update checks by model and outcome",
                ("model", "outcome"), registry=registry,
            )

    # -- public ---------------------------------------------------------------------

    def add_listener(self, callback: Listener) -> None:
        """Call ``callback(outcome)`` for every :class:`UpdateOutcome` from now on
        (on the checking thread; an exception it raises is logged and ignored)."""
        self._listeners.append(callback)

    def check(self) -> list[UpdateOutcome]:
        """Check the source once; install what is new. Never raises for a bad
        source, download or bundle: each problem is an outcome.

        Returns:
            One outcome per loaded model the index lists (or one with model ""
            when the index itself could not be read).
        """
        with self._lock:
            outcomes = self._check()
        for outcome in outcomes:
            self._report(outcome)
        return outcomes

    def start(self) -> None:
        """Start the poller thread: a check now, then one every ``interval_s``
        (with ``interval_s`` 0, none: checks run on demand only)."""
        self._stop.clear()
        if self._thread is not None or self.interval_s == 0:
            return
        self._thread = threading.Thread(target=self._poll, name="splitgate-updates", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the poller (a check under way finishes its current step first), and
        record a rollback of an installed version the app made since the last check
        (so the version stays declined after a restart)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        if self._lock.acquire(timeout=timeout_s):
            try:
                self._note_rollbacks()
            finally:
                self._lock.release()

    def note_rollback(self) -> None:
        """The app just rolled a model back (``Gateway.rollback_bundle``): record it
        now, so a process killed before the next check still declines that version.
        A check under way (holding the lock through a download) is not waited for:
        the next check, or closing, records it."""
        if self._lock.acquire(blocking=False):
            try:
                self._note_rollbacks()
            finally:
                self._lock.release()

    # -- internals ------------------------------------------------------------------

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the poller outlives a bug in one check
                log.exception("update check failed unexpectedly; next check in %.0f s", self.interval_s)
            self._stop.wait(self.interval_s)

    def _check(self) -> list[UpdateOutcome]:
        self._note_rollbacks()
        try:
            parsed = _parse_index(self.source.index(self.timeout_s), self.source.where)
            verified = self._trust_index(parsed)
        except _InvalidIndex as exc:
            return [UpdateOutcome(model="", outcome="invalid-index", detail=str(exc))]
        except UpdateIndexError as exc:
            return [UpdateOutcome(model="", outcome="untrusted-index", detail=str(exc))]
        except SplitgateError as exc:
            return [UpdateOutcome(model="", outcome="unavailable", detail=str(exc))]
        loaded = set(self._gateway.models)
        outcomes, wanted = [], set()
        for model, entries in sorted(parsed.models.items()):
            if model not in loaded or not entries:
                continue
            entry = entries[-1]
            wanted.add(entry.sha256)
            outcome = self._downgrade(entries) if verified else None
            outcomes.append(outcome or self._check_model(entry, record=verified))
        try:
            self._clean(wanted)
        except OSError as exc:
            log.warning("update clean-up of %s failed (retried next check): %s", self.dir, exc)
        return outcomes

    def _trust_index(self, index: _Index) -> bool:
        """Decide whether ``index`` may be acted on; persist its sequence when it is
        signed, verified and newer (only then: a refused index changes no state).

        Returns:
            True when the index was verified against the trust keys (then its
            entries' sequences are authoritative), False when it is acted on
            unverified (no trust keys, or unsigned and ``allow_unsigned``).

        Raises:
            UpdateIndexError: unsigned (not allowed), badly or foreign-signed,
                expired, without sequence or expiry, or a sequence lower than
                the highest accepted.
            BundleError: the state file cannot be written (an interrupted check).
        """
        where = f"update index {index.where}"
        if not self._trusted:
            if not _warned_unverified.is_set():
                _warned_unverified.set()
                log.warning("the update index is not verified (no trust keys): whoever controls the update source "
                            "can freeze or roll back edges; set trust (--trust signing.pub) and publish with --key")
            return False
        if index.signatures is None:
            if self._allow_unsigned:
                if not self._warned_unsigned:
                    self._warned_unsigned = True
                    log.warning("%s is UNSIGNED and accepted (allow_unsigned: development only)", where)
                return False
            raise UpdateIndexError(f"{where}: it is unsigned and unsigned indexes are not allowed with trust keys; "
                                   "publish with `splitgate publish ... --key signing.key` (or, for development only, "
                                   "pass --allow-unsigned)")
        fix = "do not trust this source; re-publish (`splitgate publish --key`) from the trusted publisher"
        verify_payload(index.payload, index.signatures, self._trusted, what=where, fix=fix, error=UpdateIndexError)
        if index.sequence is None or index.expires is None:
            raise UpdateIndexError(f"{where}: signed but without 'sequence' and 'expires'; re-publish it with "
                                   "`splitgate publish --key` (or sign_index)")
        now = datetime.fromtimestamp(self._clock(), UTC)
        if now >= index.expires:
            raise UpdateIndexError(
                f"{where}: expired at {index.expires.strftime(_EXPIRES_FORMAT)} (sequence {index.sequence}): the "
                "source may be withholding newer indexes (a freeze attack) or the publisher did not renew it; "
                "the publisher re-signs it with `splitgate publish --key` (or sign_index); check this device's clock")
        if index.sequence < self._state.sequence:
            raise UpdateIndexError(
                f"{where}: sequence {index.sequence} is lower than {self._state.sequence}, the highest this device "
                f"accepted: a replayed older index (a rollback attack) or a mirror serving a stale copy; not used. "
                f"If the publisher really restarted its sequence, delete {self._state.path} on the device")
        if index.sequence > self._state.sequence:
            self._state.sequence = index.sequence
            self._save_state()
        return True

    def _save_state(self) -> None:
        try:
            self._state.save()
        except OSError as exc:
            raise _Interrupted(f"cannot write {self._state.path}: {exc.strerror or exc}") from None

    def _downgrade(self, entries: list[IndexEntry]) -> UpdateOutcome | None:
        """A ``downgrade`` outcome when the newest entry was published before the
        running version (by entry sequence: the running version listed in this
        index, or the one this updater installed); else None."""
        entry = entries[-1]
        current = self._gateway.bundle(entry.model).plan_digest
        if entry.plan_digest == current:
            return None
        listed = [e.sequence for e in entries if e.plan_digest == current]
        running = listed[-1] if listed else self._state.running_sequence(entry.model, current)
        if running is None or (entry.sequence is not None and entry.sequence >= running):
            return None
        return UpdateOutcome(
            model=entry.model, outcome="downgrade", version=entry.version, plan_digest=entry.plan_digest,
            detail=f"the index's newest version {entry.version} was published at sequence {entry.sequence}, before "
                   f"the running plan {current[:12]} (sequence {running}): an older version is never installed from "
                   "a signed index; to send the fleet back, re-publish that bundle (`splitgate publish`)",
        )

    def _note_rollbacks(self) -> None:
        """Decline (and persist) each version this updater installed that no longer
        serves: the app rolled it back (or replaced it) with ``Gateway.rollback_bundle``."""
        for model, installed in list(self._installed.items()):
            try:
                current = self._gateway.bundle(model).plan_digest
            except SplitgateError:  # the model was removed
                current = None
            if installed != current:
                del self._installed[model]
                if self._state.decline(model, installed):
                    self._save_memory(f"the rollback of {model} from plan {installed[:12]}")

    def _trust_ids(self) -> list[str]:
        """The trust key ids a refusal is made under (a refusal under others is retried)."""
        return self._trusted.ids if self._trusted else []

    def _save_memory(self, what: str) -> None:
        """Persist the state after recording ``what``; a write failure only costs the memory."""
        try:
            self._state.save()
        except OSError as exc:
            log.warning("cannot write %s (%s): %s is remembered by this process only",
                        self._state.path, exc.strerror or exc, what)

    def _check_model(self, entry: IndexEntry, *, record: bool = False) -> UpdateOutcome:
        model = entry.model
        current = self._gateway.bundle(model).plan_digest
        outcome = UpdateOutcome(model=model, outcome="current", version=entry.version, plan_digest=entry.plan_digest)
        if entry.plan_digest == current:
            return outcome
        if self._state.is_declined(model, entry.plan_digest):
            outcome.outcome, outcome.detail = "declined", "the app rolled this version back; publish another to update"
            return outcome
        refused = self._state.refusal(entry.sha256, self._trust_ids())
        if refused is not None:
            outcome.outcome, outcome.detail = "skipped", f"refused before: {refused}"
            return outcome
        try:
            self._install(entry, outcome)
            if record and entry.sequence is not None:
                self._remember(entry)
        except _Interrupted as exc:
            outcome.outcome, outcome.detail = "interrupted", str(exc)
        except _Corrupt as exc:
            outcome.outcome, outcome.detail = "corrupt", str(exc)
        except Unavailable as exc:
            outcome.outcome, outcome.detail = "unavailable", str(exc)
        except OSError as exc:  # this device's disk (full, permissions): what arrived is kept for the next check
            outcome.outcome, outcome.detail = "interrupted", f"local I/O error in {self.dir}: {exc}"
        except BundleError as exc:  # the archive is what the index says, and its bundle is no good
            (self.dir / "downloads" / f"{entry.sha256}.part").unlink(missing_ok=True)  # (never used: free the space)
            self._state.refuse(entry.sha256, str(exc), self._trust_ids(), self._clock())
            self._save_memory(f"the refusal of archive {entry.archive}")
            outcome.outcome, outcome.detail = "refused", str(exc)
        return outcome

    def _remember(self, entry: IndexEntry) -> None:
        """Record the installed version's entry sequence (for :meth:`_downgrade` after a restart)."""
        self._state.models[entry.model] = {"plan_digest": entry.plan_digest, "sequence": entry.sequence}
        try:
            self._state.save()
        except OSError as exc:  # the update itself succeeded; only the downgrade record is missing
            log.warning("cannot write %s (%s): the installed version's sequence is not recorded",
                        self._state.path, exc.strerror or exc)

    def _install(self, entry: IndexEntry, outcome: UpdateOutcome) -> None:
        """Download, verify, unpack and swap in ``entry``; fills ``outcome``."""
        downloads = self.dir / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        part = downloads / f"{entry.sha256}.part"
        progress = _Progress(cancel=self._stop)
        try:
            self.source.fetch(entry.archive, part, entry.size, self.timeout_s, progress)
        finally:
            outcome.fetched_bytes, outcome.resumed_from = progress.fetched, progress.resumed_from
        if _file_sha256(part) != entry.sha256:
            part.unlink(missing_ok=True)
            raise _Corrupt(f"archive {entry.archive}: sha256 differs from the index (corrupted in transit or on the server); "
                           "dropped, fetched again next check")
        staged = self._unpack(entry, part)
        try:
            self._verify_matches(entry, staged)
            bundle = self._gateway.update_bundle(staged)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        part.unlink(missing_ok=True)
        self._staged[bundle.root.resolve()] = bundle
        self._installed[entry.model] = entry.plan_digest
        outcome.outcome = "updated"
        outcome.detail = f"now serving version {entry.version} (plan {entry.plan_digest[:12]}) from {bundle.root}"

    def _unpack(self, entry: IndexEntry, part: Path) -> Path:
        """Unpack into ``update_dir/<model>/<version>-<digest12>[-n]``; returns the bundle root."""
        model_dir = self.dir / _safe_name(entry.model)
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
        try:
            root = unpack_archive(part, tmp, max_bytes=max(64 * entry.size, 256 << 20))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        name = f"{_safe_name(entry.version)}-{entry.plan_digest[:12]}"
        final, n = model_dir / name, 1
        while final.exists():  # (never reuse a path: the session cache is keyed by file path)
            n += 1
            final = model_dir / f"{name}-{n}"
        os.replace(root, final)  # (root: tmp, or the bundle's own folder inside the archive)
        shutil.rmtree(tmp, ignore_errors=True)
        return final

    @staticmethod
    def _verify_matches(entry: IndexEntry, root: Path) -> None:
        """The unpacked bundle is the model and plan the index promised."""
        try:
            manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"archive {entry.archive}: no readable manifest.json ({exc})") from None
        name, digest = manifest.get("model_name"), manifest.get("plan_digest")
        if name != entry.model or digest != entry.plan_digest:
            raise BundleError(
                f"archive {entry.archive}: holds model {name!r} plan {str(digest)[:12]}, "
                f"the index promised {entry.model!r} plan {entry.plan_digest[:12]}"
            )

    def _clean(self, wanted: set[str]) -> None:
        """Drop partial downloads no longer wanted and unpacked versions other than
        each model's serving and previous one."""
        downloads = self.dir / "downloads"
        if downloads.is_dir():
            for part in downloads.glob("*.part"):
                if part.name[:-5] not in wanted:
                    part.unlink(missing_ok=True)
        for model in self._gateway.models:
            model_dir = self.dir / _safe_name(model)
            if not model_dir.is_dir():
                continue
            keep = {self._gateway.bundle(model).root.resolve()}
            if (previous := self._previous_root(model)) is not None:
                keep.add(Path(previous).resolve())
            for child in model_dir.iterdir():
                if any(k == child.resolve() or child.resolve() in k.parents for k in keep):
                    continue
                bundle = self._staged.pop(child.resolve(), None)
                if bundle is not None:
                    self._evict(bundle)
                shutil.rmtree(child, ignore_errors=True)

    def _report(self, outcome: UpdateOutcome) -> None:
        if self._counter is not None:
            self._counter.labels(outcome.model, outcome.outcome).inc()
        what = f"update {outcome.model or self.source.where}"
        if outcome.version:
            what += f" -> {outcome.version} ({(outcome.plan_digest or '')[:12]})"
        if outcome.outcome == "updated":
            log.info("%s: updated; %s", what, outcome.detail)
        elif outcome.ok:
            log.debug("%s: %s %s", what, outcome.outcome, outcome.detail)
        else:
            log.warning("%s: %s, the running version keeps serving: %s", what, outcome.outcome, outcome.detail)
        for listener in list(self._listeners):
            try:
                listener(outcome)
            except Exception:  # noqa: BLE001 - a listener's bug must not stop updates
                log.exception("update listener %r failed", listener)
