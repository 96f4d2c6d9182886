"""Command-line options of ``splitgate loadtest`` / ``python -m splitgate.loadtests``.

Only argparse here: ``splitgate --help`` builds this parser without importing
locust, gevent, Ray or torch. The run itself is :func:`run_from_args`.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "config_from_args", "run_from_args"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the load-test options to ``parser``."""
    where = parser.add_argument_group("target")
    where.add_argument("--target", default=None, metavar="HOST:PORT",
                       help="a running tier's gRPC ingress (default: start a local Ray Serve tier)")
    where.add_argument("--bundles", nargs="*", default=[], metavar="BUNDLE",
                       help="plan bundle dirs (default: export and plan --model)")
    where.add_argument("--model", default="mobilenet", help="zoo model when no bundle is given (default: mobilenet)")
    where.add_argument("--replicas", type=int, default=1, help="replicas of the local tier (default 1)")
    where.add_argument("--direct", action="store_true",
                       help="spread users over the replicas' direct-ingress endpoints (default: via the proxy)")
    where.add_argument("--threads", type=int, default=0, help="onnxruntime threads per session in the local tier")
    load = parser.add_argument_group("load")
    load.add_argument("--mix", default=None,
                      help='partition weights, e.g. "cut-3:3,cloud:1" or "mobilenet/cut-3:2" '
                           "(default: cloud + first/middle/last cut, equal)")
    load.add_argument("-u", "--users", type=int, default=8, help="concurrent users (default 8)")
    load.add_argument("-r", "--spawn-rate", type=float, default=4.0, help="users started per second (default 4)")
    load.add_argument("-d", "--duration", type=float, default=60.0, help="seconds of load (default 60)")
    load.add_argument("--wait-ms", type=float, default=0.0, help="think time between a user's requests (default 0)")
    load.add_argument("--batch", type=int, default=1, help="samples per request (default 1)")
    load.add_argument("--samples", type=int, default=4, help="distinct recorded requests per partition (default 4)")
    load.add_argument("--seed", type=int, default=0)
    step = parser.add_argument_group("step load (find the max sustainable rps)")
    step.add_argument("--step-load", action="store_true", help="ramp users in steps until p99 crosses the target")
    step.add_argument("--p99-target-ms", type=float, default=100.0, help="p99 target (default 100 ms)")
    step.add_argument("--step-users", type=int, default=1, help="users added per step (default 1)")
    step.add_argument("--step-time", type=float, default=10.0, help="seconds per step (default 10)")
    step.add_argument("--step-max-users", type=int, default=32, help="never more users than this (default 32)")
    parser.add_argument("-o", "--out", default="loadtest-results", help="report directory (default loadtest-results)")
    parser.add_argument("--json", action="store_true", help="also print the result as JSON on stdout")


def config_from_args(args: argparse.Namespace):  # -> LoadTestConfig
    """Build a :class:`~splitgate.loadtests.LoadTestConfig` from parsed arguments."""
    from splitgate.loadtests._runner import LoadTestConfig

    return LoadTestConfig(
        target=args.target, bundles=list(args.bundles), model=args.model, mix=args.mix,
        users=args.users, spawn_rate=args.spawn_rate, duration_s=args.duration, wait_ms=args.wait_ms,
        batch=args.batch, samples=args.samples, seed=args.seed, replicas=args.replicas, threads=args.threads,
        step_load=args.step_load, step_users=args.step_users, step_time_s=args.step_time,
        step_max_users=args.step_max_users, p99_target_ms=args.p99_target_ms, out_dir=args.out,
        direct=args.direct,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the load test; exit code 0 when no request failed, 1 otherwise."""
    import json

    from splitgate.loadtests._runner import run_loadtest

    result = run_loadtest(config_from_args(args))
    if args.json:
        print(json.dumps(result.to_dict()))
    return 1 if result.total.failures else 0
