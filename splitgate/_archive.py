"""Unpacking a bundle archive (a ``.tar.gz`` of the bundle directory) safely.

One helper for the two places that fetch bundles: the edge's over-the-air
updates (:mod:`splitgate.edge._update_fetch`) and the cloud's bundle URIs
(:mod:`splitgate.cloud._fetch`). The edge may not import the cloud, so it
lives in the base package.
"""

from __future__ import annotations

import gzip
import os
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from splitgate.errors import BundleError

__all__ = ["MAKE_ARCHIVE", "unpack_bundle_archive"]

#: How a user makes an archive the unpacker accepts.
MAKE_ARCHIVE = "tar czf b.tar.gz -C BUNDLE ."
_MANIFEST = "manifest.json"


def unpack_bundle_archive(
    archive: str | os.PathLike[str], dest: str | os.PathLike[str], *, where: str, max_bytes: int,
) -> Path:
    """Unpack a bundle archive into the existing directory ``dest``.

    Only regular files and directories are accepted; names are checked here and
    again by ``tarfile``'s ``filter="data"`` (no absolute paths, no ``..``, no
    links, no device files); the declared sizes may total at most ``max_bytes``
    (a zip bomb stops before anything is written).

    Args:
        archive: the ``.tar.gz`` file.
        dest: an existing, empty directory to unpack into.
        where: how errors name the archive (its URL or index entry).
        max_bytes: the most content the archive may unpack to.

    Returns:
        The bundle directory: ``dest`` (an archive made with :data:`MAKE_ARCHIVE`),
        or its one sub-directory holding ``manifest.json`` (``tar czf b.tar.gz BUNDLE``).

    Raises:
        BundleError: unreadable archive, a link or special file, a name that
            escapes ``dest``, more than ``max_bytes`` of content, or no
            ``manifest.json`` at the top.
    """
    dest = Path(dest)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            _check_members(members, where, max_bytes)
            tar.extractall(dest, members=members, filter="data")
    except tarfile.FilterError as exc:
        raise BundleError(f"{where}: refused archive member ({exc})") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        raise BundleError(
            f"{where}: not a readable .tar.gz of a bundle directory ({type(exc).__name__}: {exc}); "
            f"make one with: {MAKE_ARCHIVE}"
        ) from None
    return _bundle_root(dest, where)


def _check_members(members: list[tarfile.TarInfo], where: str, max_bytes: int) -> None:
    total = 0
    for m in members:
        name = PurePosixPath(m.name)
        if name.is_absolute() or ".." in name.parts:
            raise BundleError(f"{where}: archive member {m.name!r} escapes the bundle directory")
        if not (m.isfile() or m.isdir()):
            kind = "link" if (m.issym() or m.islnk()) else "special file"
            raise BundleError(f"{where}: archive member {m.name!r} is a {kind}; bundles hold files only")
        total += m.size
    if total > max_bytes:
        raise BundleError(f"{where}: {total} bytes of archive content is over the {max_bytes} byte limit")


def _bundle_root(dest: Path, where: str) -> Path:
    if (dest / _MANIFEST).is_file():
        return dest
    subdirs = [p for p in dest.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / _MANIFEST).is_file():
        return subdirs[0]
    raise BundleError(f"{where}: the archive holds no {_MANIFEST} at its top; make it with: {MAKE_ARCHIVE}")
