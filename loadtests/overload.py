"""The overload run (issue 18.2): a step load far past the cloud tier's capacity.

Starts a real Ray Serve tier with admission control and autoscaling (1 to
``--max-replicas`` replicas), then at once:

- locust (a subprocess, :mod:`splitgate.loadtests.overload_locust`) sends
  open-loop load in steps of ``--factors`` times the tier's estimated capacity,
  each request with ``splitgate.deadline_ms``; its users never back off;
- ``--edges`` real :class:`~splitgate.edge.Gateway` objects send requests to the
  same tier, forced to the ``cloud`` partition; a refused request must complete
  on the device (``cloud-overloaded``; ``cloud-refused`` while backing off);
- a poller records the deployment's running replicas every second, through
  the load and a cool-down after it.

The report (JSON, ``--out``, default ``benchmarks/results/overload.json``) has
per step: offered and admitted rps, goodput (answers within the deadline per
second), admitted p50/p99, refusals by kind, failures, the overload factor
(offered / peak goodput) and the replicas; the edges' outcomes; the replica
timeline; and the verdict against the issue's bar (goodput at 3x overload
>= 90 % of peak, admitted p99 under the deadline, 0 failed at the edges,
replicas up under load and down after)::

    python -m splitgate.loadtests.overload --out benchmarks/results/overload.json

The model is a synthetic conv net (``--size``, ``--channels``; by default 96
channels at 64x64, 49 KB in, ~20-50 ms of compute per request on one thread
here, with the host's load) planned on the fly: the smallest model whose
compute, not gRPC, is what saturates the tier.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "synthetic_conv_model"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def synthetic_conv_model(channels: int = 64, size: int = 96, layers: int = 4, seed: int = 0):
    """Full-resolution convs on a dynamic batch: compute per row that batching cannot skip."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes, prev, cin = [], [], "x", 3
    for i in range(layers):
        w = (rng.standard_normal((channels, cin, 3, 3)) * 0.1).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"k{i}"))
        nodes += [helper.make_node("Conv", [prev, f"k{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        prev, cin = f"r{i}", channels
    nodes.append(helper.make_node("ReduceMean", [prev], ["y"], axes=[2, 3], keepdims=0))
    graph = helper.make_graph(
        nodes, "overload_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", channels])], initializer=inits,
    )
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _row_ms(model_path: Path, size: int) -> float:
    """Median ms per row of an 8-row run on one onnxruntime thread (the replicas' setting)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    x = np.zeros((8, 3, size, size), np.float32)
    session.run(None, {"x": x})
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        session.run(None, {"x": x})
        runs.append((time.perf_counter() - t0) * 1e3 / 8)
    return statistics.median(runs)


class _Replicas(threading.Thread):
    """Polls ``serve.status()`` every second: (wall time, running replicas)."""

    def __init__(self, app: str) -> None:
        super().__init__(daemon=True)
        self.app = app
        self.timeline: list[tuple[float, int]] = []
        self.stop_event = threading.Event()

    def count(self) -> int:
        from ray import serve

        status = serve.status().applications[self.app]
        return sum(int(d.replica_states.get("RUNNING", 0)) for d in status.deployments.values())

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.timeline.append((time.time(), self.count()))
            except Exception:  # noqa: BLE001 - a missed sample is not worth stopping the run
                pass
            self.stop_event.wait(1.0)


class _Edge(threading.Thread):
    """A real Gateway sending at a fixed rate; records (wall time, outcome) per request."""

    def __init__(self, gateway: Any, model: str, feeds: dict, rps: float, deadline_ms: float) -> None:
        super().__init__(daemon=True)
        self.gateway, self.model, self.feeds = gateway, model, feeds
        self.period, self.deadline_ms = 1.0 / rps, deadline_ms
        self.records: list[tuple[float, str]] = []
        self.errors: list[str] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            try:
                result = self.gateway.infer(self.model, self.feeds, partition="cloud", deadline_ms=self.deadline_ms)
                outcome = result.trace.fallback or "cloud"
                if result.outputs["y"].shape[0] != 1:
                    outcome = "failed"
            except Exception as exc:  # noqa: BLE001 - every exception is a failed request
                outcome = "failed"
                if len(self.errors) < 10:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
            self.records.append((time.time(), outcome))
            next_at += self.period
            self.stop_event.wait(max(next_at - time.monotonic(), 0.0))


def _locust(args: argparse.Namespace, host: str, traffic: Path, steps: str, result: Path, log: Path,
            run_s: float) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "overload_locust.py"), "--headless",
           "--host", host, "-t", f"{int(run_s) + 2}s", "--stop-timeout", "5", "--only-summary",
           "--loglevel", "WARNING", "--traffic", str(traffic), "--steps", steps, "--rate", str(args.rate),
           "--deadline-ms", str(args.deadline_ms), "--overload-result", str(result)]
    if args.back_off:
        cmd.append("--back-off")
    if args.ramp:
        cmd += ["--ramp", str(args.ramp), "--ramp-steps", str(args.ramp_steps), "--overload", args.overload,
                "--step-time", str(args.step_time), "--cooldown", str(args.cooldown)]
    with open(log, "w", encoding="utf-8") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=run_s + 90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return -9


def _merge(load: dict, replicas: list, edges: list[_Edge], deadline_ms: float, cooldown: tuple) -> dict:
    steps = load["steps"]
    peak = max((s["goodput_rps"] for s in steps), default=0.0)
    for s in steps:
        during = [n for t, n in replicas if s["start"] <= t < s["end"]]
        s["replicas_max"] = max(during) if during else None
        s["replicas_mean"] = round(sum(during) / len(during), 2) if during else None
        s["overload_factor"] = s["offered_rps"] / peak if peak else None
        s["goodput_vs_peak"] = s["goodput_rps"] / peak if peak else None
        outcomes: dict[str, int] = {}
        for edge in edges:
            for t, o in edge.records:
                if s["start"] <= t < s["end"]:
                    outcomes[o] = outcomes.get(o, 0) + 1
        s["edge_outcomes"] = outcomes
    edge_total: dict[str, int] = {}
    for edge in edges:
        for _, o in edge.records:
            edge_total[o] = edge_total.get(o, 0) + 1
    over = [s for s in steps if s["overload_factor"] and s["overload_factor"] >= 2.9]
    at3 = min(over, key=lambda s: s["overload_factor"]) if over else None
    during_load = [n for t, n in replicas if steps and steps[0]["start"] <= t < steps[-1]["end"]]
    after = [n for t, n in replicas if t >= cooldown[1] - 3]
    p99s = [s["admitted_p99_ms"] for s in steps if s["admitted_p99_ms"] is not None]
    verdict = {
        "peak_goodput_rps": peak,
        "step_at_3x": steps.index(at3) if at3 else None,
        "goodput_at_3x_vs_peak": at3["goodput_vs_peak"] if at3 else None,
        "goodput_ok": bool(at3 and at3["goodput_vs_peak"] >= 0.9),
        "worst_admitted_p99_ms": max(p99s) if p99s else None,
        "p99_under_deadline": bool(p99s) and max(p99s) < deadline_ms,
        "edge_failed": edge_total.get("failed", 0),
        "edges_ok": edge_total.get("failed", 0) == 0 and bool(edge_total),
        "replicas_max_under_load": max(during_load) if during_load else None,
        "replicas_at_end": after[-1] if after else None,
        "replicas_rose_and_fell": bool(during_load and after and max(during_load) > min(during_load[:3] or [1])
                                       and after[-1] < max(during_load)),
    }
    verdict["passed"] = all(verdict[k] for k in ("goodput_ok", "p99_under_deadline", "edges_ok",
                                                 "replicas_rose_and_fell"))
    return {"steps": steps, "edges": {"total": edge_total, "errors": [e for g in edges for e in g.errors]},
            "replicas": [{"t": round(t - (steps[0]["start"] if steps else 0), 1), "running": n} for t, n in replicas],
            "verdict": verdict, "load_requests_total": load["requests_total"],
            "load_failed_total": load["failed_total"], "load_failure_samples": load.get("failure_samples", [])}


def run(args: argparse.Namespace) -> dict:
    """Run the overload test and return the report (also written to ``args.out``)."""
    import onnx

    from splitgate.cloud import CloudConfig, start_local
    from splitgate.edge import Gateway
    from splitgate.loadtests._traffic import parse_mix, record_traffic, save_traffic
    from splitgate.planner import build_bundle

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    onnx.save(synthetic_conv_model(args.channels, args.size), work / "overload_conv.onnx")
    bundle = build_bundle(work / "overload_conv.onnx", work / "overload_conv.bundle")
    row_ms = _row_ms(bundle.model_path, args.size)
    capacity = args.max_replicas * 1000.0 / row_ms
    factors = [float(f) for f in args.factors.split(",")]
    users = [max(int(round(f * capacity / args.rate)), 1) for f in factors]
    steps = ",".join(f"{args.step_time:g}:{u}" for u in users) + f",{args.cooldown:g}:1"
    traffic = save_traffic(record_traffic([str(bundle.root)], parse_mix("cloud:1"), samples=4, seed=0),
                           work / "traffic.npz")
    print(f"compute {row_ms:.1f} ms/row (1 thread); estimated capacity {capacity:.0f} rps at "
          f"{args.max_replicas} replicas; steps {steps} at {args.rate:g} rps/user", flush=True)

    config = CloudConfig(
        bundles=[str(bundle.root)], grpc_port=0, intra_op_threads=1, max_batch_size=8,
        max_queue=args.max_queue, max_ongoing_requests=64, deadline_fraction=args.deadline_fraction,
        autoscaling={"min_replicas": 1, "max_replicas": args.max_replicas,
                     "target_ongoing_requests": args.target_ongoing, "upscale_delay_s": 2.0,
                     "downscale_delay_s": args.downscale_delay, "metrics_interval_s": 1.0,
                     "look_back_period_s": 2.0},
    )
    load_avg_before = os.getloadavg()
    tier = start_local(config)
    replicas = _Replicas(config.app_name)
    edges: list[_Edge] = []
    gateways: list[Any] = []
    try:
        replicas.start()
        feeds = {"x": np.random.default_rng(7).standard_normal((1, 3, args.size, args.size)).astype(np.float32)}
        for _ in range(args.edges):
            gateway = Gateway([bundle.root], tier.address, cloud_discover=True)
            gateway.infer(bundle.model_name, feeds, partition="cloud")  # warm: sessions, channels
            gateways.append(gateway)
            edges.append(_Edge(gateway, bundle.model_name, feeds, args.edge_rps, args.deadline_ms))
        result_file = work / "locust_overload.json"
        result_file.unlink(missing_ok=True)
        run_s = (args.ramp_steps + len(args.overload.split(",")) if args.ramp else len(users)) * args.step_time \
            + args.cooldown
        for edge in edges:
            edge.start()
        code = _locust(args, tier.address, traffic, steps, result_file, work / "locust.log", run_s)
        for edge in edges:
            edge.stop_event.set()
        for edge in edges:
            edge.join(30)
        time.sleep(2.0)
        replicas.stop_event.set()
        replicas.join(10)
    finally:
        for gateway in gateways:
            gateway.close()
        tier.stop()
    if not result_file.is_file():
        raise RuntimeError(f"locust wrote no result (exit {code}); see {work / 'locust.log'}")
    load = json.loads(result_file.read_text(encoding="utf-8"))
    load_steps = load["steps"]
    cooldown = (load_steps[-1]["start"], load_steps[-1]["end"])
    load["steps"] = load_steps[:-1]
    report = _merge(load, replicas.timeline, edges, args.deadline_ms, cooldown)
    report["cooldown"] = {k: load_steps[-1][k] for k in ("users", "ok_rps", "admitted_p99_ms", "failed")}
    report["setup"] = {
        "command": " ".join(["python -m splitgate.loadtests.overload", *sys.argv[1:]]),
        "model": f"synthetic conv, {args.channels} ch x {args.size}x{args.size} x 4 layers, input "
                 f"{3 * args.size * args.size * 4:,} B",
        "row_ms_one_thread": row_ms, "capacity_estimate_rps": capacity,
        **({} if args.ramp else {"factors": factors, "users": users}),
        "rate_per_user": args.rate, "ramp": args.ramp, "overload": args.overload, "step_time_s": args.step_time, "cooldown_s": args.cooldown,
        "deadline_ms": args.deadline_ms, "deadline_fraction": args.deadline_fraction, "max_queue": args.max_queue,
        "locust_users_back_off": args.back_off, "autoscaling": config.autoscaling,
        "edges": args.edges, "edge_rps": args.edge_rps, "locust_exit": code,
        "cpus": os.cpu_count(), "load_avg_before": load_avg_before, "load_avg_after": os.getloadavg(),
        "python": platform.python_version(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _print(report: dict) -> None:
    print(f"{'step':>4} {'users':>5} {'offered':>8} {'x peak':>6} {'goodput':>8} {'vs peak':>7} {'p99 ms':>7} "
          f"{'refused/s':>9} {'failed':>6} {'replicas':>8}  edges")
    for i, s in enumerate(report["steps"]):
        p99 = f"{s['admitted_p99_ms']:.0f}" if s["admitted_p99_ms"] is not None else "-"
        print(f"{i:>4} {s['users']:>5} {s['offered_rps']:>8.0f} {s['overload_factor'] or 0:>6.2f} "
              f"{s['goodput_rps']:>8.1f} {s['goodput_vs_peak'] or 0:>7.2f} {p99:>7} {s['refused_rps']:>9.1f} "
              f"{s['failed']:>6} {s['replicas_max'] or '-':>8}  {s['edge_outcomes']}")
    print("replicas:", " ".join(f"{r['t']:g}s:{r['running']}" for r in report["replicas"][::5]))
    print("verdict:", json.dumps(report["verdict"]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitgate.loadtests.overload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "overload.json"))
    parser.add_argument("--work", default="overload-run", help="scratch directory (bundle, traffic, locust log)")
    parser.add_argument("--factors", default="0.3,0.6,1.2,1.8,2.4,3,3.6",
                        help="offered load per step, in units of the estimated capacity")
    parser.add_argument("--step-time", type=float, default=12.0)
    parser.add_argument("--cooldown", type=float, default=20.0, help="seconds of light load after the steps")
    parser.add_argument("--rate", type=float, default=5.0, help="requests per second per locust user")
    parser.add_argument("--deadline-ms", type=float, default=300.0)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--max-replicas", type=int, default=2)
    parser.add_argument("--target-ongoing", type=float, default=2.0)
    parser.add_argument("--downscale-delay", type=float, default=8.0)
    parser.add_argument("--edges", type=int, default=2)
    parser.add_argument("--edge-rps", type=float, default=1.0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=96)
    parser.add_argument("--ramp", type=int, default=2,
                        help="find the peak first: start at this many locust users, x1.5 per step while goodput "
                             "grows 10 %%, then --overload steps (0 = fixed --factors steps)")
    parser.add_argument("--ramp-steps", type=int, default=6)
    parser.add_argument("--overload", default="3,4,5", help="overload steps after the ramp, x the ramp's peak goodput (autoscaling raises the final peak, so 3,4,5 reaches 3x of it)")
    parser.add_argument("--back-off", action="store_true",
                        help="locust users back off for each refusal's retry hint, as splitgate edges do "
                             "(default: they never back off, the worst case)")
    parser.add_argument("--deadline-fraction", type=float, default=0.4,
                        help="the replica's share of a request's deadline (CloudConfig.deadline_fraction)")
    args = parser.parse_args(argv)
    report = run(args)
    _print(report)
    return 0 if report["verdict"]["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
