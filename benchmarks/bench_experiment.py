"""Analytic experiment engine throughput (requests simulated per second of wall time), as JSON.

    .venv/bin/python benchmarks/bench_experiment.py [SPEC.yaml] [--repeats N]

Plans the spec's model (cached under /tmp), runs the analytic engine and prints
{"spec", "requests", "seconds", "requests_per_s"}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from splitgate.experiments import load_spec
from splitgate.experiments.analytic import run_analytic
from splitgate.experiments.runner import prepare_bundle

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("spec", nargs="?", default=str(ROOT / "experiments" / "specs" / "commute.yaml"))
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--workdir", default="/tmp/splitgate-bench-experiment")
    args = ap.parse_args()
    spec = load_spec(args.spec)
    bundle = prepare_bundle(spec, Path(args.workdir))
    run_analytic(spec, bundle, repeats=1)  # warm-up
    t0 = time.perf_counter()
    recs = run_analytic(spec, bundle, repeats=args.repeats)
    dt = time.perf_counter() - t0
    print(json.dumps({"spec": spec.name, "requests": len(recs), "seconds": round(dt, 3),
                      "requests_per_s": round(len(recs) / dt)}))


if __name__ == "__main__":
    main()
