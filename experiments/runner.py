"""``splitgate experiment``: plan, run both engines, write CSV, tables and plots."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from splitgate.experiments._records import Record, Summary, adaptive_vs_static, paired_ratio, summarize, write_csv
from splitgate.experiments.spec import ExperimentSpec, load_spec
from splitgate.planner import PlanBundle

__all__ = ["ExperimentResult", "prepare_bundle", "byte_image_calibration", "BYTE_IMAGES", "run_experiments", "summary_table", "adaptive_verdict",
           "overview_table", "DADS_PUBLISHED"]

#: DADS (INFOCOM'19) speedup of its min-cut vs edge-only, per uplink (the issue's reference).
DADS_PUBLISHED = {"cat1": 1.46, "3g": 4.14, "4g": 7.23, "wifi": 8.32}


@dataclass
class ExperimentResult:
    """What one spec produced."""

    spec: ExperimentSpec
    records: list[Record]
    summaries: list[Summary]
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    reproduction: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def prepare_bundle(spec: ExperimentSpec, workdir: Path, progress=None) -> PlanBundle:  # type: ignore[no-untyped-def]
    """Export (zoo) and plan the spec's model for its device; reuse a bundle planned
    with the same options in ``workdir``.

    ``plan: {calibration: byte_images}`` calibrates with seeded images scaled
    from bytes (``k / 255``, :func:`byte_image_calibration`), as a camera's
    frames are: the lossless ``cloud@uint8`` then applies (DADS uploads images).
    """
    from splitgate.planner import build_bundle, load_bundle

    workdir.mkdir(parents=True, exist_ok=True)
    opts = {"reference_cuts": 6, **spec.plan, "device_slowdown": spec.device_slowdown}
    if spec.device_profile:
        opts["device_profile"] = spec.device_profile
    key = json.dumps({"model": spec.model, **opts}, sort_keys=True, default=str)
    root = workdir / f"{spec.model_name}.bundle"
    stamp = workdir / f"{spec.model_name}.options.json"
    if (root / "manifest.json").is_file() and stamp.is_file() and stamp.read_text() == key:
        return load_bundle(root)
    if spec.model.endswith(".onnx"):
        model = Path(spec.model)
    else:
        from splitgate.planner.zoo import export_zoo_model

        model = export_zoo_model(spec.model, workdir / f"{spec.model}.onnx", seed=0)
    if opts.get("calibration") == BYTE_IMAGES:
        opts["calibration"] = byte_image_calibration(model, opts.get("calibration_samples", 16))
    bundle = build_bundle(model, root, model_name=spec.model_name, progress=progress, **opts)
    stamp.write_text(key)
    return bundle


#: ``plan: {calibration: byte_images}`` in a spec (see :func:`prepare_bundle`)
BYTE_IMAGES = "byte_images"


def byte_image_calibration(model: Path, samples: int = 16, seed: int = 0) -> dict[str, object]:
    """Seeded calibration inputs scaled from bytes (``k / 255``, float32) for every float
    input of ``model`` (dynamic dims = 1), as images decoded from a camera or a file are."""
    import numpy as np
    import onnx

    rng = np.random.default_rng(seed)
    out: dict[str, object] = {}
    graph = onnx.load(str(model), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    for inp in graph.input:
        if inp.name in inits or inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
                for d in inp.type.tensor_type.shape.dim]
        out[inp.name] = (rng.integers(0, 256, size=[samples, *dims[1:]]) / 255.0).astype(np.float32)
    return out


def summary_table(result: ExperimentResult) -> Table:
    """Per engine and policy: requests, latency, energy, bytes, fallbacks, partitions (``cloud`` is
    cloud-only with the best guarded encoding, ``cloud-raw`` the raw fp32 upload)."""
    t = Table(title=f"experiment '{result.spec.name}' ({result.spec.trace.name}, {result.spec.trace.duration_s:g} s)")
    for col in ("engine", "policy", "n", "mean ms", "p50 ms", "p95 ms", "energy mJ", "KB sent", "fallbacks",
                "partitions"):
        t.add_column(col, justify="left" if col in ("engine", "policy", "partitions") else "right")
    t.caption = "cloud = cloud-only with the best guarded input encoding (partitions names it); cloud-raw = raw fp32"
    for s in result.summaries:
        t.add_row(s.engine, s.policy, str(s.n), f"{s.mean_ms:.1f}", f"{s.p50_ms:.1f}", f"{s.p95_ms:.1f}",
                  f"{s.energy_mj:.1f}", f"{s.kb_sent:.1f}", str(s.fallbacks), s.partitions)
    return t


def reproduction_rows(summaries_by_label: dict[str, list[Summary]], engine: str) -> list[dict]:
    """DADS-style table rows: per trace label, edge-only / cloud-only / min-cut latency and speedups.

    Cloud-only is the ``cloud`` policy: the best guarded cloud encoding
    (``cloud_partition`` names it); the raw fp32 upload (``cloud-raw``) is its
    own column when the spec ran it (``cloud_raw_ms``, else None). The split is
    ``mincut`` (joint over cut, prefix precision and encoding when the plan
    has int8 prefixes); ``joint`` (``mincut`` with the cascade in front where it
    pays) is its own column when the spec ran it (``joint_ms``, else None).
    """
    rows = []
    for label, sums in summaries_by_label.items():
        by = {s.policy: s for s in sums if s.engine == engine}
        best = by.get("mincut") or by.get("adaptive")
        if best is None or "device" not in by or "cloud" not in by:
            continue
        raw, joint = by.get("cloud-raw"), by.get("joint")
        rows.append({
            "engine": engine, "link": label, "edge_ms": round(by["device"].mean_ms, 1),
            "cloud_ms": round(by["cloud"].mean_ms, 1), "cloud_partition": by["cloud"].partitions,
            "cloud_raw_ms": None if raw is None else round(raw.mean_ms, 1),
            "split_ms": round(best.mean_ms, 1),
            "split_partition": best.partitions,
            "speedup_vs_edge": round(by["device"].mean_ms / best.mean_ms, 2),
            "speedup_vs_cloud": round(by["cloud"].mean_ms / best.mean_ms, 2),
            "speedup_vs_cloud_raw": None if raw is None else round(raw.mean_ms / best.mean_ms, 2),
            "joint_ms": None if joint is None else round(joint.mean_ms, 1),
            "joint_partition": None if joint is None else joint.partitions,
            "joint_speedup_vs_edge": None if joint is None else round(by["device"].mean_ms / joint.mean_ms, 2),
            "dads_published_vs_edge": DADS_PUBLISHED.get(label),
        })
    return rows


def _write(result: ExperimentResult, console: Console) -> None:
    from splitgate.experiments import plots

    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    result.files.append(write_csv(result.records, out / "records.csv"))
    summary_path = out / "summary.csv"
    with summary_path.open("w") as fh:
        fields = list(asdict(result.summaries[0]).keys()) if result.summaries else []
        fh.write(",".join(fields) + "\n")
        for s in result.summaries:
            fh.write(",".join(f'"{v}"' if isinstance(v, str) and "," in v else f"{v:.3f}" if isinstance(v, float)
                              else str(v) for v in asdict(s).values()) + "\n")
    result.files.append(summary_path)
    result.files += plots.plot_all(result.records, result.spec, out)
    console.print(summary_table(result))
    verdict = adaptive_verdict(result)
    for engine, v in verdict.items():
        paired = v["paired_vs_best_static_pct"]
        console.print(f"  {engine}: adaptive {v['adaptive_mean_ms']:.1f} ms vs best static '{v['best_static']}' "
                      f"{v['best_static_mean_ms']:.1f} ms -> [bold]{v['adaptive_vs_best_static_pct']:+.1f}%[/]"
                      + ("" if paired is None else f" (same requests: {paired:+.1f}%)"))
    if verdict:
        path = out / "adaptive.json"
        path.write_text(json.dumps(verdict, indent=1) + "\n")
        result.files.append(path)
    if result.spec.report == "dads":
        by_label: dict[str, list[Record]] = {}
        for r in result.records:
            by_label.setdefault(r.label, []).append(r)
        sums = {label: summarize(rs) for label, rs in by_label.items()}
        for engine in dict.fromkeys(r.engine for r in result.records):
            result.reproduction += reproduction_rows(sums, engine)
        t = Table(title="DADS reproduction: speedup of the min-cut partition",
                  caption="cloud-only = the best guarded cloud encoding (the plan's estimate at the spec's nominal "
                          "link); cloud (raw fp32) = the raw input upload")
        for col in ("engine", "link", "edge ms", "cloud-only ms", "cloud-only runs", "cloud (raw fp32) ms",
                    "split ms", "partition", "vs edge", "vs cloud-only", "vs cloud (raw fp32)", "joint ms",
                    "joint runs", "joint vs edge", "DADS vs edge"):
            t.add_column(col)
        for row in result.reproduction:
            raw_ms, raw_x = row["cloud_raw_ms"], row["speedup_vs_cloud_raw"]
            joint_ms, joint_x = row.get("joint_ms"), row.get("joint_speedup_vs_edge")
            t.add_row(row["engine"], row["link"], str(row["edge_ms"]), str(row["cloud_ms"]), row["cloud_partition"],
                      "-" if raw_ms is None else str(raw_ms), str(row["split_ms"]),
                      row["split_partition"], f"{row['speedup_vs_edge']:.2f}x", f"{row['speedup_vs_cloud']:.2f}x",
                      "-" if raw_x is None else f"{raw_x:.2f}x", "-" if joint_ms is None else str(joint_ms),
                      row.get("joint_partition") or "-", "-" if joint_x is None else f"{joint_x:.2f}x",
                      f"{row['dads_published_vs_edge']}x" if row["dads_published_vs_edge"] else "-")
        console.print(t)
        path = out / "reproduction.json"
        path.write_text(json.dumps(result.reproduction, indent=1) + "\n")
        result.files.append(path)
    for note in result.notes:
        console.print(f"  [dim]{note}[/]")
    console.print(f"  wrote {', '.join(str(p) for p in result.files)}")


def adaptive_verdict(result: ExperimentResult) -> dict[str, dict[str, object]]:
    """Per engine: adaptive's mean latency against the best static policy's
    (device, cloud or the DADS plan), and whether it is within 5 %; and the
    same comparison on the very same requests (:func:`paired_ratio`)."""
    out: dict[str, dict[str, object]] = {}
    for engine in dict.fromkeys(s.engine for s in result.summaries):
        cmp = adaptive_vs_static(result.summaries, engine)
        if cmp:
            best, ms, ratio = cmp
            paired = paired_ratio(result.records, engine, best.split("="), result.spec.interval_ms / 1e3)
            out[engine] = {"best_static": best, "best_static_mean_ms": round(ms, 2),
                           "adaptive_mean_ms": round(ratio * ms, 2),
                           "adaptive_vs_best_static_pct": round(100 * (ratio - 1), 2),
                           "within_5pct": ratio <= 1.05,
                           "paired_vs_best_static_pct": None if paired is None else round(100 * (paired - 1), 2)}
    return out


def overview_table(results: Sequence[ExperimentResult]) -> Table:
    """One row per spec and engine: adaptive vs the best static policy."""
    t = Table(title="adaptive vs the best static policy (mean latency)")
    for col in ("spec", "engine", "best static", "its mean ms", "adaptive ms", "adaptive vs best", "within 5%",
                "same requests"):
        t.add_column(col)
    for res in results:
        for engine, v in adaptive_verdict(res).items():
            paired = v["paired_vs_best_static_pct"]
            t.add_row(res.spec.name, engine, str(v["best_static"]), f"{v['best_static_mean_ms']:.1f}",
                      f"{v['adaptive_mean_ms']:.1f}", f"{v['adaptive_vs_best_static_pct']:+.1f}%",
                      "yes" if v["within_5pct"] else "[red]no[/]", "-" if paired is None else f"{paired:+.1f}%")
    return t


def run_experiments(
    specs: Sequence[str | Path | ExperimentSpec],
    *,
    engines: Sequence[str] = ("analytic", "live"),
    out_dir: str | Path = "experiment-results",
    cloud: str | None = None,
    repeats: int | None = None,
    console: Console | None = None,
) -> list[ExperimentResult]:
    """Run specs in the given engines; write ``OUT/<name>/{records.csv, summary.csv, *.png}``.

    Args:
        specs: spec files or parsed specs.
        engines: ``analytic`` and/or ``live``.
        out_dir: output directory (bundles are planned into ``OUT/bundles``).
        cloud: a running cloud tier serving the specs' bundles (default: start a local one for ``live``).
        repeats: override the specs' analytic repeats.
        console: where to print.
    """
    console = console or Console()
    out = Path(out_dir)
    parsed = [s if isinstance(s, ExperimentSpec) else load_spec(s) for s in specs]
    bad = [e for e in engines if e not in ("analytic", "live")]
    if bad:
        raise ValueError(f"unknown engines {bad} (analytic, live)")
    if "live" in engines:
        from splitgate.experiments.policies import ANALYTIC_ONLY

        for spec in parsed:
            only = [p for p in spec.policies if p in ANALYTIC_ONLY]
            if only:
                raise ValueError(f"spec '{spec.name}': policies {only} run in the analytic engine only "
                                 "(use --engine analytic)")
    results = []
    bundles: dict[str, PlanBundle] = {}
    with _progress(console) as prog:
        task = prog.add_task("plan bundles", total=len(parsed))
        for spec in parsed:
            bundles[spec.name] = prepare_bundle(spec, out / "bundles")
            prog.advance(task)
    for spec in parsed:
        results.append(ExperimentResult(spec, [], [], out / spec.name))
    if "analytic" in engines:
        from splitgate.experiments.analytic import run_analytic

        with _progress(console) as prog:
            for res in results:
                n = res.spec.analytic_repeats if repeats is None else repeats
                task = prog.add_task(f"analytic {res.spec.name}", total=n)
                t0 = time.perf_counter()
                recs = run_analytic(res.spec, bundles[res.spec.name], repeats=n,
                                    progress=lambda k, task=task: prog.advance(task, k))
                dt = time.perf_counter() - t0
                res.records += recs
                res.notes.append(f"analytic: {len(recs)} requests in {dt:.2f} s ({len(recs) / max(dt, 1e-9):.0f} req/s)")
    if "live" in engines:
        _run_live_all(results, bundles, cloud, console)
    for res in results:
        res.summaries = summarize(res.records)
        _write(res, console)
    if len(results) > 1:
        console.print(overview_table(results))
    return results


def _run_live_all(results: list[ExperimentResult], bundles: dict[str, PlanBundle], cloud: str | None,
                  console: Console) -> None:
    from splitgate.experiments.live import run_live

    tier = None
    if cloud is None:
        from splitgate.cloud import CloudConfig, start_local

        roots = sorted({str(b.root) for b in bundles.values()})
        with console.status("starting a local Ray Serve cloud tier"):
            tier = start_local(CloudConfig(bundles=roots, grpc_port=0))
        cloud = tier.address
    try:
        with _progress(console) as prog:
            for res in results:
                n, dur = res.spec.live_repeats, res.spec.trace.duration_s
                task = prog.add_task(f"live {res.spec.name}", total=n * dur)
                t0 = time.perf_counter()
                count = 0
                for rep in range(n):
                    recs = run_live(res.spec, bundles[res.spec.name], cloud, rep=rep,
                                    progress=lambda s, task=task, rep=rep: prog.update(task, completed=rep * dur + s),
                                    log=lambda m, res=res: res.notes.append(f"live: {m}"))
                    for r in recs:
                        r.rep = rep
                    res.records += recs
                    count += len(recs)
                prog.update(task, completed=n * dur)
                res.notes.append(f"live: {count} requests in {n} replay(s), {time.perf_counter() - t0:.1f} s wall")
    finally:
        if tier is not None:
            tier.stop()


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f}"),
                    TimeElapsedColumn(), console=console, transient=False)
