"""Refit a plan bundle's decision data to a device's own measurements.

``splitgate refit BUNDLE --device-profile device.json`` (:func:`refit_bundle`)
recomputes every shape bucket's device times in ``profile.json`` from a
:class:`~splitgate.planner._device.DeviceProfile` and rebuilds each bucket's decision
table, without re-extracting a partition:

* a partition the device measured (matched by its cut, see
  :func:`splitgate.planner._device.cut_key`) gets that time, at the nearest bucket
  scaled by input elements;
* any other partition gets the device's per-node sum over its prefix's nodes,
  times this planning machine's measured/estimated ratio for it (the
  correction :func:`splitgate.planner._plan.plan_model` applies to imported profiles);
* an int8 twin (``cut-9~int8``, ``device~int8``; ``--quantize``) gets the
  device's measurement of its own int8 prefix, never its fp32 partition's. A
  device profile without int8 measurements (taken on a bundle planned without
  ``--quantize``) gives it the device's fp32 time of the same cut times this
  planning machine's measured int8/fp32 ratio (source
  :data:`INT8_RATIO_SOURCE`, and a note in ``profile.json``): an estimate,
  since that ratio differs between CPUs (0.7x on a VNNI CPU, 2x on another
  model); profile the ``--quantize`` bundle on the device to replace it;
* the cascade's small model (``--cascade``) gets the device's measurement of
  it (the profile of this bundle, or of any bundle with the same small model
  file), recorded in ``profile.json`` (key ``cascade``: its time and the full
  model's measured with it, see :func:`splitgate.planner._cascade.planned_small_ms`).
  A device profile without it (older, or of a bundle with another or no
  cascade) leaves the plan's small/full ratio applied to the device's
  full-model time, with a note in ``profile.json`` and a log line;
* an encoded twin (``cut-3@int8``) gets its raw twin's new time plus the
  encode time the device measured (for an int8 prefix's twin without its own,
  the fp32 cut's at that encoding: the same tensors), else the planned encode
  time scaled by the device's speed relative to the plan (its ``device`` partition).

Only the decision data changes (``profile.json``, ``decision_table.json`` and
the manifest's ``device`` key and file digests): the plan digest stays, so the
cloud tier keeps serving the same suffixes to the refitted edge. The bundle is
rewritten like :func:`splitgate.planner.build_bundle` writes one: into a temporary
sibling directory (unchanged files hard-linked, or copied where links are not
possible) renamed into place.

Limits: partitions the plan dropped (winning nowhere at planning time) are not
in the bundle, so a refit chooses among those the plan kept.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx

from splitgate.planner._bundle import MANIFEST, PlanBundle, _replace_dir, plan_digest, sha256_file
from splitgate.planner._cascade import PROFILE_KEY as CASCADE_KEY, planned_small_ms
from splitgate.planner._decide import DecisionTable
from splitgate.planner._device import DeviceProfile, load_device_profile
from splitgate.planner._partition_profile import BucketProfile, PartitionProfile, Profile
from splitgate.planner._plan import table_for
from splitgate.planner._quantize import candidate_parts
from splitgate.errors import BundleError, InvalidArgument

__all__ = ["INT8_RATIO_SOURCE", "refit_bundle", "refit_partitions", "refit_stats", "refit_table"]

Progress = Callable[[str, int, int], None]
Shapes = Mapping[str, Any]

log = logging.getLogger(__name__)

#: ``device_source`` of an int8 twin the device profile did not measure: the device's
#: measured fp32 time of its cut times the planning machine's int8/fp32 ratio
INT8_RATIO_SOURCE = "fp32-measured*int8-ratio"
#: start of the note a refit leaves in ``profile.json`` (replaced by the next refit)
_NOTE = "refit: "


class _PrefixNodes:
    """Node names of each partition's device side (read from the bundle's files, cached)."""

    def __init__(self, bundle: PlanBundle) -> None:
        self.bundle = bundle
        self._cache: dict[Path, list[str]] = {}

    def of(self, pid: str) -> list[str]:
        part = self.bundle.partitions.get(pid)
        if part is None or part.prefix_path is None:
            return []
        path = part.prefix_path
        if path not in self._cache:
            model = onnx.load(os.fspath(path), load_external_data=False)
            self._cache[path] = [n.name for n in model.graph.node]
        return self._cache[path]


def _correction(entry: PartitionProfile) -> float:
    """This machine's measured / per-node-estimated time of a partition (1.0 if unknown)."""
    if entry.device_timing is None or entry.est_device_ms <= 0:
        return 1.0
    return entry.device_timing.typical_ms / entry.est_device_ms


def refit_partitions(
    stats: Mapping[str, PartitionProfile],
    device: DeviceProfile,
    shapes: Shapes | None,
    prefix_nodes: Callable[[str], list[str]],
) -> dict[str, PartitionProfile]:
    """One bucket's partition figures with device times from ``device``.

    Args:
        stats: partition id -> its figures at the bucket.
        device: the device's measurements.
        shapes: the bucket's input shapes (None = the device profile's bucket 0).
        prefix_nodes: partition id -> node names of its device side.

    Returns:
        New figures, same order: ``device_ms`` replaced, ``device_source``
        (``"measured"``, ``"node-sum"`` or, for an int8 twin the device did not
        measure, :data:`INT8_RATIO_SOURCE`), ``planned_device_ms`` (the plan's
        own figure), ``device_suffix_ms`` where the device measured the suffix
        (a fallback's cost); encoded twins also get a new ``encode_ms``.

    Raises:
        BundleError: a twin names a raw partition ``stats`` lacks.
    """
    nodes = device.node_profile(shapes)
    out: dict[str, PartitionProfile] = {}
    # fp32 prefixes first: an int8 twin the device did not measure is scaled from its fp32 cut
    for int8 in (False, True):
        for pid, entry in stats.items():
            if entry.is_twin or _is_int8(pid, entry) != int8:
                continue
            if entry.kind == "cloud":
                out[pid] = entry
                continue
            tensors = list(entry.tensors) or None if entry.kind == "split" else None
            ms = device.partition_ms(pid, shapes, kind=entry.kind, tensors=tensors)
            source = "measured"
            if ms is None and int8:
                ms, source = _int8_from_fp32(pid, entry, stats, out)
            if ms is None:
                names = prefix_nodes(candidate_parts(pid)[0]) if int8 else []
                ms, source = nodes.sum(names or prefix_nodes(pid)) * _correction(entry), "node-sum"
            suffix = device.suffix_ms(pid, shapes, tensors=tensors) if entry.kind == "split" else None
            out[pid] = replace(
                entry, device_ms=round(ms, 4), device_source=source, planned_device_ms=_planned(entry),
                device_suffix_ms=round(suffix, 4) if suffix is not None else entry.device_suffix_ms,
            )
    old_dev = stats["device"].device_ms if "device" in stats else 0.0
    new_dev = out["device"].device_ms if "device" in out else 0.0
    speed = new_dev / old_dev if old_dev > 0 and new_dev > 0 else 1.0
    for pid, entry in stats.items():
        if not entry.is_twin:
            continue
        base = out.get(str(entry.base))
        if base is None:
            raise BundleError(f"profile entry '{pid}' names a raw twin '{entry.base}' the profile lacks")
        tensors = list(base.tensors) or None
        enc = device.encode_ms(pid, shapes, tensors=tensors)
        part, precision, encoding = candidate_parts(pid)
        if enc is None and precision != "fp32":  # the same cut tensors, sent from the fp32 prefix
            enc = device.encode_ms(f"{part}@{encoding}", shapes, tensors=tensors)
        source = base.device_source or "measured"
        if enc is None:
            enc, source = (entry.encode_ms or 0.0) * speed, f"{source}+scaled-encode"
        out[pid] = replace(entry, device_ms=round(base.device_ms + enc, 4), encode_ms=round(enc, 4),
                           device_source=source, planned_device_ms=_planned(entry))
    return {pid: out[pid] for pid in stats}


def _is_int8(pid: str, entry: PartitionProfile) -> bool:
    """An int8 twin's raw partition (``cut-9~int8``, ``device~int8``)?"""
    return entry.precision not in (None, "fp32") or candidate_parts(pid)[1] != "fp32"


def _int8_from_fp32(pid: str, entry: PartitionProfile, stats: Mapping[str, PartitionProfile],
                    refitted: Mapping[str, PartitionProfile]) -> tuple[float | None, str]:
    """An int8 twin's device time from its fp32 partition's measured one, times the planning
    machine's int8/fp32 ratio (the sessions it timed; the plan's figures when it has none).

    Returns:
        (ms, :data:`INT8_RATIO_SOURCE`), or (None, "") when the fp32 partition was not
        measured on the device or the plan has no ratio.
    """
    base = candidate_parts(pid)[0]
    fp32, fp32_new = stats.get(base), refitted.get(base)
    if fp32 is None or fp32_new is None or fp32_new.device_source != "measured":
        return None, ""
    if entry.device_timing is not None and fp32.device_timing is not None and fp32.device_timing.typical_ms > 0:
        ratio = entry.device_timing.typical_ms / fp32.device_timing.typical_ms
    elif _planned(fp32) > 0:
        ratio = _planned(entry) / _planned(fp32)
    else:
        return None, ""
    return fp32_new.device_ms * ratio, INT8_RATIO_SOURCE


def _planned(entry: PartitionProfile) -> float:
    """The plan's own device time of an entry (kept through repeated refits)."""
    return entry.planned_device_ms if entry.planned_device_ms is not None else entry.device_ms


def refit_stats(
    stats: Mapping[str, Mapping[str, Any]],
    device: DeviceProfile,
    shapes: Shapes | None,
    prefix_nodes: Callable[[str], list[str]],
) -> dict[str, dict[str, Any]]:
    """:func:`refit_partitions` over ``profile.json`` entries (dicts in, dicts out).

    Raises:
        BundleError: a twin names a raw partition ``stats`` lacks.
        KeyError, TypeError, ValueError: a malformed entry.
    """
    typed = {pid: PartitionProfile.from_dict(e) for pid, e in stats.items()}
    return {pid: e.to_dict() for pid, e in refit_partitions(typed, device, shapes, prefix_nodes).items()}


def _planned_shapes(bundle: PlanBundle, profile: Profile) -> dict[str, tuple[int, ...]]:
    """The main bucket's shapes (those a profile without buckets was planned at)."""
    if profile.shapes:
        return {k: tuple(int(x) for x in v) for k, v in profile.shapes.items()}
    batch = int(profile.batch or 1)
    return {s.name: tuple(d if d >= 0 else batch for d in s.shape) for s in bundle.inputs}


def refit_bundle(
    bundle_dir: str | os.PathLike[str],
    device_profile: DeviceProfile | str | os.PathLike[str],
    *,
    progress: Progress | None = None,
) -> PlanBundle:
    """Refit a bundle's device times and decision tables to a device profile.

    Args:
        bundle_dir: a profiled plan bundle.
        device_profile: a :class:`DeviceProfile` or its JSON (``splitgate
            profile``; a legacy per-node profile JSON also works: node sums only).
        progress: ``callback(step, done, total)``.

    Returns:
        The refitted bundle, loaded back (and verified); same ``plan_digest``.

    Raises:
        InvalidArgument: an unreadable device profile, one of another model,
            or a bundle without a profile.
        BundleError: the bundle fails verification or its profile is malformed.
    """
    report = progress or (lambda step, done, total: None)
    root = Path(bundle_dir)
    report("refit", 0, 3)
    bundle = PlanBundle.load(root)
    if not bundle.has_profile or bundle.profile is None or bundle.decision_table is None:
        raise InvalidArgument(f"bundle '{bundle.model_name}' at {root} has no profile to refit: "
                              "plan it with profiling on")
    device = load_device_profile(device_profile)
    names = [n.name for n in onnx.load(os.fspath(bundle.model_path), load_external_data=False).graph.node]
    device.check_model(bundle.model_sha256, what=f"bundle '{bundle.model_name}'", nodes=names)
    manifest = copy.deepcopy(bundle.manifest)
    kinds = {pid: p.kind for pid, p in bundle.partitions.items()}
    try:
        profile = Profile.from_dict(copy.deepcopy(bundle.profile), kinds=kinds)
        main_shapes: Shapes | None = _planned_shapes(bundle, profile)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleError(f"{root}: malformed profile ({exc!r})") from exc
    # without buckets (older profiles) the top-level partitions are the one bucket
    views = profile.buckets or [BucketProfile(dict(main_shapes or {}), profile.partitions)]
    legacy = not device.buckets[0].shapes  # a legacy per-node profile: no shapes to match
    grid = bundle.decision_table.grid
    nodes = _PrefixNodes(bundle)
    report("refit", 1, 3)

    tables: list[DecisionTable] = []
    for view in views:
        shapes = None if legacy else view.shapes
        view.partitions = refit_partitions(view.partitions, device, shapes, nodes.of)
        tables.append(table_for(view.partitions, profile.energy_model, profile.constraints_model, grid))
        if profile.buckets:
            device_ms = device.node_profile(shapes).node_ms
            view.node_ms = {**(view.node_ms or {}), "device": {k: round(v, 5) for k, v in device_ms.items()}}
            if view.model_ms is not None:
                view.model_ms["device"] = round(device.model_ms(shapes), 4)
    profile.partitions = views[0].partitions
    profile.notes = _refit_notes(profile.notes, views, device)
    cascade, cascade_note = _refit_cascade(bundle, device, None if legacy else views[0].shapes, views[0])
    profile.extra.pop(CASCADE_KEY, None)
    if cascade is not None:
        profile.extra[CASCADE_KEY] = cascade
    if cascade_note is not None:
        log.warning("%s", cascade_note)
        profile.notes = [*(profile.notes or []), cascade_note]
    main_shapes = None if legacy else views[0].shapes
    profile.node_ms = {**(profile.node_ms or {}), "device": {
        k: round(v, 5) for k, v in device.node_profile(main_shapes).node_ms.items()}}
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    planned = profile.device or {}
    record = {"name": device.label, "identity": device.device, "profile_sha256": device.sha256(),
              "profile_plan_digest": device.plan_digest, "refit_at": stamp}
    profile.device = {
        "threads": device.threads,
        "slowdown": 1.0,
        "source": f"device:{device.label}",
        "model_ms": round(device.model_ms(main_shapes), 4),
        "attributed": round(device.bucket_for(main_shapes)[0].attributed, 4),
        **record,
        "planned": planned.get("planned", planned),
    }
    table_doc = tables[0].to_dict()
    if profile.buckets:
        table_doc["buckets"] = [t.to_dict() for t in tables]
    report("refit", 2, 3)
    _write(root, bundle, manifest, profile.to_dict(), table_doc, record)
    report("refit", 3, 3)
    return PlanBundle.load(root)


def _refit_notes(notes: list[str] | None, views: list[BucketProfile], device: DeviceProfile) -> list[str] | None:
    """The profile's notes with this refit's (a previous refit's replaced): which int8
    twins took the planning machine's int8/fp32 ratio (also logged as a warning)."""
    kept = [n for n in notes or [] if not n.startswith(_NOTE)]
    scaled = sorted({pid for v in views for pid, e in v.partitions.items()
                     if e.device_source == INT8_RATIO_SOURCE})
    if not scaled:
        return None if notes is None else kept
    note = (f"{_NOTE}the device profile ({device.label}) has no int8 measurements (profiled on a bundle "
            f"planned without --quantize): {', '.join(scaled)} take the device's fp32 time of the same cut "
            "times this planning machine's int8/fp32 ratio; run `splitgate profile` on this bundle for "
            "the device's own int8 times")
    log.warning("%s", note)
    return [*kept, note]


def _refit_cascade(bundle: PlanBundle, device: DeviceProfile, shapes: Shapes | None,
                   main: BucketProfile) -> tuple[dict[str, Any] | None, str | None]:
    """The cascade's ``profile.json`` entry from the device's own timing of its small model.

    Args:
        bundle: the bundle being refitted.
        device: the device profile.
        shapes: the main bucket's shapes (None: a legacy profile, bucket 0).
        main: the main bucket, already refitted (its ``device`` partition's time).

    Returns:
        ``(entry, None)`` when the device timed this small model; ``(None, note)``
        when it did not (the plan's ratio stays); ``(None, None)`` without a cascade.
    """
    spec = bundle.cascade
    if spec is None:
        return None, None
    sha = str(bundle.manifest.get("files", {}).get(spec.model, ""))
    ms = device.cascade_ms(sha, shapes)
    if ms is None:
        why = ("timed another cascade model" if device.cascade_sha256 else
               "has no cascade measurement (taken before cascades were timed, or on a bundle without one)")
        kept = (f"the plan's small/full ratio ({spec.device_ms:g} / {spec.full_device_ms:g} ms) of the device's "
                "full-model time" if spec.device_ms is not None and spec.full_device_ms else "the plan's time")
        return None, (f"{_NOTE}the device profile ({device.label}) {why}: the cascade keeps {kept}; run "
                      "`splitgate profile` on this bundle for the device's own time")
    device_part = main.partitions.get("device")
    full = device_part.device_ms if device_part is not None else device.model_ms(shapes)
    return {"device_ms": round(ms, 4), "full_device_ms": round(full, 4), "source": "measured",
            "device": device.label, "planned_device_ms": spec.device_ms,
            "planned_full_device_ms": spec.full_device_ms}, None


def _cascade_row(bundle: PlanBundle) -> tuple[float | None, str]:
    """(the cascade's device ms at the main planned shape, where it comes from) for a refit table."""
    spec = bundle.cascade
    prof = bundle.plan_profile.partitions if bundle.plan_profile else {}
    full = prof["device"].device_ms if "device" in prof else None
    ms = planned_small_ms(spec, bundle.profile, full) if spec is not None else None
    measured = isinstance((bundle.profile or {}).get(CASCADE_KEY), Mapping)
    return ms, "measured" if measured else "plan ratio"


def _write(root: Path, bundle: PlanBundle, manifest: dict[str, Any], profile: dict[str, Any],
           table_doc: dict[str, Any], record: dict[str, Any]) -> None:
    """Write the refitted bundle into a temporary sibling directory and rename it into place."""
    prof_rel, table_rel = str(manifest["profile"]), str(manifest["decision_table"])
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        tmp.chmod(0o755)
        rewritten = {prof_rel, table_rel, MANIFEST}
        for src in root.rglob("*"):
            rel = src.relative_to(root)
            if src.is_dir() or rel.as_posix() in rewritten:
                continue
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        for rel, doc in ((prof_rel, profile), (table_rel, table_doc)):
            path = PlanBundle._resolve(tmp, rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
            manifest["files"][rel] = sha256_file(path)
        manifest["device"] = record
        digest = plan_digest(manifest)
        if digest != bundle.plan_digest:
            raise BundleError(f"refit would change the plan digest of {root} ({bundle.plan_digest[:12]} -> "
                              f"{digest[:12]}): only decision data may change")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _replace_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def refit_table(before: PlanBundle, after: PlanBundle) -> Any:
    """A rich table: each partition's planned and refitted device ms, and the
    decision-table cells it wins before and after (main bucket)."""
    from rich.table import Table

    old = before.plan_profile.partitions if before.plan_profile else {}
    new = after.plan_profile.partitions if after.plan_profile else {}
    wins_before = before.decision_table.wins() if before.decision_table else {}
    wins_after = after.decision_table.wins() if after.decision_table else {}
    table = Table(title=f"refit: {after.model_name}")
    for col in ("partition", "device ms (before)", "device ms (after)", "source", "cells won (before)",
                "cells won (after)"):
        table.add_column(col, justify="left" if col in ("partition", "source") else "right")
    for pid, entry in new.items():
        before_ms = old[pid].device_ms if pid in old else 0.0
        table.add_row(pid, f"{before_ms:.3f}", f"{entry.device_ms:.3f}",
                      (entry.device_source or "-") if entry.kind != "cloud" or entry.is_twin else "-",
                      str(wins_before.get(pid, 0)), str(wins_after.get(pid, 0)))
    if after.cascade is not None:  # the small model: no cells of its own (the decision core weighs it per request)
        (was, _), (now, source) = _cascade_row(before), _cascade_row(after)
        table.add_row("cascade", "-" if was is None else f"{was:.3f}", "-" if now is None else f"{now:.3f}",
                      source, "-", "-")
        table.caption = next((n for n in (after.profile or {}).get("notes") or []
                              if n.startswith(_NOTE) and "cascade" in n), None)
    return table
