"""Adaptive vs the best static policy across plan bundles and traces (analytic engine), as JSON.

    .venv/bin/python benchmarks/bench_adaptive.py BUNDLE_DIR... [--specs commute,walk_4g,...] [--repeats 8]

A plan's measured profile moves the device/cloud trade-off (the same model
planned twice on a shared machine differs by 10-40% in device time), so one
experiment run says little about how close adaptive stays to the best static
policy. This replays each bundled trace spec with each given bundle (e.g. the
``OUT/bundles/*.bundle`` of several ``splitgate experiment`` runs) and reports,
per (bundle, spec), adaptive's mean latency relative to the best of device-only,
cloud-only and the DADS plan (``splitgate.experiments._records.adaptive_vs_static``), plus
the worst and mean over all. Without bundle arguments it plans the specs' model
once (cached under ``--workdir``). Cloud-only is the best guarded cloud encoding
for the spec's nominal link (:func:`splitgate.experiments.policies.cloud_only_choice`);
each row names it (``cloud_only``).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from splitgate.experiments import load_spec
from splitgate.experiments._records import adaptive_vs_static, summarize
from splitgate.experiments.analytic import run_analytic
from splitgate.experiments.policies import cloud_only_choice
from splitgate.experiments.runner import prepare_bundle
from splitgate.planner import PlanBundle
from _common import emit_json  # noqa: E402 - benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
TRACE_SPECS = "commute,walk_4g,riiser_tram,ghent_car"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="*", help="plan bundle directories (default: plan the specs' model)")
    ap.add_argument("--specs", default=TRACE_SPECS, help="comma list of experiments/specs names")
    ap.add_argument("--repeats", type=int, default=8, help="analytic replays per (bundle, spec)")
    ap.add_argument("--workdir", default="/tmp/splitgate-bench-adaptive")
    ap.add_argument("--no-network-hints", action="store_true",
                    help="do not tell the adaptive Gateway of radio changes (spec network_hints: false)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    specs = [load_spec(ROOT / "experiments" / "specs" / f"{name}.yaml") for name in args.specs.split(",")]
    bundles = [PlanBundle.load(b) for b in args.bundles] or [prepare_bundle(specs[0], Path(args.workdir))]
    rows = []
    for bundle in bundles:
        device_ms = float(bundle.profile["partitions"]["device"]["device_ms"])  # type: ignore[index]
        for spec in specs:
            spec.model = bundle.model_name
            spec.network_hints = spec.network_hints and not args.no_network_hints
            best, best_ms, ratio = adaptive_vs_static(summarize(run_analytic(spec, bundle, repeats=args.repeats)),
                                                      "analytic")
            rows.append({"bundle": str(bundle.root), "device_ms": round(device_ms, 1), "spec": spec.name,
                         "best_static": best, "best_static_mean_ms": round(best_ms, 2),
                         "cloud_only": cloud_only_choice(bundle, spec.nominal),
                         "adaptive_vs_best_static_pct": round(100 * (ratio - 1), 2)})
    pcts = [r["adaptive_vs_best_static_pct"] for r in rows]
    doc = {"benchmark": "adaptive_vs_best_static", "repeats": args.repeats,
           "cloud_only_baseline": "best guarded cloud encoding for the spec's nominal link",
           "network_hints": not args.no_network_hints, "rows": rows,
           "worst_pct": max(pcts), "mean_pct": round(statistics.fmean(pcts), 2),
           "within_5pct": all(p <= 5.0 for p in pcts)}
    emit_json(doc, args.out, indent=1)


if __name__ == "__main__":
    main()
