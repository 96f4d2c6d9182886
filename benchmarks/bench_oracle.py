"""Oracle check of the planner: its pick vs the best measured partition, per model x network.

For every (model, network) cell this benchmark measures the real end-to-end
latency of **every** partition in the model's plan bundle — the planner's
candidates (optimal somewhere in the condition space), its evenly spaced
reference chain cuts, ``device`` and ``cloud`` — through the real parts:

* the edge :class:`splitgate.edge.Gateway` (``partition=`` forced per request; device
  sessions with 1 intra-op thread, as the planner profiles them; device compute
  stretched ``device_slowdown`` times, the factor the bundle was planned with:
  50 by default, a phone-class CPU next to a server core — the 64x64 zoo
  MobileNet then takes ~35 ms on the device, SqueezeNet-224 ~0.5 s);
* a :class:`splitgate.netsim.ShapingProxy` between the edge and the cloud (per-direction
  bandwidth and RTT, no jitter or loss: they would add the same noise to every
  offloading partition and hide the comparison);
* the real Ray Serve cloud tier (:func:`splitgate.cloud.start_local`, gRPC proxy ->
  replica, every bundle loaded).

It then asks the planner what the edge would pick, ``bundle.choose(Conditions(
uplink, downlink, rtt))``, and records the regret ``latency(pick) /
latency(best measured)``. Latencies are medians of ``--repeats`` requests after
``--warmup`` requests per partition; the partitions of a cell are measured
interleaved (one request each per round, order shuffled per round), so machine
load drifts hit them alike and the ratio is measured side by side.

RTT the planner is given. The tier adds a per-call overhead to every cloud
call (gRPC through Ray Serve's proxy, the proxy -> replica hop, the replica's
queue and worker thread: a few ms) that the profile's ``cloud_ms`` (the suffix
session alone) does not contain. The edge does not need a model of it: its RTT
probe is a ``ServerLive`` call through the same link, proxy and replica, so the
RTT it measures already contains that hop. The benchmark gives the planner the
median of ``--rtt-probes`` ``ServerLive`` round trips through the shaped link
(``rtt_probe_ms``), i.e. what the edge's monitor sees; the pick under the link's
nominal RTT (``pick_nominal_rtt``) is recorded next to it.

Networks: DADS's four uplinks (INFOCOM'19: CAT1 0.13, 3G 1.1, 4G 5.85, WiFi
18.88 Mbps) with the downlinks and RTTs of :data:`splitgate.netsim.profiles.PROFILES`:
CAT1 0.5 Mbps down / 150 ms, 3G 2 Mbps / 100 ms, 4G 13 Mbps (Huang et al.,
MobiSys'12: median LTE downlink) / 60 ms, WiFi 50 Mbps / 10 ms — typical RTTs
from a device to a regional cloud over each access technology (the profiles
mark them as assumed; neither paper gives RTTs).

Pruning (to keep the wall time bounded on slow links): a partition's latency is
at least its network time ``up_bytes·8/uplink + down_bytes·8/downlink + RTT``
(the shaper enforces exactly that; gRPC framing only adds). A partition that is
not the pick and whose bound is above the best measured median cannot be the
best, so it is not measured (``pruned`` in the output, with its bound); the
check is repeated against the final best.

Output: one JSON document (stdout, and ``-o``): per cell the link, the RTT
probe, the pick, every partition's estimate, measured median/p10/p90 and bound,
the best, the regret; and ``summary`` with median and worst regret overall and
per model and network. A markdown table goes to stderr.

Usage::

    python benchmarks/bench_oracle.py [-o out.json] [--models mobilenet,resnet18,squeezenet]
        [--networks cat1,3g,4g,wifi] [--slowdown 50] [--repeats 15] [--warmup 2]
        [--encodings raw] [--quick]

Models are planned with raw cut tensors by default (the partition choice is
what this checks); ``--encodings raw,fp16,int8,int8c,zstd`` adds the encoded
candidates. The light squeezenet's filler weights make its activations
compress unrealistically well, so its zstd numbers are not representative.

Not run in CI (needs Ray; ~5-10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def _networks() -> dict[str, tuple[float, float, float]]:
    """name -> (uplink Mbps, downlink Mbps, RTT ms): DADS uplinks, netsim profile downlinks and RTTs."""
    from splitgate.netsim.profiles import DADS_UPLINKS, PROFILES

    return {n: (DADS_UPLINKS[n], PROFILES[n].downlink_mbps, PROFILES[n].rtt_ms) for n in ("cat1", "3g", "4g", "wifi")}


def _model_path(name: str, work: Path) -> Path:
    """A zoo model (exported, seeded) or a light model from the onnx wheel."""
    import onnx

    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"
    if light.is_file():
        return light
    from splitgate.planner.zoo import export_zoo_model

    return export_zoo_model(name, work / f"{name}.onnx", seed=0)


def _lower_bound_ms(entry: dict[str, Any], kind: str, up: float, down: float, rtt: float) -> float:
    """Network time a partition cannot beat on the shaped link (0 for device-only)."""
    if kind == "device":
        return 0.0
    return float(entry["up_bytes"]) * 8 / (up * 1e3) + float(entry["down_bytes"]) * 8 / (down * 1e3) + rtt


def _rtt_probe(address: str, n: int) -> float:
    """Median ServerLive round trip through ``address`` (what the edge's RTT probe measures)."""
    from splitgate.edge import CloudClient

    client = CloudClient(address, timeout_s=30.0)
    try:
        client.server_live()  # connect
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            client.server_live()
            samples.append((time.perf_counter() - t0) * 1e3)
    finally:
        client.close()
    return statistics.median(samples)


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def _measure(gw: Any, model: str, feeds: dict, pids: list[str], *, warmup: int, repeats: int,
             rng: random.Random) -> dict[str, dict[str, Any]]:
    """Interleaved end-to-end latencies of ``pids`` through the gateway."""
    samples: dict[str, list[float]] = {p: [] for p in pids}
    parts: dict[str, dict[str, list[float]]] = {p: {"device_ms": [], "network_ms": [], "cloud_ms": []} for p in pids}
    fallbacks: dict[str, int] = {p: 0 for p in pids}
    for _ in range(warmup):
        for p in pids:
            gw.infer(model, feeds, partition=p)
    for _ in range(repeats):
        order = list(pids)
        rng.shuffle(order)
        for p in order:
            r = gw.infer(model, feeds, partition=p)
            samples[p].append(r.trace.total_ms)
            for k, xs in parts[p].items():
                xs.append(getattr(r.trace, k))
            fallbacks[p] += r.trace.fallback is not None
    return {
        p: {
            "median_ms": round(statistics.median(xs), 3),
            "p10_ms": round(_quantile(xs, 0.1), 3),
            "p90_ms": round(_quantile(xs, 0.9), 3),
            "n": len(xs),
            "fallbacks": fallbacks[p],
            # where the time went (Gateway trace medians: prefix, cloud call wall time, server compute)
            **{f"trace_{k}": round(statistics.median(v), 3) for k, v in parts[p].items()},
        }
        for p, xs in samples.items()
    }


def run_cell(gw: Any, bundle: Any, address_rtt_ms: float, net: str, link: tuple[float, float, float], *,
             warmup: int, repeats: int, seed: int) -> dict[str, Any]:
    """Measure one (model, network) cell; see the module docs."""
    from splitgate.experiments.policies import cloud_only_choice
    from splitgate.planner import Conditions
    from splitgate.planner._graph import dummy_inputs

    up, down, rtt = link
    model = bundle.model_name
    feeds = dummy_inputs(bundle.inputs, seed=1)
    cond = Conditions(uplink_mbps=up, downlink_mbps=down, rtt_ms=address_rtt_ms)
    pick = bundle.choose(cond)
    cloud_only = cloud_only_choice(bundle, cond)  # the honest baseline: the best guarded cloud encoding
    pick_nominal = bundle.choose(Conditions(uplink_mbps=up, downlink_mbps=down, rtt_ms=rtt))
    entries = bundle.profile["partitions"]
    parts = {pid: p for pid, p in bundle.partitions.items() if pid in entries}
    bound = {pid: _lower_bound_ms(entries[pid], p.kind, up, down, rtt) for pid, p in parts.items()}
    rng = random.Random(seed)
    # provisional best: the pick and the partitions with the smallest bounds, briefly
    first = list(dict.fromkeys([pick, "device", *sorted(parts, key=bound.__getitem__)[:2]]))
    quick = _measure(gw, model, feeds, first, warmup=1, repeats=3, rng=rng)
    provisional = min(m["median_ms"] for m in quick.values())
    todo = [pid for pid in parts if pid in (pick, cloud_only, "cloud") or bound[pid] < 1.2 * provisional]
    measured = _measure(gw, model, feeds, todo, warmup=warmup, repeats=repeats, rng=rng)
    best = min(measured, key=lambda k: measured[k]["median_ms"])
    late = [pid for pid in parts if pid not in measured and bound[pid] < measured[best]["median_ms"]]
    if late:  # the provisional best was too optimistic: measure the rest together again
        measured = _measure(gw, model, feeds, todo + late, warmup=warmup, repeats=repeats, rng=rng)
        best = min(measured, key=lambda k: measured[k]["median_ms"])
    rows = {}
    for pid in parts:
        e = bundle.estimate(pid, cond)
        row: dict[str, Any] = {
            "candidate": pid in bundle.candidates,
            "estimate_ms": round(e.latency_ms, 3),
            "estimate_parts_ms": {"device": round(e.device_ms, 3), "transfer": round(e.transfer_ms, 3),
                                  "cloud": round(e.cloud_ms, 3)},
            "bound_ms": round(bound[pid], 3),
        }
        if pid in measured:
            row.update(measured[pid])
            row["estimate_error_pct"] = round(100 * (e.latency_ms / measured[pid]["median_ms"] - 1), 2)
        else:
            row["pruned"] = True
        rows[pid] = row
    regret = measured[pick]["median_ms"] / measured[best]["median_ms"]
    return {
        "model": model,
        "network": net,
        "link": {"uplink_mbps": up, "downlink_mbps": down, "rtt_ms": rtt},
        "rtt_probe_ms": round(address_rtt_ms, 3),
        "pick": pick,
        "pick_nominal_rtt": pick_nominal,
        "cloud_only": cloud_only,
        "cloud_only_ms": measured[cloud_only]["median_ms"] if cloud_only in measured else None,
        "cloud_raw_ms": measured["cloud"]["median_ms"] if "cloud" in measured else None,
        "best": best,
        "regret": round(regret, 4),
        "partitions": rows,
    }


def _summary(cells: list[dict[str, Any]]) -> dict[str, Any]:
    def agg(xs: list[float]) -> dict[str, float]:
        return {"median_regret": round(statistics.median(xs), 4), "worst_regret": round(max(xs), 4), "cells": len(xs)}

    out: dict[str, Any] = agg([c["regret"] for c in cells])
    out["per_model"] = {m: agg([c["regret"] for c in cells if c["model"] == m]) for m in dict.fromkeys(c["model"] for c in cells)}
    out["per_network"] = {n: agg([c["regret"] for c in cells if c["network"] == n]) for n in dict.fromkeys(c["network"] for c in cells)}
    out["picked_best"] = sum(c["pick"] == c["best"] for c in cells)
    return out


def _table(cells: list[dict[str, Any]]) -> str:
    lines = ["| model | network | RTT probe ms | pick | best | pick ms | best ms | regret | cloud-only (best encoding) ms "
             "| cloud (raw fp32) ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        p, b = c["partitions"][c["pick"]], c["partitions"][c["best"]]
        only, raw = c.get("cloud_only_ms"), c.get("cloud_raw_ms")
        only_txt = "-" if only is None else f"{only:.1f} ({c['cloud_only']})"
        raw_txt = "-" if raw is None else f"{raw:.1f}"
        lines.append(
            f"| {c['model']} | {c['network']} | {c['rtt_probe_ms']:.1f} | {c['pick']} | {c['best']} | "
            f"{p['median_ms']:.1f} | {b['median_ms']:.1f} | {c['regret']:.3f} | {only_txt} | {raw_txt} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenet,resnet18,squeezenet")
    ap.add_argument("--networks", default="cat1,3g,4g,wifi")
    ap.add_argument("--slowdown", type=float, default=50.0, help="device slowdown at plan time and in the Gateway")
    ap.add_argument("--repeats", type=int, default=15, help="measured requests per partition")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured requests per partition")
    ap.add_argument("--plan-repeats", type=int, default=30, help="timed runs per session while planning")
    ap.add_argument("--rtt-probes", type=int, default=15)
    ap.add_argument("--encodings", default="raw",
                    help="cut-tensor encodings to plan with (raw = partitions only; e.g. raw,fp16,int8,int8c,zstd)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    ap.add_argument("-o", "--output", default=None, help="also write the JSON here")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.warmup, args.plan_repeats, args.rtt_probes = 3, 1, 5, 3

    from splitgate.cloud import CloudConfig, start_local
    from splitgate.edge import Gateway
    from splitgate.netsim import LinkConditions, ShapingProxy
    from splitgate.planner import build_bundle

    networks = _networks()
    names = [m for m in args.models.split(",") if m]
    nets = [n for n in args.networks.split(",") if n]
    t_start = time.perf_counter()
    out: dict[str, Any] = {
        "config": {"models": names, "networks": {n: networks[n] for n in nets}, "device_slowdown": args.slowdown,
                   "repeats": args.repeats, "warmup": args.warmup, "plan_repeats": args.plan_repeats,
                   "rtt_probes": args.rtt_probes, "encodings": args.encodings},
        "cells": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundles = []
        for name in names:
            path = _model_path(name, work)
            print(f"planning {name} ...", file=sys.stderr, flush=True)
            bundles.append(build_bundle(path, work / f"{name}.bundle", model_name=name,
                                        device_slowdown=args.slowdown, repeats=args.plan_repeats,
                                        encodings=tuple(args.encodings.split(","))))
        out["plans"] = {
            b.model_name: {
                "candidates": b.candidates,
                "planning_ms": b.profile["planning_ms"],
                "partitions": {pid: {k: e.get(k) for k in ("device_ms", "cloud_ms", "up_bytes", "device_timing", "cloud_timing")}
                               for pid, e in b.profile["partitions"].items()},
            }
            for b in bundles
        }
        print("starting the cloud tier ...", file=sys.stderr, flush=True)
        tier = start_local(CloudConfig(bundles=[str(b.root) for b in bundles], grpc_port=0))
        try:
            for net in nets:
                up, down, rtt = networks[net]
                with ShapingProxy(tier.address, LinkConditions(uplink_mbps=up, downlink_mbps=down, rtt_ms=rtt)) as proxy:
                    gw = Gateway([b.root for b in bundles], cloud=proxy.address, device_slowdown=args.slowdown,
                                 intra_op_threads=1, hedge=False, deadline_ms=300_000.0)
                    try:
                        rtt_probe = _rtt_probe(proxy.address, args.rtt_probes)
                        for k, b in enumerate(bundles):
                            t0 = time.perf_counter()
                            cell = run_cell(gw, b, rtt_probe, net, (up, down, rtt), warmup=args.warmup,
                                            repeats=args.repeats, seed=args.seed + k)
                            cell["wall_s"] = round(time.perf_counter() - t0, 1)
                            out["cells"].append(cell)
                            print(f"{b.model_name:>10s} {net:>5s}: pick {cell['pick']:>8s} best {cell['best']:>8s} "
                                  f"regret {cell['regret']:.3f} ({cell['wall_s']} s)", file=sys.stderr, flush=True)
                    finally:
                        gw.close()
        finally:
            tier.stop()
    out["summary"] = _summary(out["cells"])
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(out, indent=2)
    print(text)
    print(_table(out["cells"]), file=sys.stderr)
    print(json.dumps({k: v for k, v in out["summary"].items() if not k.startswith("per_")}), file=sys.stderr)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
