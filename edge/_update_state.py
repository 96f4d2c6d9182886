"""What the over-the-air updater remembers across restarts: ``update_dir/index-state.json``.

The file (:class:`_UpdateState`) keeps the highest signed-index sequence accepted
and the entry sequence of each installed version (rollback protection), the
archives refused (by sha256, with the trust keys and splitgate version they were
refused under; outcome ``skipped``, nothing fetched) and the versions the app
rolled back from (``declined``), so a restarted edge neither fetches nor installs
them again; each list keeps its newest :data:`MAX_REFUSED` / :data:`MAX_DECLINED`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from splitgate import __version__
from splitgate.edge._update_index import _EXPIRES_FORMAT, _HEX64

__all__ = ["INDEX_STATE_NAME", "MAX_DECLINED", "MAX_REASON_CHARS", "MAX_REFUSED"]

log = logging.getLogger("splitgate.edge.updates")

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
