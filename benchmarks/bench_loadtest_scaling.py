"""Max sustainable rps at a p99 target with 1 and 2 replicas, side by side in one run.

Runs the step-load locust shape (loadtests/stepload.py) against a fresh local
Ray Serve tier per replica count, same bundle, same traffic mix, and prints
machine-readable JSON: each run's steps, its max sustainable rps, and the
scaling ratio (2 replicas / 1 replica)::

    .venv/bin/python benchmarks/bench_loadtest_scaling.py --p99-target-ms 100 -o /tmp/lt-scaling

Note: locust, the Ray Serve proxy and the replicas share the machine's cores;
on a small machine the ratio measures that contention as much as the tier.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", nargs="*", default=[], help="plan bundles (default: plan zoo --model)")
    parser.add_argument("--model", default="mobilenet")
    parser.add_argument("--mix", default=None, help='e.g. "cut-10:3,cloud:1" (default: cloud + 3 cuts)')
    parser.add_argument("--replicas", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads per replica session (default 1)")
    parser.add_argument("--p99-target-ms", type=float, default=100.0)
    parser.add_argument("--step-users", type=int, default=1)
    parser.add_argument("--step-time", type=float, default=10.0)
    parser.add_argument("--step-max-users", type=int, default=32)
    parser.add_argument("--direct", action="store_true", help="users call replicas' direct-ingress endpoints")
    parser.add_argument("-o", "--out", default="loadtest-scaling")
    args = parser.parse_args(argv)

    from splitgate.loadtests._runner import LoadTestConfig, run_loadtest

    out = Path(args.out)
    bundles = list(args.bundles)
    runs = {}
    for n in args.replicas:
        cfg = LoadTestConfig(
            bundles=bundles, model=args.model, mix=args.mix, replicas=n, threads=args.threads,
            step_load=True, step_users=args.step_users, step_time_s=args.step_time,
            step_max_users=args.step_max_users, p99_target_ms=args.p99_target_ms,
            out_dir=str(out / f"replicas-{n}"), direct=args.direct,
        )
        result = run_loadtest(cfg)
        if not bundles:  # plan once, reuse the same bundle for every replica count
            bundles = [str(out / f"replicas-{n}" / "models" / f"{args.model}.bundle")]
        runs[n] = result.step
    base = runs[args.replicas[0]]["max_sustainable_rps"]
    report = {
        "benchmark": "loadtest_scaling",
        "p99_target_ms": args.p99_target_ms,
        "threads_per_replica": args.threads,
        "direct_ingress": args.direct,
        "bundles": bundles,
        "runs": {str(n): r for n, r in runs.items()},
        "max_sustainable_rps": {str(n): r["max_sustainable_rps"] for n, r in runs.items()},
        "scaling_ratio": {
            f"{n}/{args.replicas[0]}": (r["max_sustainable_rps"] / base if base else None) for n, r in runs.items()
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
