"""Bundle references: a local directory, or a URI fetched into a per-node cache.

The cloud tier accepts a plan bundle wherever it accepts a bundle directory as
one of:

- a local path (``/srv/bundles/resnet18.bundle``, or ``file:///...``): used in place;
- a local ``.tar.gz`` / ``.tgz`` file, or an ``http(s)://`` URL of one, made
  with ``tar czf b.tar.gz -C BUNDLE .`` (an archive holding the bundle
  directory itself, ``tar czf b.tar.gz BUNDLE``, works too);
- any other ``scheme://`` URL through `fsspec <https://filesystem-spec.readthedocs.io>`_
  (``s3://``, ``gs://``, ``memory://`` ...): a ``.tar.gz`` object, or a bundle
  directory copied file by file. fsspec (and the scheme's own package, e.g.
  ``s3fs``) must be installed; without it the error says which.

A fetched bundle lands in ``CACHE/<sha256 of the URI>/``: downloaded and
unpacked into a private temporary directory (tar members filtered with
Python's ``"data"`` filter: no absolute paths, no ``..``, no links out, no
devices), verified (:meth:`PlanBundle.load` checks every file's sha256 and the
plan digest; the signature when trusted keys are given), then renamed into
place atomically, so a half-fetched bundle is never served and two replicas
of one node fetching at once both end up with one verified copy. A cached
bundle is reused on restart (verified again, not fetched again): a URI names
fixed content, so publish a new bundle version under a new URI. A URI may
pin the archive's sha256 with a ``#sha256=<hex>`` fragment.

The cache directory is ``CloudConfig.bundle_cache``, else the node's
``SPLITGATE_BUNDLE_CACHE`` environment variable, else
``~/.cache/splitgate/bundles``. Resolution runs where the bundle is used
(inside each Ray Serve replica), so a node that never saw the files serves them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from splitgate.planner import PlanBundle

from splitgate._archive import unpack_bundle_archive
from splitgate.errors import BundleError, ConfigError

if TYPE_CHECKING:
    from splitgate.security import TrustedKeys

__all__ = ["CACHE_ENV", "default_cache_dir", "is_uri", "resolve_bundle", "resolve_bundles"]

log = logging.getLogger("splitgate.cloud")

#: Environment variable naming a node's bundle cache directory.
CACHE_ENV = "SPLITGATE_BUNDLE_CACHE"
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
_CHUNK = 1 << 20
_MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    """This node's bundle cache: ``$SPLITGATE_BUNDLE_CACHE``, else ``~/.cache/splitgate/bundles``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "splitgate" / "bundles"


def is_uri(ref: str | os.PathLike[str]) -> bool:
    """True if ``ref`` is a ``scheme://`` URI other than ``file://`` (it must be fetched)."""
    scheme = urllib.parse.urlsplit(str(ref)).scheme.lower()
    return "://" in str(ref) and len(scheme) > 1 and scheme != "file"


def resolve_bundles(
    refs: Sequence[str | os.PathLike[str]],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    trusted: TrustedKeys | None = None,
    allow_unsigned: bool = False,
    timeout_s: float = 120.0,
) -> list[str]:
    """:func:`resolve_bundle` for each reference; returns local directories, in order."""
    return [
        str(resolve_bundle(r, cache_dir=cache_dir, trusted=trusted, allow_unsigned=allow_unsigned, timeout_s=timeout_s))
        for r in refs
    ]


def resolve_bundle(
    ref: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    trusted: TrustedKeys | None = None,
    allow_unsigned: bool = False,
    timeout_s: float = 120.0,
) -> Path:
    """Turn a bundle reference into a local bundle directory, fetching it if needed.

    Args:
        ref: a bundle directory, a ``.tar.gz`` file, a ``file://`` URL, an
            ``http(s)://`` URL of a ``.tar.gz``, or an fsspec URL (archive or directory).
        cache_dir: where fetched bundles are kept (None = :func:`default_cache_dir`).
        trusted: accepted signing keys; when non-empty, a fetched bundle's
            signature is checked (``splitgate.security.verify_bundle``) before
            it enters the cache, and again when a cached copy is reused.
        allow_unsigned: with ``trusted``, accept an unsigned bundle (with a warning).
        timeout_s: network timeout of one download.

    Returns:
        A local directory holding the verified bundle (the path itself for a local directory).

    Raises:
        BundleError: the reference cannot be fetched or unpacked, the archive's
            pinned sha256 differs, or the bundle fails its integrity check.
        BundleSignatureError: with ``trusted``, the bundle is unsigned (unless
            ``allow_unsigned``), tampered with or signed by another key.
        ConfigError: the URI's scheme needs a package that is not installed.
    """
    text = str(ref)
    parts = urllib.parse.urlsplit(text)
    if parts.scheme.lower() == "file":
        text = urllib.request.url2pathname(parts.path)
    if not is_uri(text):
        path = Path(text).expanduser()
        if path.is_file() and path.name.endswith(_ARCHIVE_SUFFIXES):
            return _cached(str(path.resolve()), cache_dir, trusted, allow_unsigned, timeout_s)
        return path.absolute()
    return _cached(text, cache_dir, trusted, allow_unsigned, timeout_s)


# -- cache ------------------------------------------------------------------


def _cached(uri: str, cache_dir, trusted, allow_unsigned: bool, timeout_s: float) -> Path:
    """The cache entry of ``uri``: reused when present and intact, else fetched."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    entry = cache / hashlib.sha256(uri.encode()).hexdigest()[:32]
    if (entry / _MANIFEST).is_file():
        try:
            _verify(entry, uri, trusted, allow_unsigned)
            log.info("bundle %s: using the cached copy %s", _safe(uri), entry)
            return entry
        except BundleError as exc:
            log.warning("bundle %s: cached copy %s refused (%s); fetching again", _safe(uri), entry, exc)
            shutil.rmtree(entry, ignore_errors=True)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
    except OSError as exc:
        raise BundleError(f"bundle cache {cache} is not writable ({exc}); set bundle_cache or {CACHE_ENV}") from None
    try:
        root = _fetch(uri, work, timeout_s)
        _verify(root, uri, trusted, allow_unsigned)
        try:
            os.rename(root, entry)
        except OSError:
            if not (entry / _MANIFEST).is_file():  # not a concurrent fetch that won the race
                raise
        log.info("bundle %s: fetched into %s", _safe(uri), entry)
        return entry
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _verify(root: Path, uri: str, trusted: TrustedKeys | None, allow_unsigned: bool) -> None:
    """Check every file digest and the plan digest (PlanBundle.load) and, with
    ``trusted`` keys, the signature."""
    from splitgate.errors import BundleSignatureError
    from splitgate.security import verify_bundle

    try:
        bundle = PlanBundle.load(root)
        if trusted:
            verify_bundle(bundle, trusted, allow_unsigned=allow_unsigned)
    except BundleSignatureError as exc:
        raise type(exc)(f"bundle {_safe(uri)}: {exc}") from None
    except BundleError as exc:
        raise BundleError(f"bundle {_safe(uri)}: {exc}") from None


def _safe(uri: str) -> str:
    """The URI without credentials or query (for messages and logs)."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.scheme:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


# -- fetching ---------------------------------------------------------------


def _fetch(uri: str, work: Path, timeout_s: float) -> Path:
    """Fetch ``uri`` into ``work``; returns the unpacked bundle directory inside it."""
    parts = urllib.parse.urlsplit(uri)
    pin = _pinned_digest(uri, parts.fragment)
    scheme = parts.scheme.lower()
    archive = work / "bundle.tar.gz"
    if not scheme:  # a local archive file
        _copy_stream(_open_local(uri), archive, uri, pin)
    elif scheme in ("http", "https"):
        _copy_stream(_open_http(urllib.parse.urlunsplit(parts._replace(fragment="")), timeout_s, uri), archive, uri, pin)
    else:
        fs, path = _fsspec(uri)
        if not path.endswith(_ARCHIVE_SUFFIXES):
            return _copy_directory(fs, path, work / "bundle", uri)
        try:
            stream = fs.open(path, "rb")
        except Exception as exc:  # noqa: BLE001 - any filesystem failure names the URI
            raise BundleError(f"bundle {_safe(uri)}: cannot open ({type(exc).__name__}: {exc})") from None
        _copy_stream(stream, archive, uri, pin)
    return _unpack(archive, work / "unpacked", uri)


def _pinned_digest(uri: str, fragment: str) -> str | None:
    if not fragment:
        return None
    key, _, value = fragment.partition("=")
    value = value.strip().lower()
    if key != "sha256" or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise BundleError(f"bundle {_safe(uri)}: unknown URI fragment #{fragment}; the only one is #sha256=<64 hex>")
    return value


def _open_local(path: str):
    try:
        return open(path, "rb")
    except OSError as exc:
        raise BundleError(f"bundle archive {path}: unreadable ({exc})") from None


def _open_http(url: str, timeout_s: float, uri: str):
    request = urllib.request.Request(url, headers={"User-Agent": "splitgate-bundle-fetch"})
    try:
        return urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        raise BundleError(f"bundle {_safe(uri)}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BundleError(f"bundle {_safe(uri)}: cannot fetch ({reason})") from None


def _copy_stream(stream, target: Path, uri: str, pin: str | None) -> None:
    """Copy ``stream`` to ``target`` (closing it), checking the pinned sha256."""
    digest = hashlib.sha256()
    try:
        with stream, open(target, "wb") as out:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except BundleError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken download names the URI
        raise BundleError(f"bundle {_safe(uri)}: download failed ({type(exc).__name__}: {exc})") from None
    if pin is not None and digest.hexdigest() != pin:
        raise BundleError(
            f"bundle {_safe(uri)}: archive sha256 {digest.hexdigest()[:12]}... differs from the pinned "
            f"#sha256={pin[:12]}...; refused"
        )


def _unpack(archive: Path, into: Path, uri: str) -> Path:
    """Unpack a .tar.gz safely (:func:`splitgate._archive.unpack_bundle_archive`) and
    return the bundle root in it; content over 64x the archive (at least 256 MB) is refused."""
    into.mkdir()
    limit = max(64 * archive.stat().st_size, 256 << 20)
    return unpack_bundle_archive(archive, into, where=f"bundle {_safe(uri)}", max_bytes=limit)


def _fsspec(uri: str):
    """(filesystem, path) for an fsspec URL. Raises ConfigError if fsspec or the scheme's package is missing."""
    try:
        import fsspec
    except ModuleNotFoundError:
        raise ConfigError(
            f"bundle {_safe(uri)}: fetching {urllib.parse.urlsplit(uri).scheme}:// URIs needs fsspec: pip install fsspec"
        ) from None
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError as exc:  # the scheme's implementation (s3fs, gcsfs ...) is missing
        raise ConfigError(f"bundle {_safe(uri)}: {exc}") from None
    except ValueError as exc:  # unknown protocol
        raise ConfigError(f"bundle {_safe(uri)}: {exc}") from None
    return fs, path


def _copy_directory(fs, path: str, into: Path, uri: str) -> Path:
    """Copy a bundle directory from an fsspec filesystem, file by file."""
    try:
        if not fs.isdir(path):
            raise BundleError(f"bundle {_safe(uri)}: neither a bundle directory nor a .tar.gz/.tgz archive")
        base = path.rstrip("/")
        for name in fs.find(base):
            rel = name[len(base):].lstrip("/")
            target = (into / rel).resolve()
            if not rel or into.resolve() not in target.parents:
                raise BundleError(f"bundle {_safe(uri)}: refusing file {name!r} outside the bundle directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(name, str(target))
    except BundleError:
        raise
    except Exception as exc:  # noqa: BLE001 - any filesystem failure names the URI
        raise BundleError(f"bundle {_safe(uri)}: cannot copy ({type(exc).__name__}: {exc})") from None
    return into
