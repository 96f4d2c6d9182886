"""Compressed cut tensors: bytes sent, end-to-end latency and agreement per encoding.

For each image model of the zoo, trained briefly on the synthetic gratings10
task (cached, :func:`splitgate.planner.zoo.train_zoo_module`) and planned with 64
held-out calibration images, this benchmark

1. reports the planner's measured figures per encoding over every planned
   split: raw/encoded bytes ratio, top-1 agreement, worst cosine similarity
   and max relative error of the logits, encode/decode ms, and whether the
   guard kept it;
2. runs the middle reference split through the real stack — ``splitgate.edge.Gateway``
   -> ``splitgate.netsim.ShapingProxy`` (3G / 4G / WiFi: DADS uplinks, netsim profile
   downlinks and RTTs) -> ``splitgate.cloud.start_local`` Ray Serve tier — once per
   encoding (``Gateway(encoding=E)``, requests interleaved round-robin over
   the encodings so load drift hits them alike), recording bytes sent,
   end-to-end latency (median, p90) and top-1 agreement of the answers with
   the full model on the calibration images;
3. records what the plan would pick at each network (``PlanBundle.choose``).

Prints JSON (and writes it with ``-o``)::

    .venv/bin/python benchmarks/bench_encoding.py [--models mobilenet,resnet18,vggchain]
        [--networks 3g,4g,wifi] [--requests 12] [--slowdown 1] [-o results/encoding.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import emit_json  # noqa: E402 - benchmarks/ is on sys.path when run as a script

ENCODINGS = ("raw", "fp16", "int8", "int8c", "zstd")


def _networks() -> dict[str, tuple[float, float, float]]:
    """name -> (uplink Mbps, downlink Mbps, RTT ms)."""
    from splitgate.netsim.profiles import DADS_UPLINKS, PROFILES

    return {n: (DADS_UPLINKS[n], PROFILES[n].downlink_mbps, PROFILES[n].rtt_ms) for n in ("3g", "4g", "wifi")}


def planner_figures(bundle: Any) -> dict[str, Any]:
    """Per encoding, over the bundle's measured splits: bytes ratio, worst agreement/error, timings, kept."""
    from splitgate.planner._encoding import split_id

    measured = bundle.profile["encodings"]["measured"]
    out: dict[str, Any] = {}
    for enc in ENCODINGS[1:]:
        rows = {pid: m for pid, m in measured.items() if split_id(pid)[1] == enc}
        if not rows:
            continue
        acc = [m["accuracy"].get("logits", {}) for m in rows.values() if m["accuracy"]]
        out[enc] = {
            "splits": len(rows),
            "bytes_ratio_min": min(m["ratio"] for m in rows.values()),
            "bytes_ratio_max": max(m["ratio"] for m in rows.values()),
            "top1_agreement_min": min((a["top1_agreement"] for a in acc), default=None),
            "cosine_min": min((a["cosine_min"] for a in acc), default=None),
            "max_rel_error": max((a["max_rel_error"] for a in acc), default=None),
            "encode_ms_median": statistics.median(m["encode_timing"]["median_ms"] for m in rows.values()),
            "decode_ms_median": statistics.median(m["decode_timing"]["median_ms"] for m in rows.values()),
            "kept_by_guard": sum(m["dropped"] is None for m in rows.values()),
            "per_split": {pid: {"ratio": m["ratio"], "raw_bytes": m["raw_bytes"], "wire_bytes": m["wire_bytes"],
                                "top1": m["accuracy"].get("logits", {}).get("top1_agreement"),
                                "dropped": m["dropped"]} for pid, m in rows.items()},
        }
    return out


def run_network(gw: Any, bundle: Any, cut: str, images: np.ndarray, want: np.ndarray, requests: int,
                warmup: int) -> dict[str, Any]:
    """Send ``requests`` calibration images per encoding, interleaved; bytes, latency, agreement."""
    model = bundle.model_name
    lat: dict[str, list[float]] = {e: [] for e in ENCODINGS}
    sent: dict[str, list[int]] = {e: [] for e in ENCODINGS}
    agree: dict[str, list[bool]] = {e: [] for e in ENCODINGS}
    fallbacks: dict[str, int] = {e: 0 for e in ENCODINGS}
    for i in range(warmup + requests):
        x = images[i % len(images)][None]
        for enc in ENCODINGS:
            r = gw[enc].infer(model, {"input": x}, partition=cut)
            if i < warmup:
                continue
            if r.trace.fallback:
                fallbacks[enc] += 1
            lat[enc].append(r.trace.total_ms)
            sent[enc].append(r.trace.bytes_sent)
            agree[enc].append(int(np.argmax(next(iter(r.outputs.values())))) == int(want[i % len(images)]))
    out = {}
    for enc in ENCODINGS:
        xs = sorted(lat[enc])
        out[enc] = {
            "bytes_sent": int(statistics.median(sent[enc])),
            "bytes_vs_raw": round(statistics.median(sent["raw"]) / max(1, statistics.median(sent[enc])), 3),
            "latency_p50_ms": round(statistics.median(xs), 2),
            "latency_p90_ms": round(xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))], 2),
            "top1_agreement_with_full_model": round(float(np.mean(agree[enc])), 4),
            "fallbacks": fallbacks[enc],
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenet,resnet18,vggchain")
    ap.add_argument("--networks", default="3g,4g,wifi")
    ap.add_argument("--requests", type=int, default=12, help="measured requests per encoding and network")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--calibration", type=int, default=64, help="held-out calibration images for planning")
    ap.add_argument("--slowdown", type=float, default=1.0, help="device slowdown (plan and gateway)")
    ap.add_argument("--plan-repeats", type=int, default=10)
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args()

    import onnxruntime as ort

    from splitgate.cloud import CloudConfig, start_local
    from splitgate.edge import Gateway
    from splitgate.netsim import LinkConditions, ShapingProxy
    from splitgate.planner import Conditions, build_bundle
    from splitgate.planner.zoo import calibration_inputs, export_zoo_model, train_zoo_module

    nets = {k: v for k, v in _networks().items() if k in args.networks.split(",")}
    names = [m for m in args.models.split(",") if m]
    cal = calibration_inputs(args.calibration)
    t_start = time.perf_counter()
    out: dict[str, Any] = {"config": {**vars(args), "networks": nets, "encodings": list(ENCODINGS),
                                      "task": "gratings10 (synthetic), held-out calibration images"},
                           "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundles = []
        for name in names:
            print(f"training/exporting {name} ...", file=sys.stderr, flush=True)
            stats = train_zoo_module(name)
            path = export_zoo_model(name, work / f"{name}.onnx", trained=True)
            print(f"planning {name} ...", file=sys.stderr, flush=True)
            b = build_bundle(path, work / f"{name}.bundle", model_name=name, device_slowdown=args.slowdown,
                             repeats=args.plan_repeats, calibration={"input": cal["input"]})
            bundles.append(b)
            full = ort.InferenceSession(str(b.model_path), providers=["CPUExecutionProvider"])
            logits = full.run(None, {"input": cal["input"]})[0]
            out["models"][name] = {
                "training": stats,
                "full_model_accuracy_on_calibration": round(float(np.mean(logits.argmax(1) == cal["labels"])), 4),
                "candidates": b.candidates,
                "planner": planner_figures(b),
                "picks": {net: b.choose(Conditions(uplink_mbps=up, downlink_mbps=down, rtt_ms=rtt))
                          for net, (up, down, rtt) in nets.items()},
                "networks": {},
                "_want": logits.argmax(1),
            }
        print("starting the cloud tier ...", file=sys.stderr, flush=True)
        tier = start_local(CloudConfig(bundles=[str(b.root) for b in bundles], grpc_port=0))
        try:
            for net, (up, down, rtt) in nets.items():
                cond = LinkConditions(uplink_mbps=up, downlink_mbps=down, rtt_ms=rtt)
                with ShapingProxy(tier.address, cond) as proxy:
                    gws = {e: Gateway([b.root for b in bundles], cloud=proxy.address, encoding=e, hedge=False,
                                      device_slowdown=args.slowdown, intra_op_threads=1, deadline_ms=300_000.0)
                           for e in ENCODINGS}
                    try:
                        for b in bundles:
                            refs = [p for p in b.partitions.values() if p.kind == "split" and p.encoding is None]
                            cut = refs[len(refs) // 2].id
                            m = out["models"][b.model_name]
                            t0 = time.perf_counter()
                            cell = run_network(gws, b, cut, cal["input"], m["_want"], args.requests, args.warmup)
                            m["networks"][net] = {"cut": cut, "link": {"uplink_mbps": up, "downlink_mbps": down,
                                                                       "rtt_ms": rtt}, "encodings": cell}
                            print(f"{b.model_name:>10s} {net:>5s} {cut}: " + "  ".join(
                                f"{e} {c['bytes_sent']}B {c['latency_p50_ms']}ms" for e, c in cell.items())
                                + f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
                    finally:
                        for g in gws.values():
                            g.close()
        finally:
            tier.stop()
    for m in out["models"].values():
        m.pop("_want")
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    emit_json(out, args.output, indent=2, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
