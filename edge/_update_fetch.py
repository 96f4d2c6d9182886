"""Where update archives come from, and how one arrives: sources, resumable fetch, unpacking.

A source (:class:`_Source`) is a directory or an HTTP(S) URL of the update index
(or of its folder). :meth:`_Source.fetch` brings an archive in resumably (HTTP
``Range`` into ``<sha256>.part``; an interrupted transfer continues where it
stopped on the next check) and never takes more bytes than the index's size;
:func:`unpack_archive` unpacks it safely (regular files and directories only,
``tarfile`` ``filter="data"``: no links, no absolute paths, no ``..``). The
updater (:mod:`splitgate.edge._updates`) checks the archive's sha256 in between.
"""

from __future__ import annotations

import http.client
import os
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from splitgate import __version__
from splitgate._archive import unpack_bundle_archive
from splitgate.edge._update_index import INDEX_NAME, _InvalidIndex
from splitgate.errors import BundleError, ConfigError, Unavailable

__all__ = ["MAX_INDEX_BYTES", "READ_TIMEOUT_S", "unpack_archive"]

#: The largest index read (an index lists versions, not data).
MAX_INDEX_BYTES = 4 * 1024 * 1024
#: Seconds a download may stall (no byte received) before it counts as interrupted.
READ_TIMEOUT_S = 30.0
_CHUNK = 1 << 16


class _Interrupted(Unavailable):
    """A transfer stopped before its last byte (the partial file is kept)."""


class _Corrupt(BundleError):
    """Downloaded bytes are not the archive the index names."""


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
