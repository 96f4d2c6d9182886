"""Collect DADS reproduction runs (``splitgate experiment ... --engine analytic``) into one result file.

Per run directory (``OUT/<spec name>``, holding ``reproduction.json``) it
records the reproduction rows, what the plan held (partitions, the int8 twins
tried and why each was refused, the cascade's threshold, exit rate and device
time), and the top-1 agreement with the fp32 full model of every lossy
partition a row ran and of the cascade, measured on held-out images scaled
from bytes (seed 1; the plan calibrated on seed 0), one request at a time
through the real files (:class:`bench_joint.Runner`)::

    splitgate experiment experiments/specs/dads_resnet18_224.yaml --engine analytic --out OUT
    splitgate experiment experiments/specs/dads_resnet18_224_joint.yaml --engine analytic --out OUT2
    .venv/bin/python benchmarks/dads_reproduction.py OUT/dads_resnet18_224 OUT2/dads_resnet18_224_joint \
        [--heldout 128] -o benchmarks/results/dads_reproduction.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_joint import Runner, _lossy
from _common import emit_json  # noqa: E402 - benchmarks/ is on sys.path when run as a script


def _partitions_run(rows: list[dict[str, Any]]) -> list[str]:
    """Partition ids named in the rows' ``... 100%, ...`` summaries (not the cascade's exits)."""
    out: set[str] = set()
    for r in rows:
        for key in ("cloud_partition", "split_partition", "joint_partition"):
            for item in (r.get(key) or "").split(","):
                pid = item.strip().rsplit(" ", 1)[0]
                if pid and pid != "cascade":
                    out.add(pid)
    return sorted(out)


def plan_facts(bundle: Any) -> dict[str, Any]:
    """What the plan holds: partitions, int8 twins (tried, refused with the reason), the cascade."""
    prof = bundle.profile or {}
    q = prof.get("quantization") or {}
    measured = q.get("measured", {})
    spec = bundle.cascade
    return {
        "partitions": sorted(bundle.partitions),
        "device_ms": round(float(prof["partitions"]["device"]["device_ms"]), 1),
        "int8_twins_tried": sorted(measured),
        "int8_twins_refused": {k: v["dropped"] for k, v in measured.items() if v.get("dropped")},
        "calibration_samples": (q.get("calibration") or {}).get("samples"),
        "cascade": None if spec is None else {
            "source": spec.source, "threshold": round(spec.threshold, 5), "exit_rate": round(spec.exit_rate, 4),
            "agreement": round(spec.agreement, 4), "samples": spec.samples,
            "device_ms": None if spec.device_ms is None else round(spec.device_ms, 1),
            "full_device_ms": None if spec.full_device_ms is None else round(spec.full_device_ms, 1),
        },
    }


def heldout_agreement(bundle: Any, pids: list[str], n: int) -> dict[str, Any]:
    """Top-1 agreement with the fp32 full model on ``n`` held-out byte images, per lossy partition and the cascade."""
    from splitgate.experiments.runner import byte_image_calibration

    x = byte_image_calibration(bundle.partitions["device"].prefix_path, n, seed=1)["input"]
    run = Runner(bundle)
    ref = [run.reference(xi[None]) for xi in x]
    out: dict[str, Any] = {}
    for pid in pids:
        if _lossy(bundle.partitions[pid]):
            got = [run.top1(pid, xi[None]) for xi in x]
            out[pid] = round(float(np.mean(np.equal(got, ref))), 4)
    if bundle.cascade is not None:
        answers = [run.cascade(xi[None]) for xi in x]
        exits = [i for i, a in enumerate(answers) if a is not None]
        out["cascade_exit_rate"] = round(len(exits) / n, 4)
        out["cascade_agreement_among_exits"] = (round(float(np.mean([answers[i] == ref[i] for i in exits])), 4)
                                                if exits else None)
    return {"samples": n, "top1_agreement": out}


def collect(run_dir: Path, heldout: int) -> dict[str, Any]:
    """One run directory's rows, plan facts and held-out agreement."""
    from splitgate.planner import load_bundle

    rows = json.loads((run_dir / "reproduction.json").read_text())
    bundles = sorted((run_dir.parent / "bundles").glob("*.bundle"))
    if len(bundles) != 1:
        raise SystemExit(f"{run_dir.parent / 'bundles'}: expected one bundle, found {len(bundles)}")
    bundle = load_bundle(bundles[0])
    return {"spec": run_dir.name, "rows": rows, "plan": plan_facts(bundle),
            "heldout": heldout_agreement(bundle, _partitions_run(rows), heldout)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="OUT/<spec name> directories of analytic runs")
    ap.add_argument("--heldout", type=int, default=128, help="held-out byte images for agreement")
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)
    result = {"benchmark": "dads_reproduction", "engine": "analytic",
              "runs": [collect(d, args.heldout) for d in args.runs]}
    emit_json(result, args.output, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
