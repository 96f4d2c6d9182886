"""The ``splitgate`` command line.

Each command imports what it needs inside its body: ``splitgate --help`` stays
fast (no Ray, no torch) and the wire layer keeps free of import cycles.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from splitgate.errors import SplitgateError

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from splitgate._demo import run_demo

    return run_demo(model=args.model, requests=args.requests, workdir=args.workdir)


def _cmd_plan(args: argparse.Namespace) -> int:
    from rich.console import Console

    from planner import build_bundle
    from splitgate._console import bundle_table, progress_callback

    console = Console()
    with progress_callback(console) as progress:
        bundle = build_bundle(args.model, args.output, model_name=args.name, progress=progress)
    console.print(bundle_table(bundle))
    console.print(f"plan bundle written to [bold]{bundle.root}[/] (digest {bundle.plan_digest[:12]})")
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    from planner.zoo import export_zoo_model

    path = export_zoo_model(args.name, args.output, seed=args.seed)
    print(f"exported zoo model '{args.name}' to {path}")
    return 0


def _cmd_cloud_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from cloud import CloudConfig, start_local

    overrides = {
        "grpc_port": args.port,
        "num_replicas": args.replicas,
        "intra_op_threads": args.threads,
    }
    if args.config:
        config = CloudConfig.from_file(args.config, **overrides)
        if args.bundles:
            config.bundles = list(args.bundles)
    else:
        config = CloudConfig(
            bundles=list(args.bundles), **{k: v for k, v in overrides.items() if v is not None}
        )
    if not config.bundles:
        raise SplitgateError("no plan bundles given: pass BUNDLE directories or a config file with 'bundles'")
    cloud = start_local(config)
    print(f"cloud tier serving {len(config.bundles)} bundle(s) on {cloud.address} (Ctrl-C to stop)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        cloud.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitgate", description="Hybrid edge-cloud inference gateway with a split-execution planner."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a zoo model at device-only, cloud-only and a middle split")
    demo.add_argument("--model", default="mobilenet", help="zoo model to demo (default: mobilenet)")
    demo.add_argument("--requests", type=int, default=10, help="timed requests per partition")
    demo.add_argument("--workdir", default=None, help="keep models and bundles here (default: a temp dir)")
    demo.set_defaults(func=_cmd_demo)

    plan = sub.add_parser("plan", help="plan an ONNX model into a plan bundle")
    plan.add_argument("model", help="path to an .onnx file")
    plan.add_argument("-o", "--output", required=True, help="bundle directory to write")
    plan.add_argument("--name", default=None, help="model name (default: file stem)")
    plan.set_defaults(func=_cmd_plan)

    zoo = sub.add_parser("zoo", help="export a small seeded zoo model to ONNX (needs torch)")
    zoo.add_argument("name", help="zoo model name, e.g. mobilenet, resnet18, vggchain")
    zoo.add_argument("-o", "--output", required=True, help=".onnx file to write")
    zoo.add_argument("--seed", type=int, default=0)
    zoo.set_defaults(func=_cmd_zoo)

    cloud = sub.add_parser("cloud", help="the Ray Serve cloud tier")
    cloud_sub = cloud.add_subparsers(dest="cloud_command", required=True)
    serve = cloud_sub.add_parser("serve", help="start a local Ray Serve tier serving plan bundles")
    serve.add_argument("bundles", nargs="*", help="plan bundle directories")
    serve.add_argument("--config", default=None, help="TOML or YAML file with [cloud] settings")
    serve.add_argument("--port", type=int, default=None, help="gRPC port (default 9000)")
    serve.add_argument("--replicas", type=int, default=None, help="replicas (default 1)")
    serve.add_argument("--threads", type=int, default=None, help="onnxruntime threads per session")
    serve.set_defaults(func=_cmd_cloud_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SplitgateError as exc:
        print(f"splitgate: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"splitgate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
