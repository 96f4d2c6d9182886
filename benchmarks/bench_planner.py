"""Planner benchmark: planning time of large graphs, per-node estimate vs measured error, bundle sizes.

Prints one JSON document (and writes it with ``-o``):

* ``planning``: per model, the median (after a warm-up) of the planning steps
  that run after profiling — coarsening (chains, dominator blocks), chain
  cuts, the min-cut candidate search over the condition space, and the
  decision table — with the graph sizes before and after coarsening, and one
  min-cut solved block by block (``min_cut_ms``) next to one flow over the
  whole chain-collapsed graph (``min_cut_whole_flow_ms``, the plain DADS
  construction), timed alternately. Per-node times come from one real
  profile (excluded).
* ``estimate_error``: per model, how far the summed per-node onnxruntime
  profile is from the measured prefix/suffix sessions (median and max |error| %).
* ``bundle_bytes``: bundle sizes with ``candidates="optimal"`` (default) and
  ``"chain"`` (every chain cut, the Foundation layout).

Usage: ``python benchmarks/bench_planner.py [--quick] [-o out.json]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from _common import emit_json  # noqa: E402 - benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_planning(path: Path, repeats: int = 5) -> dict:
    from splitgate.planner import Conditions, ModelGraph, chain_cuts, profile_nodes
    from splitgate.planner._cost import EnergyModel, estimate, linear_costs
    from splitgate.planner._decide import Grid, build_table, search_candidates
    from splitgate.planner._mincut import CutProblem, min_cut

    g = ModelGraph.load(path)
    dev = profile_nodes(g, threads=1, repeats=3)
    cloud = profile_nodes(g, threads=2, repeats=3)
    energy = EnergyModel()
    samples: dict[str, list[float]] = {"coarsen_ms": [], "chain_cuts_ms": [], "search_ms": [], "table_ms": [], "total_ms": []}
    found = {}
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        problem = CutProblem(g)
        t1 = time.perf_counter()
        chain_cuts(g)
        t2 = time.perf_counter()
        dev_u = {u: dev.node_ms.get(u, 0.0) for u in problem.units}
        cloud_u = {u: cloud.node_ms.get(u, 0.0) for u in problem.units}
        found = search_candidates(problem, dev_u, cloud_u, energy, max(1e-6, sum(dev_u.values())))
        t3 = time.perf_counter()
        # decision table over the found candidates, costed from the per-node sums
        entries = {}
        for s, (cut, _) in found.items():
            entries[f"p{len(entries)}"] = (
                sum(dev_u[u] for u in s), sum(v for u, v in cloud_u.items() if u not in s),
                sum(problem.nbytes[t] for t in cut.tensors), len(s) == len(problem.units),
            )
        entries["device"] = (sum(dev_u.values()), 0.0, 0, True)
        down = sum(problem.nbytes.get(t, 0) for t in g.output_names)

        def est(pid: str, c: Conditions):
            d, cl, up, local = entries[pid]
            return estimate(d, cl, up, down, c, energy, offload=not local)

        build_table(est, list(entries), Grid(), ref=lambda c: est("device", c))
        t4 = time.perf_counter()
        if i == 0:
            continue  # warm-up
        for key, v in (("coarsen_ms", t1 - t0), ("chain_cuts_ms", t2 - t1), ("search_ms", t3 - t2),
                       ("table_ms", t4 - t3), ("total_ms", t4 - t0)):
            samples[key].append(v * 1e3)
    # one min-cut, block by block (default) vs one flow over the whole chain-collapsed graph
    lc = linear_costs(Conditions(uplink_mbps=5.85), energy, estimate(sum(dev_u.values()), 0, 0, 0,
                                                                     Conditions(uplink_mbps=5.85), energy, offload=False))
    dc = {u: lc.device_per_ms * v for u, v in dev_u.items()}
    cc = {u: lc.cloud_per_ms * v for u, v in cloud_u.items()}
    tc = {t: lc.per_byte * problem.nbytes[t] for t in problem.tensors}
    cut_ms: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(3):
        for decompose in (True, False):
            t0 = time.perf_counter()
            min_cut(problem, dc, cc, tc, decompose=decompose)
            cut_ms[decompose].append((time.perf_counter() - t0) * 1e3)
    return {
        "model": path.name,
        **problem.stats(),
        "min_cut_ms": round(statistics.median(cut_ms[True]), 2),
        "min_cut_whole_flow_ms": round(statistics.median(cut_ms[False]), 2),
        "candidates_found": len(found),
        **{k: round(statistics.median(v), 2) for k, v in samples.items()},
        "total_ms_max": round(max(samples["total_ms"]), 2),
        "repeats": repeats,
    }


def bench_estimates(path: Path, work: Path, **options) -> dict:
    from splitgate.planner import build_bundle

    b = build_bundle(path, work / (path.stem + ".bundle"), **options)
    err = b.profile["estimate_error"]
    return {
        "model": path.name,
        "device_median_abs_pct": err["device"]["median_abs_pct"],
        "device_max_abs_pct": err["device"]["max_abs_pct"],
        "cloud_median_abs_pct": err["cloud"]["median_abs_pct"],
        "cloud_max_abs_pct": err["cloud"]["max_abs_pct"],
        "measured_partitions": len(err["device"]["partitions"]),
        "attributed_share": b.profile["device"]["attributed"],
        "planning_ms_in_build": b.profile["planning_ms"],
        "bundle_bytes": _dir_bytes(b.root),
        "partitions": list(b.partitions),
        "candidates": b.candidates,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer models and repeats")
    ap.add_argument("-o", "--output", default=None, help="also write the JSON here")
    args = ap.parse_args()

    import onnx

    from splitgate.planner import build_bundle
    from splitgate.planner.zoo import export_zoo_model

    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    out: dict = {"planning": [], "estimate_error": [], "bundle_bytes": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        big = ["inception_v2", "densenet121"] if args.quick else ["resnet50", "inception_v2", "densenet121"]
        for name in big:
            out["planning"].append(bench_planning(light / f"light_{name}.onnx", repeats=3 if args.quick else 5))
        zoo = ["mobilenet", "resnet18", "transformer", "lstm"]
        paths = {z: export_zoo_model(z, work / f"{z}.onnx") for z in zoo}
        reps = {"repeats": 5, "warmup": 2} if args.quick else {"repeats": 20, "warmup": 3}
        # the sequence models' dynamic `seq` axis needs a size (their export example's)
        shapes = {"transformer": ["tokens=1x12"], "lstm": ["input=1x8x16"]}
        for z in zoo:
            out["estimate_error"].append(bench_estimates(paths[z], work, input_shapes=shapes.get(z), **reps))
        out["estimate_error"].append(bench_estimates(light / "light_squeezenet.onnx", work, **reps))
        for z in ("mobilenet", "resnet18"):
            row = {"model": z}
            for mode in ("optimal", "chain"):
                b = build_bundle(paths[z], work / f"{z}.{mode}", candidates=mode, profile=False)
                row[f"{mode}_bytes"] = _dir_bytes(b.root)
                row[f"{mode}_partitions"] = len(b.partitions)
            row["model_bytes"] = paths[z].stat().st_size
            out["bundle_bytes"].append(row)
    emit_json(out, args.output, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
