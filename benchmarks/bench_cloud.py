"""Cloud tier round trip and throughput: Ray Serve vs a plain grpcio baseline, one run.

For each payload size (4 KB, 600 KB, 3 MB of FP32 cut tensor) it builds a plan
bundle whose cloud input is exactly that size (``y = relu(x @ W)``, see
``benchmarks/_common.py``), serves all of them from

* ``baseline``   -- ``splitgate.cloud.baseline``: grpcio + onnxruntime, no Ray (own process),
* ``ray_direct`` -- the Ray Serve tier, replicas' direct-ingress gRPC ports
  (found through ServerMetadata, the way ``splitgate.edge.CloudClient(discover=True)`` does),
* ``ray_proxy``  -- the same Ray Serve tier through Serve's gRPC proxy,

and measures

* latency: sequential ModelInfer round trips, paths interleaved round by round,
  after warm-up; p50 / p99 per path;
* throughput: closed-loop load from client processes (``--clients`` x
  ``--concurrency`` requests in flight) for ``--duration`` seconds per path,
  with the CPU the serving processes spend per request in that window
  (``server_cpu_ms_per_request``: the baseline's process, or the Serve
  replicas; Linux ``/proc``) and the host's 1-minute load average.

Prints one JSON document (and writes it with ``--out``) with the ratios
``ray_*/baseline``. Run::

    .venv/bin/python benchmarks/bench_cloud.py --out bench_cloud.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from splitgate import contract

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SIZES, payload_bundle, summarize


def _request_bytes(model: str, payload_bytes: int, rows: int = 1) -> bytes:
    from splitgate import codec
    from splitgate.protocol import inference_pb2 as pb

    x = np.random.default_rng(0).standard_normal((rows, payload_bytes // 4)).astype(np.float32)
    request = pb.ModelInferRequest(model_name=model)
    codec.add_inputs(request, {"x": x})
    return request.SerializeToString()


def _channel(address: str):
    import grpc

    big = 256 * 1024 * 1024
    return grpc.insecure_channel(
        address, options=[("grpc.max_send_message_length", big), ("grpc.max_receive_message_length", big)]
    )


def _infer_fn(channel):
    """A ModelInfer callable sending pre-serialized bytes (no client-side encode cost)."""
    from splitgate.protocol import inference_pb2 as pb

    return channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=None,
        response_deserializer=pb.ModelInferResponse.FromString,
    )


def _latency(paths: dict[str, list[str]], model: str, payload: int, warmup: int, requests: int, rounds: int,
             routing: str = "sticky"):
    """Sequential round trips per path, interleaved in ``rounds`` so drift hits all paths alike.

    ``routing``: ``"sticky"`` sends a path's sequential calls to one endpoint, as
    ``splitgate.edge.CloudClient`` does (fewest calls in flight, then the last used);
    ``"round-robin"`` alternates over the path's endpoints.
    """
    body = _request_bytes(model, payload)
    calls = {}
    for name, addrs in paths.items():
        chans = [_channel(a) for a in (addrs if routing == "round-robin" else addrs[:1])]
        calls[name] = [_infer_fn(c) for c in chans]
    samples: dict[str, list[float]] = {n: [] for n in paths}
    server_ms: dict[str, list[float]] = {n: [] for n in paths}
    for name, fns in calls.items():
        for i in range(warmup):
            fns[i % len(fns)](body, timeout=60)
    per_round = max(requests // rounds, 1)
    for _ in range(rounds):
        for name, fns in calls.items():
            for i in range(per_round):
                t0 = time.perf_counter()
                resp = fns[i % len(fns)](body, timeout=60)
                samples[name].append((time.perf_counter() - t0) * 1e3)
                server_ms[name].append(resp.parameters[contract.CLOUD_MS].double_param)
    out = {}
    for name in paths:
        out[name] = summarize(samples[name]) | {"cloud_ms_p50": round(float(np.median(server_ms[name])), 3)}
    return out


def _load_worker(addrs: list[str], body: bytes, threads: int, duration: float, start_at: float, queue) -> None:
    """One client process: ``threads`` closed-loop callers until the deadline."""
    chans = [_channel(a) for a in addrs]
    fns = [_infer_fn(c) for c in chans]
    for f in fns:  # connect and warm every endpoint
        f(body, timeout=60)
    done = [0] * threads
    errors = [0] * threads
    batch_rows: list[list[int]] = [[] for _ in range(threads)]
    lat: list[list[float]] = [[] for _ in range(threads)]
    while time.time() < start_at:
        time.sleep(0.001)
    deadline = time.perf_counter() + duration

    def loop(k: int) -> None:
        fn = fns[k % len(fns)]
        while True:
            t0 = time.perf_counter()
            if t0 >= deadline:
                return
            try:
                resp = fn(body, timeout=60)
                done[k] += 1
                lat[k].append((time.perf_counter() - t0) * 1e3)
                if contract.BATCH_SIZE in resp.parameters:
                    batch_rows[k].append(resp.parameters[contract.BATCH_SIZE].int64_param)
            except Exception:  # noqa: BLE001 - counted, the run goes on
                errors[k] += 1

    ts = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    queue.put(
        {
            "done": sum(done),
            "errors": sum(errors),
            "lat": [x for xs in lat for x in xs],
            "batch": [x for xs in batch_rows for x in xs],
        }
    )


def _cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU seconds the processes ``pids`` have used so far (Linux
    ``/proc``); None where that cannot be read."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0.0
    try:
        for pid in pids:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rfind(")") + 2:].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    except (OSError, ValueError, IndexError):
        return None
    return total


def _replica_pids() -> list[int]:
    """Pids of the Serve replicas this benchmark's local Ray started (its
    descendants whose title names ``ServeReplica``); [] where /proc is missing."""
    parent: dict[int, int] = {}
    title: dict[int, str] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent[int(entry.name)] = int(stat[stat.rfind(")") + 2:].split()[1])
            title[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    me = os.getpid()

    def descends(pid: int) -> bool:
        seen = 0
        while pid in parent and pid > 1 and seen < 64:
            if parent[pid] == me:
                return True
            pid, seen = parent[pid], seen + 1
        return False

    return sorted(p for p, t in title.items() if "ServeReplica" in t and descends(p))


def _throughput(addrs: list[str], model: str, payload: int, clients: int, concurrency: int, duration: float,
                server_pids: list[int] | None = None):
    """Closed-loop load; with ``server_pids``, also the CPU those processes spend
    per completed request during the timed window (``server_cpu_ms_per_request``)."""
    body = _request_bytes(model, payload)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 3.0
    procs = [
        ctx.Process(target=_load_worker, args=(addrs, body, concurrency, duration, start_at, queue))
        for _ in range(clients)
    ]
    for p in procs:
        p.start()
    cpu_used = None
    if server_pids:
        time.sleep(max(start_at - time.time(), 0.0))
        before = _cpu_seconds(server_pids)
        time.sleep(duration)
        after = _cpu_seconds(server_pids)
        cpu_used = None if before is None or after is None else after - before
    results = [queue.get(timeout=duration + 120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    done = sum(r["done"] for r in results)
    lat = [x for r in results for x in r["lat"]]
    batch = [x for r in results for x in r["batch"]]
    return {
        "requests_per_s": round(done / duration, 1),
        "errors": sum(r["errors"] for r in results),
        "in_flight": clients * concurrency,
        "mean_batch_rows": round(float(np.mean(batch)), 2) if batch else None,
        "server_cpu_ms_per_request": round(cpu_used * 1e3 / done, 3) if cpu_used is not None and done else None,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    } | {k: v for k, v in summarize(lat).items() if k != "n"}


def _start_baseline(bundles: list[str], threads: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitgate.cloud.baseline", *bundles, "--threads", str(threads)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("listening on "):
        proc.kill()
        raise RuntimeError(f"baseline did not start: {line!r}")
    return proc, line.split()[-1]


def _discover(address: str) -> list[str]:
    from splitgate.edge import CloudClient

    with CloudClient(address, discover=True) as client:
        return client.endpoints


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma list of " + ", ".join(SIZES))
    parser.add_argument("--requests", type=int, default=300, help="timed sequential requests per path and size")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=6, help="interleaving rounds for latency")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load per path and size")
    parser.add_argument("--tp-rounds", type=int, default=3, help="interleaved throughput rounds per path")
    parser.add_argument("--skip-proxy", action="store_true", help="leave out the Serve proxy path")
    parser.add_argument("--clients", type=int, default=2, help="load client processes")
    parser.add_argument("--concurrency", type=int, default=8, help="in-flight requests per client process")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument(
        "--out-features", type=int, default=16,
        help="columns of W in y = relu(x @ W): 16 = a light suffix (transport-bound); "
        "64+ = a weights-bound FC head, where batching pays",
    )
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (both servers)")
    parser.add_argument("--batcher", choices=["drain", "serve"], default="drain",
                        help="Ray tier batching: drain queue on compute threads, or @serve.batch")
    parser.add_argument("--compute-threads", type=int, default=1, help="Ray replica threads running suffixes")
    parser.add_argument("--worker-niceness", type=int, default=0,
                        help="niceness of Ray's workers (replicas); -1 = Ray's default (15). The "
                        "baseline runs at the benchmark's own niceness")
    parser.add_argument("--latency-routing", choices=["sticky", "round-robin"], default="sticky",
                        help="sequential calls to one replica endpoint (edge.CloudClient) or alternating")
    parser.add_argument("--no-direct-ingress", action="store_true", help="proxy only (Ray's default)")
    parser.add_argument("--no-throughput-optimized", action="store_true", help="Ray Serve's default profile")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    from splitgate.cloud import CloudConfig, start_local

    sizes = {k: SIZES[k] for k in args.sizes.split(",")}
    work = Path(tempfile.mkdtemp(prefix="bench_cloud_"))
    bundles = {k: payload_bundle(work, f"payload{k}", v, out_features=args.out_features) for k, v in sizes.items()}
    dirs = [str(b.root) for b in bundles.values()]
    baseline, baseline_addr = _start_baseline(dirs, args.threads)
    config = CloudConfig(
        bundles=dirs,
        grpc_port=0,
        num_replicas=args.replicas,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_ms / 1e3,
        intra_op_threads=args.threads,
        batcher=args.batcher,
        compute_threads=args.compute_threads,
        worker_niceness=None if args.worker_niceness < 0 else args.worker_niceness,
        direct_ingress=not args.no_direct_ingress,
        throughput_optimized=not args.no_throughput_optimized,
    )
    tier = start_local(config)
    report: dict = {
        "benchmark": "cloud_round_trip",
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "config": vars(args),
        "sizes": {},
    }
    try:
        direct = _discover(tier.address)
        paths = {"baseline": [baseline_addr]}
        if not args.skip_proxy:
            paths["ray_proxy"] = [tier.address]
        if direct:
            paths["ray_direct"] = direct
        report["ray_direct_endpoints"] = direct
        for label, size in sizes.items():
            model = bundles[label].model_name
            entry: dict = {"payload_bytes": size}
            print(f"[{label}] latency ...", file=sys.stderr, flush=True)
            entry["latency"] = _latency(paths, model, size, args.warmup, args.requests, args.rounds,
                                        args.latency_routing)
            base = entry["latency"]["baseline"]["p50_ms"]
            entry["latency_p50_ratio_vs_baseline"] = {
                n: round(v["p50_ms"] / base, 3) for n, v in entry["latency"].items() if n != "baseline"
            }
            if not args.skip_throughput:
                # Paths alternate round by round (the host is shared and noisy); each
                # round's ratio compares runs seconds apart; report the medians and spread.
                runs: dict[str, list[dict]] = {n: [] for n in paths}
                for r in range(args.tp_rounds):
                    # Alternate the order (A B, B A, ...) so a drift within a round
                    # does not always favour the path that runs first.
                    order = list(paths.items()) if r % 2 == 0 else list(paths.items())[::-1]
                    for name, addrs in order:
                        print(f"[{label}] throughput {name} round {r + 1}/{args.tp_rounds} ...",
                              file=sys.stderr, flush=True)
                        pids = [baseline.pid] if name == "baseline" else _replica_pids()
                        runs[name].append(
                            _throughput(addrs, model, size, args.clients, args.concurrency, args.duration, pids)
                        )
                entry["throughput"] = {}
                for name, rs in runs.items():
                    best = sorted(rs, key=lambda x: x["requests_per_s"])[len(rs) // 2]
                    entry["throughput"][name] = best | {"rounds_requests_per_s": [x["requests_per_s"] for x in rs]}
                ratios = {
                    n: [r["requests_per_s"] / b["requests_per_s"] for r, b in zip(rs, runs["baseline"])
                        if b["requests_per_s"]]
                    for n, rs in runs.items() if n != "baseline"
                }
                entry["throughput_ratio_vs_baseline"] = {
                    n: round(float(np.median(v)), 3) for n, v in ratios.items() if v
                }
                entry["throughput_ratio_rounds"] = {n: [round(x, 3) for x in v] for n, v in ratios.items()}
            report["sizes"][label] = entry
    finally:
        tier.stop()
        baseline.terminate()
        baseline.wait(timeout=30)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
