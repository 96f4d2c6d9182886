"""The ``splitgate`` command line.

Each command imports what it needs inside its body: ``splitgate --help`` stays
fast (no Ray, no torch) and the wire layer keeps free of import cycles.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from splitgate.errors import InvalidArgument, SplitgateError

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from splitgate._demo import run_demo

    return run_demo(model=args.model, requests=args.requests, workdir=args.workdir, device_factor=args.device_factor)


def _cmd_plan(args: argparse.Namespace) -> int:
    from rich.console import Console

    from splitgate.planner import Constraints, EnergyModel, PlanOptions, build_bundle
    from splitgate.planner._report import explain_table, plan_table
    from splitgate._console import progress_callback

    options = PlanOptions(
        candidates=args.candidates, profile=not args.no_profile, device_threads=args.device_threads,
        cloud_threads=args.cloud_threads, device_slowdown=args.device_slowdown, device_profile=args.device_profile,
        repeats=args.repeats, energy=EnergyModel(radio=args.radio),
        constraints=Constraints(slo_ms=args.slo_ms, device_memory_mb=args.device_memory_mb),
        encodings=tuple(e.strip() for e in args.encodings.split(",") if e.strip()),
        calibration=args.calibration, min_top1_agreement=args.min_top1, min_cosine=args.min_cosine,
        input_shapes=args.input_shape or None, samples=args.sample, quantize=args.quantize,
        cascade=args.cascade,
    )
    console = Console()
    with progress_callback(console) as progress:
        bundle = build_bundle(args.model, args.output, model_name=args.name, progress=progress, options=options)
    for note in (bundle.profile or {}).get("notes", []):
        console.print(f"note: {note}")
    shapes = [",".join(f"{k}={'x'.join(map(str, v))}" for k, v in b.items()) for b in bundle.shapes]
    console.print(f"planned at {shapes[0]}" + (f" (shape buckets: {'; '.join(shapes)})" if len(shapes) > 1 else ""))
    console.print(plan_table(bundle))
    if bundle.cascade is not None:
        c = bundle.cascade
        timing = f", {c.device_ms:.3f} ms on the device vs {c.full_device_ms:.3f} ms" if c.device_ms is not None else ""
        console.print(f"cascade {c.source}: answers at confidence >= {c.threshold:.4f}: exit rate "
                      f"{c.exit_rate:.1%}, top-1 agreement {c.agreement:.1%} on {c.samples} calibration "
                      f"samples ({c.calibration_source}){timing}")
    if args.explain and bundle.has_profile:
        console.print(explain_table(bundle, rtt_ms=args.rtt_ms, battery_pct=args.battery))
    console.print(f"plan bundle written to [bold]{bundle.root}[/] (digest {bundle.plan_digest[:12]})")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from rich.console import Console

    from splitgate.planner._device import measure_device, profile_table
    from splitgate.planner._shapes import parse_input_shapes
    from splitgate._console import progress_callback

    console = Console()
    with progress_callback(console) as progress:
        dp = measure_device(args.source, input_shapes=parse_input_shapes(args.input_shape) or None, samples=args.sample,
                            threads=args.threads, warmup=args.warmup, repeats=args.repeats, progress=progress)
    dp.save(args.output)
    for note in dp.notes:
        console.print(f"note: {note}")
    console.print(profile_table(dp))
    console.print(f"device profile written to [bold]{args.output}[/]")
    return 0


def _cmd_refit(args: argparse.Namespace) -> int:
    from rich.console import Console

    from splitgate.planner import load_bundle, refit_bundle
    from splitgate.planner._refit import refit_table

    before = load_bundle(args.bundle)
    after = refit_bundle(args.bundle, args.device_profile)
    console = Console()
    console.print(refit_table(before, after))
    console.print(f"refitted [bold]{after.root}[/] to {after.profile['device']['source'] if after.profile else '?'} "
                  f"(digest {after.plan_digest[:12]} unchanged)")
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    from splitgate.errors import InvalidArgument
    from splitgate.planner.zoo import IMAGE_MODELS, export_early_exit, export_zoo_model

    for flag, value in (("--early-exit", args.early_exit), ("--calibration-out", args.calibration_out)):
        if value and args.name not in IMAGE_MODELS:
            raise InvalidArgument(f"{flag} is for the zoo's image classifiers ({', '.join(IMAGE_MODELS)}), "
                                  f"not '{args.name}'")
    if args.calibration_samples < 1:
        raise InvalidArgument(f"--calibration-samples must be >= 1, got {args.calibration_samples}")
    path = export_zoo_model(args.name, args.output, seed=args.seed, trained=args.trained)
    print(f"exported zoo model '{args.name}' to {path}")
    if args.calibration_out:
        import numpy as np

        from splitgate.planner.zoo import calibration_inputs

        np.savez(args.calibration_out, input=calibration_inputs(args.calibration_samples)["input"])
        print(f"{args.calibration_samples} held-out calibration images: {args.calibration_out} "
              f"(plan with --calibration {args.calibration_out})")
    if args.early_exit:
        small = export_early_exit(path, args.early_exit)
        print(f"early-exit small model (its first half, a linear head fitted to its logits): {small}; "
              f"plan with `splitgate plan {path} --cascade {small}`")
    return 0


def _cmd_cloud_serve(args: argparse.Namespace) -> int:
    from splitgate._signals import wait_for_stop

    from splitgate.cloud import CloudConfig, start_local

    overrides = {
        "grpc_port": args.port,
        "num_replicas": args.replicas,
        "intra_op_threads": args.threads,
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": None if args.batch_wait_ms is None else args.batch_wait_ms / 1e3,
        "max_message_bytes": args.max_message_bytes,
        "direct_ingress": False if args.no_direct_ingress else None,
        "ray_address": args.ray_address,
        "bundle_cache": args.bundle_cache,
        "providers": [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None,
        "gpus_per_replica": args.gpus_per_replica,
        "max_replicas_per_node": args.max_replicas_per_node,
        "max_queue": args.max_queue,
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
    from splitgate.cloud.config import execution_providers

    execution_providers(config.providers, available=[])  # an unknown name fails before Ray starts
    try:
        config.admission_policy()  # (as do admission settings out of range)
    except ValueError as exc:
        raise InvalidArgument(f"cloud admission settings: {exc}") from None
    _apply_trust(config, args)
    tls, tokens = _server_security(args)
    if tls is not None:  # TLS front on the public port; Serve's plaintext proxy on a free one
        config.tls, config.tls_port, config.grpc_port = tls, config.grpc_port, 0
    config.auth_tokens = [*config.auth_tokens, *tokens]
    cloud = start_local(config)
    print(f"cloud tier serving {len(config.bundles)} bundle(s) on {cloud.address} (Ctrl-C to stop)", flush=True)
    try:
        wait_for_stop()
    finally:
        cloud.stop()
    return 0


def _cmd_loadtest(args: argparse.Namespace) -> int:
    from splitgate.loadtests._options import run_from_args

    try:
        return run_from_args(args)
    except TimeoutError as exc:
        raise SplitgateError(str(exc)) from None


def _add_security_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security (TLS or --insecure is required)")
    g.add_argument("--tls-cert", default=None, help="server certificate chain (PEM); with --tls-key serves TLS")
    g.add_argument("--tls-key", default=None, help="server private key (PEM)")
    g.add_argument("--tls-ca", default=None, help="CA of client certificates (with --mtls)")
    g.add_argument("--mtls", action="store_true", help="mutual TLS: refuse clients without a certificate from --tls-ca")
    g.add_argument("--token", action="append", default=[], help="accepted bearer token (repeatable); off = no token auth")
    g.add_argument("--token-file", default=None, help="file with accepted bearer tokens, one per line")
    g.add_argument("--insecure", action="store_true", help="serve plaintext gRPC (explicitly, never by default)")


def _server_security(args: argparse.Namespace) -> tuple[dict | None, list[str]]:
    """(TLS mapping or None, accepted tokens) from the flags; refuses implicit plaintext."""
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise SplitgateError("TLS needs both --tls-cert and --tls-key")
        tls = {"cert": args.tls_cert, "key": args.tls_key, "ca": args.tls_ca, "require_client_cert": args.mtls}
    elif not args.insecure:
        raise SplitgateError(
            "refusing to serve without TLS: pass --tls-cert/--tls-key (dev certs: `splitgate certs -o certs`), "
            "or --insecure for plaintext"
        )
    tokens = list(args.token)
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as fh:
            tokens += [line.strip() for line in fh if line.strip()]
    return tls, tokens


def _cmd_certs(args: argparse.Namespace) -> int:
    from splitgate.security import generate_dev_certs

    written = generate_dev_certs(args.output, hosts=args.host or ("localhost", "127.0.0.1", "::1"), days=args.days)
    for path in written.values():
        print(path)
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from splitgate.security import TrustedKeys, generate_signing_key

    private, public = generate_signing_key(args.output)
    kid = TrustedKeys.from_paths([public]).ids[0]
    print(f"signing key {private} (secret, mode 0600): splitgate sign BUNDLE --key {private}")
    print(f"public key  {public} (key id {kid}): give edges and the cloud tier --trust {public}")
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    import json

    from splitgate.security import sign_bundle

    path = sign_bundle(args.bundle, args.key)
    doc = json.loads(path.read_text(encoding="utf-8"))
    print(f"signed '{doc['model_name']}' (plan {doc['plan_digest'][:12]}) with key {doc['key_id']}: {path}")
    return 0


def _add_trust_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("signed bundles")
    g.add_argument("--trust", action="append", default=[], metavar="PUBKEY",
                   help="accept bundles signed by this public key (signing.pub; repeatable: a key set); "
                        "unsigned or wrongly signed bundles are refused")
    g.add_argument("--allow-unsigned", action="store_true",
                   help="with --trust, still load unsigned bundles (development only)")


def _apply_trust(config: object, args: argparse.Namespace) -> None:
    """Add ``--trust`` keys and ``--allow-unsigned`` to a Gateway/Cloud config; say loudly when unsigned is allowed."""
    trust = config.trust  # type: ignore[attr-defined]
    config.trust = [*([trust] if isinstance(trust, str) else trust), *args.trust]  # type: ignore[attr-defined]
    config.allow_unsigned = bool(args.allow_unsigned or config.allow_unsigned)  # type: ignore[attr-defined]
    if config.allow_unsigned:  # type: ignore[attr-defined]
        print("splitgate: WARNING: --allow-unsigned: UNSIGNED BUNDLES WILL BE SERVED, with no proof of who made "
              "them; development only, never in production", file=sys.stderr, flush=True)


def _cmd_publish(args: argparse.Namespace) -> int:
    from splitgate.edge._updates import INDEX_NAME, publish

    entries = publish(args.bundles, args.to, version=args.version, key=args.key, expires_days=args.expires_days)
    for entry in entries:
        print(f"published '{entry.model}' version {entry.version} (plan {entry.plan_digest[:12]}, "
              f"{entry.size} bytes): {entry.archive}")
    signed = f"signed, expires in {args.expires_days:g} days" if args.key else "UNSIGNED (edges with --trust refuse it)"
    print(f"index sequence {entries[0].sequence if entries else '?'}, {signed}")
    print(f"update index: {args.to}/{INDEX_NAME}; serve it with e.g. `python -m http.server -d {args.to}` and "
          f"run edges with --update-source URL_OR_DIR")
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from splitgate.experiments.runner import run_experiments

    engines = ["analytic", "live"] if args.engine == "both" else [args.engine]
    try:
        run_experiments(args.specs, engines=engines, out_dir=args.out, cloud=args.cloud, repeats=args.repeats)
    except (ValueError, KeyError) as exc:
        raise SplitgateError(f"experiment spec: {exc}") from None
    return 0


def _cmd_edge_serve(args: argparse.Namespace) -> int:
    from splitgate._signals import wait_for_stop

    from splitgate.edge import Gateway, GatewayConfig
    from splitgate.edge._serve import serve_edge

    config = GatewayConfig.from_file(args.config) if args.config else GatewayConfig()
    _apply_trust(config, args)
    if args.cloud:
        config.cloud = args.cloud
    if args.deadline_ms:
        config.deadline_ms = args.deadline_ms
    if not args.bundles:
        raise SplitgateError("no plan bundles given: pass BUNDLE directories")
    from splitgate.security import TlsConfig, TokenCheck

    tls, tokens = _server_security(args)
    if args.cloud_ca or args.cloud_cert:
        config.cloud_tls = {"ca": args.cloud_ca, "cert": args.cloud_cert, "key": args.cloud_key}
    config.cloud_token = args.cloud_token or config.cloud_token
    config.cloud_insecure = args.cloud_insecure or config.cloud_insecure
    if args.update_source:
        config.update_source = args.update_source
    if args.update_interval is not None:
        config.update_interval_s = args.update_interval
    if args.update_dir:
        config.update_dir = args.update_dir
    if config.update_source:  # each update and each refusal is one line on the console
        import logging

        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("splitgate: %(message)s"))
        logging.getLogger("splitgate.edge.updates").addHandler(handler)
        logging.getLogger("splitgate.edge.updates").setLevel(logging.INFO)
    gateway = Gateway(args.bundles, config=config)
    server, port, _ = serve_edge(
        gateway, port=args.port, metrics_port=args.metrics_port, tls=TlsConfig.from_dict(tls),
        auth=TokenCheck(tokens) if tokens else None, insecure=args.insecure,
    )
    where = f"cloud {config.cloud}" if config.cloud else "device only"
    metrics = f", Prometheus metrics on 127.0.0.1:{args.metrics_port}/metrics" if args.metrics_port else ""
    print(f"edge gateway serving {gateway.models} on 127.0.0.1:{port} ({where}){metrics}; Ctrl-C to stop", flush=True)
    if config.update_source:
        print(f"checking {config.update_source} for updates every {config.update_interval_s:g} s", flush=True)
    try:
        wait_for_stop()
    finally:
        server.stop(grace=2).wait()
        gateway.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitgate", description="Hybrid edge-cloud inference gateway with a split-execution planner."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="a Pi-class device on a link stepping WiFi -> 4G -> 3G -> outage -> WiFi: "
        "the policy's pick vs device-only and cloud-only, on a local Ray Serve tier",
    )
    demo.add_argument("--model", default="resnet18_224", help="zoo model to demo (default: resnet18_224)")
    demo.add_argument("--requests", type=int, default=3, help="requests per link phase, each run in all three modes")
    demo.add_argument("--device-factor", type=float, default=30.0,
                      help="the emulated device is this many times slower than this machine (default 30)")
    demo.add_argument("--workdir", default=None, help="keep models and bundles here (default: a temp dir)")
    demo.set_defaults(func=_cmd_demo)

    plan = sub.add_parser("plan", help="plan an ONNX model into a plan bundle")
    plan.add_argument("model", help="path to an .onnx file")
    plan.add_argument("-o", "--output", required=True, help="bundle directory to write")
    plan.add_argument("--name", default=None, help="model name (default: file stem)")
    plan.add_argument("--candidates", choices=["optimal", "chain"], default="optimal",
                      help="optimal: min-cut partitions that win somewhere (+3 reference chain cuts); chain: every chain cut")
    plan.add_argument("--no-profile", action="store_true", help="skip measurement: no profile.json / decision_table.json")
    plan.add_argument("--device-threads", type=int, default=1, help="onnxruntime threads of device-side sessions")
    plan.add_argument("--cloud-threads", type=int, default=2, help="onnxruntime threads of cloud-side sessions")
    plan.add_argument("--device-slowdown", type=float, default=1.0, help="device is this many times slower than here")
    plan.add_argument("--device-profile", default=None, help="device.json written by `splitgate profile` on the real device")
    plan.add_argument("--repeats", type=int, default=10, help="timed runs per measured session")
    plan.add_argument("--radio", default="auto", help="device radio for energy: wifi, lte, 3g, auto")
    plan.add_argument("--slo-ms", type=float, default=None, help="latency SLO")
    plan.add_argument("--device-memory-mb", type=float, default=None, help="device memory for the prefix")
    plan.add_argument("--encodings", default="raw,fp16,int8,int8c,zstd,uint8",
                      help="cut-tensor wire encodings to consider (comma-separated)")
    plan.add_argument("--calibration", default=None, help=".npz of calibration inputs (samples on axis 0)")
    plan.add_argument("--min-top1", type=float, default=0.99, help="accuracy guard: top-1 agreement for classifiers")
    plan.add_argument("--min-cosine", type=float, default=0.999, help="accuracy guard: cosine for other outputs")
    plan.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0xD1x...",
                      help="a real input shape to plan at (repeatable; several for one input = shape buckets)")
    plan.add_argument("--sample", default=None, metavar="FILE.npz",
                      help="real inputs, one array per input, samples on axis 0 (also the calibration set)")
    plan.add_argument("--quantize", action="store_true",
                      help="also plan int8 device prefixes (cut-K~int8, device~int8), each behind the accuracy guard")
    plan.add_argument("--cascade", default=None, metavar="SMALL.onnx|int8",
                      help="a confident-on-device cascade: a small classifier with the model's inputs and outputs "
                           "(or int8: the planner's int8 full model); its confidence threshold is calibrated on "
                           "the calibration inputs to keep top-1 agreement at the --min-top1 guard")
    plan.add_argument("--explain", action="store_true", help="show why each partition wins where it does")
    plan.add_argument("--rtt-ms", type=float, default=20.0, help="RTT of the --explain view")
    plan.add_argument("--battery", type=float, default=100.0, help="battery %% of the --explain view")
    plan.set_defaults(func=_cmd_plan)

    prof = sub.add_parser("profile", help="measure a model or plan bundle on this device (writes a device profile)")
    prof.add_argument("source", metavar="MODEL.onnx|BUNDLE", help="an ONNX file or a plan bundle directory")
    prof.add_argument("-o", "--output", required=True, help="device profile JSON to write")
    prof.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0xD1x...",
                      help="input shape to measure at (repeatable; several per input = buckets; default for a bundle: its buckets)")
    prof.add_argument("--sample", default=None, metavar="FILE.npz", help="real inputs, samples on axis 0")
    prof.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (as the Gateway runs; default 1)")
    prof.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    prof.add_argument("--repeats", type=int, default=10, help="timed runs per session")
    prof.set_defaults(func=_cmd_profile)

    refit = sub.add_parser("refit", help="refit a bundle's decision tables to a device profile (same plan digest)")
    refit.add_argument("bundle", help="plan bundle directory (rewritten in place)")
    refit.add_argument("--device-profile", required=True, help="device profile JSON from `splitgate profile`")
    refit.set_defaults(func=_cmd_refit)

    zoo = sub.add_parser("zoo", help="export a small seeded zoo model to ONNX (needs torch)")
    zoo.add_argument("name", help="zoo model name, e.g. mobilenet, resnet18, vggchain")
    zoo.add_argument("-o", "--output", required=True, help=".onnx file to write")
    zoo.add_argument("--seed", type=int, default=0)
    zoo.add_argument("--trained", action="store_true", help="train briefly on a synthetic task first (cached)")
    zoo.add_argument("--early-exit", metavar="SMALL.onnx", default=None,
                     help="also write a small early-exit model of an image classifier, for `plan --cascade`")
    zoo.add_argument("--calibration-out", metavar="CAL.npz", default=None,
                     help="also write held-out images of the image models' task, for `plan --calibration`")
    zoo.add_argument("--calibration-samples", type=int, default=128, help="images in --calibration-out (default 128)")
    zoo.set_defaults(func=_cmd_zoo)

    edge = sub.add_parser("edge", help="the device-side gateway")
    edge_sub = edge.add_subparsers(dest="edge_command", required=True)
    eserve = edge_sub.add_parser("serve", help="serve the Gateway as a local OIP gRPC server")
    eserve.add_argument("bundles", nargs="*", help="plan bundle directories")
    eserve.add_argument("--cloud", default=None, help="host:port of the cloud tier (default: device only)")
    eserve.add_argument("--port", type=int, default=8001, help="gRPC port on 127.0.0.1 (default 8001)")
    eserve.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (default: off)")
    eserve.add_argument("--deadline-ms", type=float, default=None, help="per-request deadline")
    eserve.add_argument("--config", default=None, help="TOML or YAML file with [edge] settings")
    _add_security_flags(eserve)
    eserve.add_argument("--cloud-ca", default=None, help="CA that verifies the cloud tier (TLS to the cloud)")
    eserve.add_argument("--cloud-cert", default=None, help="client certificate for mutual TLS to the cloud")
    eserve.add_argument("--cloud-key", default=None, help="client key for mutual TLS to the cloud")
    eserve.add_argument("--cloud-token", default=None, help="bearer token sent to the cloud tier")
    eserve.add_argument("--cloud-insecure", action="store_true", help="allow plaintext to a non-loopback cloud")
    _add_trust_flags(eserve)
    g = eserve.add_argument_group("over-the-air updates (docs/updates.md)")
    g.add_argument("--update-source", default=None, metavar="URL_OR_DIR",
                   help="poll this directory or http(s):// URL (an index.json from `splitgate publish`) for new versions")
    g.add_argument("--update-interval", type=float, default=None, metavar="S",
                   help="seconds between update checks (default 300; 0 = never poll)")
    g.add_argument("--update-dir", default=None, help="download and staging directory (default ~/.cache/splitgate/updates)")
    eserve.set_defaults(func=_cmd_edge_serve)

    pub = sub.add_parser("publish", help="publish bundle versions for over-the-air updates (archives + index.json)")
    pub.add_argument("bundles", nargs="+", metavar="BUNDLE", help="plan bundle directories (sign them first)")
    pub.add_argument("--to", required=True, metavar="DIR", help="update directory to write (serve it statically)")
    pub.add_argument("--version", default=None, metavar="LABEL", help="version label (default: plan digest, 12 hex)")
    pub.add_argument("--key", default=None, metavar="SIGNING_KEY",
                     help="sign index.json with this ed25519 private key (signing.key from `splitgate keys`): edges "
                     "with --trust accept only a signed, unexpired index whose sequence never goes back")
    pub.add_argument("--expires-days", type=float, default=30.0, metavar="DAYS",
                     help="a signed index expires after DAYS (default 30); publish or re-sign before then, "
                     "edges refuse an expired index")
    pub.set_defaults(func=_cmd_publish)

    certs = sub.add_parser("certs", help="write a dev CA, server and client certificate (TLS / mutual TLS)")
    certs.add_argument("-o", "--output", required=True, help="directory to write the PEM files to")
    certs.add_argument("--host", action="append", default=[], help="server name/IP (repeatable; default localhost, 127.0.0.1, ::1)")
    certs.add_argument("--days", type=int, default=30, help="validity in days")
    certs.set_defaults(func=_cmd_certs)

    keys = sub.add_parser("keys", help="make an ed25519 key pair for signing plan bundles")
    keys.add_argument("-o", "--output", required=True, help="directory for signing.key (0600) and signing.pub")
    keys.set_defaults(func=_cmd_keys)

    sign = sub.add_parser("sign", help="sign a plan bundle (detached BUNDLE/signature.json)")
    sign.add_argument("bundle", help="plan bundle directory")
    sign.add_argument("--key", required=True, help="private key (signing.key from `splitgate keys`)")
    sign.set_defaults(func=_cmd_sign)

    cloud = sub.add_parser("cloud", help="the Ray Serve cloud tier")
    cloud_sub = cloud.add_subparsers(dest="cloud_command", required=True)
    serve = cloud_sub.add_parser("serve", help="start a local Ray Serve tier serving plan bundles")
    serve.add_argument("bundles", nargs="*", help="plan bundles: directories, .tar.gz files, http(s):// URLs of "
                       ".tar.gz archives, or fsspec URLs (s3://...); each replica fetches URIs on its own node")
    serve.add_argument("--config", default=None, help="TOML or YAML file with [cloud] settings")
    serve.add_argument("--port", type=int, default=None, help="gRPC port (default 9000)")
    serve.add_argument("--replicas", type=int, default=None, help="replicas (default 1)")
    serve.add_argument("--threads", type=int, default=None, help="onnxruntime threads per session")
    serve.add_argument("--max-batch-size", type=int, default=None, help="rows per batched suffix run (1 = off; default 8)")
    serve.add_argument("--batch-wait-ms", type=float, default=None, help="batch wait after the first request (default 2)")
    serve.add_argument("--max-message-bytes", type=int, default=None, help="largest request (default 64 MiB)")
    serve.add_argument("--no-direct-ingress", action="store_true", help="proxy only: replicas get no gRPC port of their own")
    serve.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    serve.add_argument("--bundle-cache", default=None, help="where each node keeps fetched bundles "
                       "(default: $SPLITGATE_BUNDLE_CACHE or ~/.cache/splitgate/bundles)")
    serve.add_argument("--providers", default=None, help="onnxruntime execution providers, comma-separated "
                       "(e.g. cuda,cpu; default auto: CUDA when present, else CPU)")
    serve.add_argument("--gpus-per-replica", type=float, default=None, help="GPUs Ray reserves per replica (default 0)")
    serve.add_argument("--max-replicas-per-node", type=int, default=None,
                       help="at most this many replicas per Ray node (1 = spread over nodes)")
    serve.add_argument("--max-queue", type=int, default=None, help="requests that may wait per replica; "
                       "more are refused RESOURCE_EXHAUSTED before any compute (default 32; 0 = unbounded)")
    _add_security_flags(serve)
    _add_trust_flags(serve)
    serve.set_defaults(func=_cmd_cloud_serve)

    from splitgate.loadtests._options import add_arguments as add_loadtest_arguments  # argparse only: cheap

    exp = sub.add_parser("experiment", help="network-condition experiment(s): analytic and live engines, CSV, PNG")
    exp.add_argument("specs", nargs="+", help="experiment spec YAML file(s), e.g. experiments/specs/*.yaml")
    exp.add_argument("--engine", choices=["analytic", "live", "both"], default="both", help="which engine(s) to run")
    exp.add_argument("--out", default="experiment-results", help="output directory (default: experiment-results)")
    exp.add_argument("--cloud", default=None, help="host:port of a running cloud tier serving the specs' bundles")
    exp.add_argument("--repeats", type=int, default=None, help="analytic trace replays (default: the spec's)")
    exp.set_defaults(func=_cmd_experiment)

    loadtest = sub.add_parser("loadtest", help="locust load test of the cloud tier (reports: CSV, HTML, PNG)")
    add_loadtest_arguments(loadtest)
    loadtest.set_defaults(func=_cmd_loadtest)
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
    except ModuleNotFoundError as exc:
        extra = missing_extra(exc.name)
        if extra is None:
            raise
        print(f"splitgate: error: this command needs the '{extra}' extra (no module named '{exc.name}'): "
              f"pip install 'splitgate[{extra}]'", file=sys.stderr)
        return 2


#: Top-level modules of the optional dependencies -> the extra that installs them.
_EXTRAS = {
    "ray": "cloud",
    "torch": "zoo",
    "onnxscript": "zoo",
    "locust": "loadtest",
    "gevent": "loadtest",
    "matplotlib": "loadtest",
    "cryptography": "security",
}


def missing_extra(module: str | None) -> str | None:
    """The extra (``pyproject.toml`` optional dependencies) that installs ``module``, if any."""
    return _EXTRAS.get((module or "").split(".")[0])


if __name__ == "__main__":
    sys.exit(main())
