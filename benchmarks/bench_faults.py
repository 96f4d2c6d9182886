"""Fault injection against the real stack: Gateway -> real TCP (netsim
ShapingProxy) -> real gRPC -> real Ray Serve -> onnxruntime.

Each scenario drives a Gateway with concurrent requests at a fixed split
partition, injects one fault mid-run, and counts requests sent, answered
(by the cloud or by a local fallback), failed (raised), answered wrongly
(outputs differ from the full model run locally, rtol 1e-4) and lost (never
returned). The bar is 0 wrong and 0 lost.

    .venv/bin/python benchmarks/bench_faults.py --requests 300 --out faults.json

Scenarios: replica_kill, link_drop, link_stall, slow_cloud, cloud_restart,
bundle_corrupt, stale_plan. ``tests/test_faults.py`` runs them short.

breaker_latency measures what the open circuit breaker costs: with the cloud
app deleted, each open-breaker request (a split partition asked for, run
device-only) is paired with a device-only request right after it, so both
see the same machine load; ``measured`` holds the median of the per-pair
ratios (the bar: <= 1.2) and both medians. The device is emulated 20x slower
than this machine so the ratio compares paths, not timer noise.
(``tests/test_edge_integration.py`` checks by counting that the open breaker
makes no cloud call.)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitgate.edge import Gateway  # noqa: E402
from splitgate.netsim import LinkConditions, ShapingProxy  # noqa: E402
from _common import emit_json  # noqa: E402 - benchmarks/ is on sys.path when run as a script

GATEWAY = dict(deadline_ms=1500.0, breaker_failures=3, breaker_reset_s=0.5, probe_interval_s=3600.0)


@dataclass
class Tally:
    """What happened to the requests of one scenario."""

    scenario: str
    sent: int = 0
    answered: int = 0
    by_cloud: int = 0
    failed: int = 0
    wrong: int = 0
    lost: int = 0
    fallbacks: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""
    measured: dict = field(default_factory=dict)


class Workload:
    """Inputs and their reference outputs (the full model, run locally)."""

    def __init__(self, bundle, n_inputs: int = 8, seed: int = 0) -> None:
        import onnxruntime as ort

        (spec,) = bundle.inputs
        rng = np.random.default_rng(seed)
        shape = [d if d >= 0 else 1 for d in spec.shape]
        self.inputs = [{spec.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n_inputs)]
        session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        self.refs = [dict(zip(names, session.run(names, x))) for x in self.inputs]
        self.model = bundle.model_name
        self.cut = next(p.id for p in bundle.partitions.values() if p.kind == "split")

    def correct(self, i: int, outputs: dict) -> bool:
        ref = self.refs[i % len(self.refs)]
        return set(outputs) == set(ref) and all(
            np.allclose(outputs[k], v, rtol=1e-4, atol=1e-5) for k, v in ref.items()
        )


def drive(
    gw: Gateway,
    work: Workload,
    scenario: str,
    *,
    requests: int,
    threads: int = 4,
    fault: Callable[[], None] | None = None,
    fault_at: float = 0.3,
    partition: str | None = None,
    pace_s: float = 0.0,
    grace_s: float = 60.0,
) -> Tally:
    """Send ``requests`` through ``gw`` from ``threads`` workers; run ``fault``
    once ``fault_at`` of them were sent (in its own thread); count outcomes."""
    tally = Tally(scenario)
    lock = threading.Lock()
    fallbacks: Counter = Counter()
    errors: Counter = Counter()
    fault_started = threading.Event()
    fault_thread: list[threading.Thread] = []

    def one(i: int) -> None:
        with lock:
            tally.sent += 1
            if fault is not None and not fault_started.is_set() and tally.sent >= requests * fault_at:
                fault_started.set()
                t = threading.Thread(target=fault, name="fault")
                t.start()
                fault_thread.append(t)
        try:
            result = gw.infer(work.model, work.inputs[i % len(work.inputs)], partition=partition or work.cut)
        except Exception as exc:  # noqa: BLE001 - counted, never hidden
            with lock:
                tally.failed += 1
                errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
            return
        ok = work.correct(i, result.outputs)
        with lock:
            tally.answered += 1
            tally.wrong += 0 if ok else 1
            if result.trace.fallback is None:
                tally.by_cloud += 1
            else:
                fallbacks[result.trace.fallback] += 1
        if pace_s:
            time.sleep(pace_s)

    start = time.perf_counter()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="drive")
    futures = [pool.submit(one, i) for i in range(requests)]
    deadline = time.monotonic() + grace_s + requests * 2.0
    for f in futures:
        try:
            f.result(timeout=max(deadline - time.monotonic(), 0.01))
        except Exception:  # noqa: BLE001 - a future that never returned is counted as lost below
            pass
    pool.shutdown(wait=False, cancel_futures=True)
    for t in fault_thread:
        t.join(timeout=grace_s)
    tally.seconds = round(time.perf_counter() - start, 2)
    tally.lost = tally.sent - tally.answered - tally.failed + (requests - tally.sent)
    tally.fallbacks, tally.errors = dict(fallbacks), dict(errors)
    return tally


# -- the cloud tier's replicas --------------------------------------------------


def replica_names(app_deployment: str = "splitgate-cloud") -> list[str]:
    import ray

    return sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and app_deployment in a["name"]
    )


def wait_cloud_serving(address: str, work: Workload, timeout_s: float = 120.0, exclude: str | None = None) -> float:
    """Block until the tier answers a real suffix call (and ``exclude`` is not a replica); return seconds."""
    from splitgate.edge import CloudClient
    from splitgate.errors import SplitgateError

    t0 = time.monotonic()
    with CloudClient(address, timeout_s=10) as client:
        while True:
            try:
                if exclude is None or exclude not in replica_names():
                    client.infer(work.model, work.inputs[0], partition="cloud", timeout_s=10)
                    return time.monotonic() - t0
            except SplitgateError:
                pass
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"the cloud tier at {address} is not serving after {timeout_s:.0f}s")
            time.sleep(0.5)


# -- scenarios ---------------------------------------------------------------------


def replica_kill(tier, bundle, work: Workload, requests: int) -> Tally:
    import ray

    (victim,) = replica_names()

    def fault() -> None:
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

    with Gateway([bundle], cloud=tier.address, **GATEWAY) as gw:
        tally = drive(gw, work, "replica_kill", requests=requests, fault=fault, pace_s=0.01)
    back = wait_cloud_serving(tier.address, work, exclude=victim)
    tally.note = f"replica replaced and serving {back:.1f}s after the run"
    return tally


def _link(tier, work, bundle, scenario: str, requests: int, *, reset: bool, conditions: LinkConditions,
          hold_s: float, **gateway) -> Tally:
    with ShapingProxy(tier.address, LinkConditions(rtt_ms=2), reset_on_outage=reset) as link, Gateway(
        [bundle], cloud=link.address, **{**GATEWAY, **gateway}
    ) as gw:
        def fault() -> None:
            link.set(conditions)
            time.sleep(hold_s)
            link.set(LinkConditions(rtt_ms=2))

        tally = drive(gw, work, scenario, requests=requests, fault=fault, pace_s=0.005)
        tally.note = f"{conditions} for {hold_s}s"
        return tally


def link_drop(tier, bundle, work, requests: int) -> Tally:
    return _link(tier, work, bundle, "link_drop", requests, reset=True,
                 conditions=LinkConditions(outage=True), hold_s=1.5)


def link_stall(tier, bundle, work, requests: int) -> Tally:
    return _link(tier, work, bundle, "link_stall", requests, reset=False,
                 conditions=LinkConditions(outage=True), hold_s=2.0, deadline_ms=800.0)


def slow_cloud(tier, bundle, work, requests: int) -> Tally:
    return _link(tier, work, bundle, "slow_cloud", requests, reset=False,
                 conditions=LinkConditions(rtt_ms=600.0), hold_s=2.0, deadline_ms=400.0)


def cloud_restart(tier, bundle, work, requests: int) -> Tally:
    from ray import serve

    from splitgate.cloud import build_app

    def fault() -> None:
        serve.delete(tier.config.app_name)
        time.sleep(0.5)
        serve.run(build_app(tier.config), name=tier.config.app_name, route_prefix="/")

    with Gateway([bundle], cloud=tier.address, **GATEWAY) as gw:
        tally = drive(gw, work, "cloud_restart", requests=requests, fault=fault, pace_s=0.01)
        back = wait_cloud_serving(tier.address, work)
        after = drive(gw, work, "after", requests=8, threads=1)
    tally.note = f"tier serving again {back:.1f}s after the run; {after.by_cloud}/8 later requests answered by the cloud"
    return tally


BREAKER_BAR = 1.2  # open-breaker latency / device-only latency, median of pairs


def breaker_latency(tier, bundle, work, requests: int) -> Tally:
    """Open-breaker requests against device-only ones, paired, with the cloud app deleted."""
    import statistics

    from ray import serve

    from splitgate.cloud import build_app

    tally = Tally("breaker_latency")
    fallbacks: Counter = Counter()
    errors: Counter = Counter()
    ratios, open_ms, device_ms = [], [], []
    with Gateway([bundle], cloud=tier.address, breaker_failures=3, breaker_reset_s=3600, device_slowdown=20) as gw:
        for i in range(3):  # warm the sessions and the channel
            gw.infer(work.model, work.inputs[i % len(work.inputs)], partition=work.cut)
            gw.infer(work.model, work.inputs[i % len(work.inputs)], partition="device")
        serve.delete(tier.config.app_name)
        start = time.perf_counter()
        try:
            for i in range(requests):
                x = work.inputs[i % len(work.inputs)]
                tally.sent += 1
                try:
                    result = gw.infer(work.model, x, partition=work.cut)
                except Exception as exc:  # noqa: BLE001 - counted, never hidden
                    tally.failed += 1
                    errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
                    continue
                tally.answered += 1
                tally.wrong += 0 if work.correct(i, result.outputs) else 1
                fallbacks[result.trace.fallback] += 1
                device = gw.infer(work.model, x, partition="device").trace.total_ms
                if result.trace.fallback == "breaker-open":
                    ratios.append(result.trace.total_ms / device)
                    open_ms.append(result.trace.total_ms)
                    device_ms.append(device)
        finally:
            serve.run(build_app(tier.config), name=tier.config.app_name, route_prefix="/")
        tally.seconds = round(time.perf_counter() - start, 2)
    wait_cloud_serving(tier.address, work)
    tally.fallbacks, tally.errors = dict(fallbacks), dict(errors)
    tally.lost = tally.sent - tally.answered - tally.failed
    if ratios:
        ratio = statistics.median(ratios)
        tally.measured = {
            "pairs": len(ratios),
            "median_ratio": round(ratio, 3),
            "median_open_breaker_ms": round(statistics.median(open_ms), 2),
            "median_device_only_ms": round(statistics.median(device_ms), 2),
            "bar": BREAKER_BAR,
            "within_bar": ratio <= BREAKER_BAR,
        }
    tally.note = f"{len(ratios)} open-breaker requests paired with device-only ones (device emulated 20x slower)"
    return tally


def bundle_corrupt(tier, bundle, work, requests: int, workdir: Path) -> Tally:
    """Flip a byte in a prefix on disk; a Gateway loading the bundle refuses that
    partition (runs it on the device), and update_bundle to it is refused whole."""
    from splitgate.errors import BundleError

    copy = workdir / "corrupt.bundle"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(bundle.root, copy)
    part = bundle.partition(work.cut)
    victim = copy / part.prefix_path.relative_to(bundle.root)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with Gateway([bundle], cloud=tier.address, **GATEWAY) as gw:
        refused_update = False

        def fault() -> None:
            nonlocal refused_update
            try:
                gw.update_bundle(copy)
            except BundleError:
                refused_update = True

        tally = drive(gw, work, "bundle_corrupt", requests=requests // 2, fault=fault)
    with Gateway([copy], cloud=tier.address, **GATEWAY) as gw:
        refused = gw.refused_partitions(work.model)
        second = drive(gw, work, "bundle_corrupt", requests=requests - requests // 2)
    for k in ("sent", "answered", "by_cloud", "failed", "wrong", "lost"):
        setattr(tally, k, getattr(tally, k) + getattr(second, k))
    tally.fallbacks = dict(Counter(tally.fallbacks) + Counter(second.fallbacks))
    tally.note = (f"update_bundle to the corrupt copy refused: {refused_update}; "
                  f"loading it refused {sorted(refused)} (run on the device)")
    return tally


def stale_plan(tier, bundle, work, requests: int, stale_bundle) -> Tally:
    """An edge holding another plan of the same model: the cloud answers
    FAILED_PRECONDITION and the edge finishes locally from its cut tensors."""
    with Gateway([stale_bundle], cloud=tier.address, **GATEWAY) as gw:
        tally = drive(gw, work, "stale_plan", requests=requests,
                      partition=next(p.id for p in stale_bundle.partitions.values() if p.kind == "split"))
    tally.note = f"edge plan {stale_bundle.plan_digest[:12]} vs served {bundle.plan_digest[:12]}"
    return tally


SCENARIOS = ("replica_kill", "link_drop", "link_stall", "slow_cloud", "cloud_restart", "breaker_latency",
             "bundle_corrupt", "stale_plan")


def run_all(tier, bundle, stale_bundle, requests: int, workdir: Path, only: tuple[str, ...] = SCENARIOS) -> list[Tally]:
    work = Workload(bundle)
    runs = {
        "replica_kill": lambda: replica_kill(tier, bundle, work, requests),
        "link_drop": lambda: link_drop(tier, bundle, work, requests),
        "link_stall": lambda: link_stall(tier, bundle, work, requests),
        "slow_cloud": lambda: slow_cloud(tier, bundle, work, requests),
        "cloud_restart": lambda: cloud_restart(tier, bundle, work, requests),
        "breaker_latency": lambda: breaker_latency(tier, bundle, work, requests),
        "bundle_corrupt": lambda: bundle_corrupt(tier, bundle, work, requests, workdir),
        "stale_plan": lambda: stale_plan(tier, bundle, work, requests, stale_bundle),
    }
    return [runs[name]() for name in only]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="requests per scenario")
    parser.add_argument("--only", nargs="*", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from splitgate.cloud import CloudConfig, start_local
    from splitgate.planner import build_bundle
    from splitgate.planner.zoo import export_zoo_model

    work = Path(tempfile.mkdtemp(prefix="splitgate-faults-"))
    model = export_zoo_model("mobilenet", work / "mobilenet.onnx", seed=0)
    bundle = build_bundle(model, work / "mobilenet.bundle")
    # another plan (other partitions): a profile alone would not change the plan digest
    stale = build_bundle(model, work / "mobilenet-old.bundle", profile=False, candidates="chain")
    with start_local(CloudConfig(bundles=[str(bundle.root)], grpc_port=0)) as tier:
        tallies = run_all(tier, bundle, stale, args.requests, work, tuple(args.only))
    rows = [asdict(t) for t in tallies]
    result = {
        "requests_per_scenario": args.requests,
        "scenarios": rows,
        "ok": all(t.wrong == 0 and t.lost == 0 and t.failed == 0 for t in tallies),
    }
    emit_json(result, args.out, indent=1)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
