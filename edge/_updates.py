"""Over-the-air updates of the edge Gateway's plan bundles: the :class:`Updater`.

An :class:`Updater` (one per Gateway; :meth:`Gateway.check_updates
<splitgate.edge.Gateway.check_updates>` and the poller started by
``GatewayConfig.update_source``) reads the update index and checks each loaded
model: it downloads a new version's archive resumably, verifies the archive's
sha256 and size, unpacks it safely into ``update_dir/<model>/<version>-<digest>``,
then hands that directory to ``Gateway.update_bundle``, which verifies every file
digest (and the signature, when trust keys are configured), smoke-runs the model
and swaps atomically. Any failure leaves the running version serving and is
reported: a log line, ``splitgate_updates_total{model,outcome}`` in the Gateway's
Prometheus registry, the returned :class:`UpdateOutcome` list and the listeners'
callbacks.

With trust keys (``GatewayConfig.trust``) the :class:`Updater` refuses an
unsigned (unless ``allow_unsigned``), badly signed, foreign-signed or expired
index, and one whose sequence is lower than the highest it accepted (kept in
``update_dir/index-state.json``, across restarts): outcome ``untrusted-index``.
It never installs an entry published before the running version (a lower entry
``sequence``): outcome ``downgrade``.

The other parts:

* :mod:`splitgate.edge._update_index`: the index format (:data:`INDEX_NAME`,
  ``IndexEntry``, ``read_index``), its sequence, expiry and signature, and
  publishing (:func:`publish`, ``sign_index``, ``write_archive``);
* :mod:`splitgate.edge._update_fetch`: sources, the resumable HTTP and file
  fetch, ``unpack_archive``;
* :mod:`splitgate.edge._update_state`: what is remembered across restarts
  (refused archives, declined versions, sequences).

:data:`INDEX_NAME` and :func:`publish` are re-exported here for their users
(``splitgate publish`` in :mod:`splitgate.cli`, and :mod:`splitgate.edge`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from splitgate.planner import PlanBundle

from splitgate.edge._update_fetch import (
    READ_TIMEOUT_S,
    _Corrupt,
    _Interrupted,
    _Progress,
    _Source,
    unpack_archive,
)
from splitgate.edge._update_index import (
    _EXPIRES_FORMAT,
    INDEX_NAME,
    IndexEntry,
    _file_sha256,
    _Index,
    _InvalidIndex,
    _parse_index,
    _safe_name,
    publish,
)
from splitgate.edge._update_state import INDEX_STATE_NAME, _UpdateState
from splitgate.errors import BundleError, ConfigError, SplitgateError, Unavailable, UpdateIndexError
from splitgate.security._signing import TrustedKeys, verify_payload

__all__ = [
    "INDEX_NAME",
    "OUTCOMES",
    "UpdateOutcome",
    "Updater",
    "default_update_dir",
    "publish",
]

log = logging.getLogger("splitgate.edge.updates")

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
_warned_unverified = threading.Event()  # the "index is not verified" line, once per process


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


def default_update_dir() -> Path:
    """Where downloads and unpacked versions live when ``update_dir`` is not set:
    ``$XDG_CACHE_HOME/splitgate/updates`` (``~/.cache/...``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "splitgate" / "updates"


# -- the updater ----------------------------------------------------------------------


class _GatewayLike(Protocol):
    """What the updater needs of a Gateway."""

    @property
    def models(self) -> list[str]: ...

    def bundle(self, model: str) -> PlanBundle: ...

    def update_bundle(self, source: str | Path, *, smoke: bool = True) -> PlanBundle: ...


Listener = Callable[[UpdateOutcome], Any]


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
        self._note_rollbacks_within(timeout_s)

    def note_rollback(self) -> None:
        """The app just rolled a model back (``Gateway.rollback_bundle``): record it
        now, so a process killed before the next check still declines that version.
        A check under way (holding the lock through a download) is not waited for:
        the next check, or closing, records it."""
        self._note_rollbacks_within(0.0)

    def _note_rollbacks_within(self, timeout_s: float) -> None:
        """:meth:`_note_rollbacks` if the check lock comes free within ``timeout_s``."""
        if self._lock.acquire(timeout=timeout_s):
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
