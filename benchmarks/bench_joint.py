"""The joint plan against the field, per trained zoo classifier and DADS uplink (issue 16.4).

Per model (the zoo's image classifiers trained briefly on gratings10,
``export_zoo_model(name, trained=True)``) one bundle is planned with
everything on: int8 device prefixes (``quantize``), every wire encoding, and
the cascade ``int8`` (the planner's int8 full model with a calibrated
confidence threshold), for a Pi 3B-class device (``device_slowdown`` 20, as
the DADS specs), calibrated on gratings10 images rounded to bytes (so the
lossless ``cloud@uint8`` applies, as for a camera's frames). Every column is
the plan's own pick rule (:func:`splitgate.planner._decide.pick`, the
objective over :meth:`PlanBundle.estimate` at a full battery: the fastest)
restricted to a candidate set of that one bundle, so all columns share the
same measured profile (medians/lower quartiles of sessions timed side by side,
after warm-up):

* ``edge``: ``device`` (fp32 full model on the device);
* ``cloud``: the best guarded cloud encoding (:func:`best_cloud_only`);
* ``dads``: DADS-style min-cut on raw tensors -- raw fp32 partitions only
  (``device``, ``cloud``, ``cut-K``/``dag-K``);
* ``mincut_enc``: min-cut with encodings, what splitgate had before issue 16.2/16.3:
  raw partitions and their ``@E`` twins (cloud twins included), no int8 prefix, no cascade;
* ``joint``: every candidate (int8 prefixes ``~int8`` and their ``@E`` twins
  too), then the cascade in front where the decision core says it pays
  (:meth:`splitgate.edge.DecisionCore.cascade_choice` under the link:
  small-model time + (1 - planned exit rate) x the path, against the path).
  ``joint_simulated_ms`` is the analytic engine's ``joint`` policy on a constant
  link without jitter (random exits at the planned rate), a check of the arithmetic.

Links: the netsim profiles the DADS specs use (CAT1 0.13, 3G 1.1, 4G 5.85,
WiFi 18.88 Mbps up; their downlinks and RTTs). Ratios per cell: joint /
best of the other columns, joint / mincut_enc (< 1 = joint faster).

Agreement: each column's chosen partition is run for real on held-out byte
images (not the calibration ones) one request at a time -- the int8 or fp32
prefix, the cut tensors through the encoding's wire round trip, the suffix;
the cloud partitions' inputs through the same round trip; for ``joint`` with
the cascade, the int8 cascade model first and its answer where confident --
and its top-1 is compared with the fp32 full model's. The cascade's held-out
exit rate is reported beside the planned one.

    .venv/bin/python benchmarks/bench_joint.py [--models resnet18,vggchain,mobilenet] [--calibration 256]
        [--heldout 512] [-o benchmarks/results/joint.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from _common import emit_json  # noqa: E402 - benchmarks/ is on sys.path when run as a script

LINKS = ("cat1", "3g", "4g", "wifi")
COLUMNS = ("edge", "cloud", "dads", "mincut_enc", "joint")
#: a Raspberry Pi 3B-class device against one core of this host (the DADS specs' slowdown)
DEVICE_SLOWDOWN = 20.0
#: byte images: code k -> (k - 128) x 2/153, i.e. (k/255 - 0.502) / 0.3, gratings10's normalisation
_BYTE_SCALE = float(Fraction(2, 153))
_BYTE_OFFSET = -128 * _BYTE_SCALE


def byte_images(n: int, seed: int) -> np.ndarray:
    """``n`` held-out gratings10 images rounded to bytes, float32 ``[n, 3, 64, 64]``, each
    exactly ``codes x scale + offset`` (the lossless ``uint8`` wire form applies)."""
    from splitgate.planner._zoo_train import calibration_images

    from splitgate.encoding import _decode_levels

    x, _ = calibration_images(n, seed=seed)
    codes = np.clip(np.rint(x.astype(np.float64) / _BYTE_SCALE + 128), 0, 255)
    return _decode_levels(codes, _BYTE_SCALE, _BYTE_OFFSET, np.dtype(np.float32))


def conditions(link: str) -> Any:
    """The planner's conditions for a netsim profile (up/down Mbps, RTT)."""
    from splitgate.netsim import profile
    from splitgate.planner import Conditions

    p = profile(link)
    return Conditions(uplink_mbps=p.uplink_mbps, downlink_mbps=p.downlink_mbps, rtt_ms=p.rtt_ms)


def candidate_sets(bundle: Any) -> dict[str, list[str]]:
    """The profiled partitions each restricted column chooses among."""
    profiled = [pid for pid in bundle.partitions if pid in bundle.profile["partitions"]]
    raw = [pid for pid in profiled if "@" not in pid and "~" not in pid]
    return {
        "dads": raw,
        "mincut_enc": [pid for pid in profiled if "~" not in pid],
        "joint": profiled,
    }


def restricted_pick(bundle: Any, c: Any, allowed: list[str]) -> str:
    """The plan's pick rule over ``allowed`` only."""
    from splitgate.planner._decide import pick

    ests = {pid: bundle.estimate(pid, c) for pid in allowed}
    return pick(ests, c, bundle.estimate("device", c))


def cell(bundle: Any, link: str, sets: dict[str, list[str]]) -> dict[str, Any]:
    """Every column's choice and predicted latency at one link."""
    from splitgate.edge import DecisionCore
    from splitgate.planner import best_cloud_only

    c = conditions(link)
    choice = {"edge": "device", "cloud": best_cloud_only(bundle, c),
              **{k: restricted_pick(bundle, c, v) for k, v in sets.items()}}
    ms = {k: bundle.estimate(pid, c).latency_ms for k, pid in choice.items()}
    casc = DecisionCore().cascade_choice(bundle, choice["joint"], bundle.costs(), conditions=c)
    row: dict[str, Any] = {"link": link, "choice": dict(choice), "path_ms": round(ms["joint"], 2)}
    if casc is not None:
        row["cascade"] = {"run": casc.run, "why": casc.why, "small_ms": _r(casc.small_ms),
                          "exit_rate": round(casc.exit_rate, 4), "expected_ms": _r(casc.expected_ms)}
        if casc.run and casc.expected_ms is not None:
            ms["joint"] = casc.expected_ms
            choice["joint"] = f"cascade -> {choice['joint']}"
    row["ms"] = {k: round(v, 2) for k, v in ms.items()}
    row["choice"] = choice
    others = min(v for k, v in ms.items() if k != "joint")
    row["best_other"] = min((k for k in ms if k != "joint"), key=lambda k: ms[k])
    row["joint_vs_best_other"] = round(ms["joint"] / others, 4)
    row["joint_vs_mincut_enc"] = round(ms["joint"] / ms["mincut_enc"], 4)
    row["mincut_enc_vs_joint_speedup"] = round(ms["mincut_enc"] / ms["joint"], 3)
    return row


def _r(v: float | None, d: int = 2) -> float | None:
    return None if v is None else round(v, d)


def simulated_joint(bundle: Any, link: str, expected_ms: float, requests: int = 300) -> dict[str, Any]:
    """The analytic engine's ``joint`` policy on a constant link without jitter."""
    from splitgate.experiments.analytic import CASCADE_PARTITION, simulate_policy
    from splitgate.experiments.spec import ExperimentSpec, build_trace

    seconds = max(5.0, requests * expected_ms / 1e3)
    trace = build_trace({"kind": "constant", "profile": link, "duration_s": seconds, "jitter_ms": 0.0})
    spec = ExperimentSpec(name=f"joint-{link}", model=bundle.model_name, trace=trace, policies=["joint"],
                          interval_ms=0.0, gateway={"hedge": False, "deadline_ms": 600000})
    recs = simulate_policy(spec, bundle, "joint")
    lat = [r.latency_ms for r in recs]
    return {"requests": len(recs), "mean_ms": round(float(np.mean(lat)), 2),
            "exits": round(sum(r.partition == CASCADE_PARTITION for r in recs) / max(len(recs), 1), 4)}


class Runner:
    """Runs a bundle's partitions (and its cascade) on inputs, one request at a time."""

    def __init__(self, bundle: Any) -> None:
        from splitgate.planner._profile import make_session

        self.bundle = bundle
        self._sessions: dict[str, Any] = {}
        self._make = lambda path: make_session(str(path), 1, spinning=False)
        full = bundle.partitions["device"].prefix_path
        self.full = self._session(full)

    def _session(self, path: Any) -> Any:
        key = str(path)
        if key not in self._sessions:
            self._sessions[key] = self._make(path)
        return self._sessions[key]

    def top1(self, pid: str, x: np.ndarray) -> int:
        """Top-1 class of partition ``pid`` on one request ``x [1, ...]``."""
        from splitgate.planner._encoding import _roundtrip

        p = self.bundle.partitions[pid]
        enc = p.encoding or "raw"
        feeds = {"input": x}
        if p.kind == "device":
            out = self._session(p.prefix_path).run(None, feeds)[0]
        elif p.kind == "cloud":
            out = self._session(p.suffix_path).run(None, _roundtrip(feeds, enc) if enc != "raw" else feeds)[0]
        else:
            pre = self._session(p.prefix_path)
            names = [o.name for o in pre.get_outputs()]
            cut = dict(zip(names, pre.run(None, feeds)))
            suf = self._session(p.suffix_path)
            cut = _roundtrip(cut, enc) if enc != "raw" else cut
            out = suf.run(None, {i.name: cut[i.name] for i in suf.get_inputs()})[0]
        return int(np.argmax(out))

    def cascade(self, x: np.ndarray) -> int | None:
        """The cascade's answer (top-1) when it is confident, else None."""
        from splitgate.edge._cascade import is_confident

        spec = self.bundle.cascade
        s = self._session(self.bundle.cascade_path)
        outs = dict(zip([o.name for o in s.get_outputs()], s.run(None, {"input": x})))
        return int(np.argmax(outs[spec.output])) if is_confident(outs, spec) else None

    def reference(self, x: np.ndarray) -> int:
        return int(np.argmax(self.full.run(None, {"input": x})[0]))


def agreement(bundle: Any, rows: list[dict[str, Any]], heldout: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement with the fp32 full model of every partition some column chose, and of the cascade."""
    run = Runner(bundle)
    ref = [run.reference(x[None]) for x in heldout]
    pids = sorted({pid.split(" -> ")[-1] for r in rows for pid in r["choice"].values()})
    out: dict[str, Any] = {}
    for pid in pids:
        got = [run.top1(pid, x[None]) for x in heldout]
        out[pid] = {"top1_agreement": round(float(np.mean(np.equal(got, ref))), 4),
                    "lossy": _lossy(bundle.partitions[pid])}
    if bundle.cascade is not None:
        answers = [run.cascade(x[None]) for x in heldout]
        exits = [i for i, a in enumerate(answers) if a is not None]
        out["cascade"] = {
            "exit_rate": round(len(exits) / len(heldout), 4),
            "agreement_among_exits": None if not exits else
            round(float(np.mean([answers[i] == ref[i] for i in exits])), 4),
            "planned_exit_rate": round(bundle.cascade.exit_rate, 4), "threshold": round(bundle.cascade.threshold, 4),
        }
        # the cascade in front of each path the joint column ran with it: exits answer, the rest take the path
        for r in rows:
            path = r["choice"]["joint"]
            if path.startswith("cascade -> "):
                base = path.split(" -> ")[-1]
                got = [answers[i] if answers[i] is not None else run.top1(base, heldout[i][None])
                       for i in range(len(heldout))]
                out[path] = {"top1_agreement": round(float(np.mean(np.equal(got, ref))), 4), "lossy": True}
    return {"samples": len(heldout), "partitions": out}


def _lossy(p: Any) -> bool:
    """An int8 prefix or a lossy wire encoding (fp16, int8, int8c); raw, zstd and uint8 are exact."""
    return p.prefix_precision == "int8" or (p.encoding or "raw") in ("fp16", "int8", "int8c")


def plan(name: str, workdir: Path, n_cal: int) -> tuple[Any, float]:
    """Export the trained model and plan it with everything on; returns (bundle, planning seconds)."""
    from splitgate.planner import build_bundle
    from splitgate.planner.zoo import export_zoo_model

    model = export_zoo_model(name, workdir / f"{name}.onnx", trained=True)
    t0 = time.perf_counter()
    bundle = build_bundle(model, workdir / f"{name}.bundle", model_name=name, quantize=True, cascade="int8",
                          calibration={"input": byte_images(n_cal, seed=0)}, device_slowdown=DEVICE_SLOWDOWN)
    return bundle, time.perf_counter() - t0


def device_figures(bundle: Any) -> dict[str, Any]:
    """fp32 vs int8 planned device times (this host x slowdown), the cascade's, and refused twins."""
    parts = bundle.profile["partitions"]
    dev = {pid: round(float(e["device_ms"]), 2) for pid, e in parts.items() if bundle.partitions[pid].prefix_path
           and "@" not in pid}
    q = (bundle.profile or {}).get("quantization") or {}
    spec = bundle.cascade
    return {
        "device_ms": dev,
        "int8_vs_fp32_full": None if "device~int8" not in dev else round(dev["device~int8"] / dev["device"], 3),
        "cascade_device_ms": None if spec is None or spec.device_ms is None else round(spec.device_ms, 2),
        "int8_dropped": q.get("dropped", {}),
    }


def bench_model(name: str, workdir: Path, n_cal: int, heldout: np.ndarray) -> dict[str, Any]:
    bundle, plan_s = plan(name, workdir, n_cal)
    sets = candidate_sets(bundle)
    rows = []
    for link in LINKS:
        row = cell(bundle, link, sets)
        row["joint_simulated"] = simulated_joint(bundle, link, row["ms"]["joint"])
        rows.append(row)
    agree = agreement(bundle, rows, heldout)
    lossy_min = min((v["top1_agreement"] for v in agree["partitions"].values()
                     if isinstance(v, dict) and v.get("lossy")), default=None)
    return {"model": name, "planning_s": round(plan_s, 1), "partitions": sorted(bundle.partitions),
            "device": device_figures(bundle), "cells": rows, "agreement": agree,
            "lossy_min_agreement": lossy_min}


def verdict(models: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's Done-when checks over every model and link."""
    cells = [(m["model"], r) for m in models for r in m["cells"]]
    worst = max(cells, key=lambda mr: mr[1]["joint_vs_best_other"])
    fast = [(m, r["link"], r["mincut_enc_vs_joint_speedup"]) for m, r in cells if r["link"] in ("3g", "4g")]
    best = max(fast, key=lambda t: t[2]) if fast else None
    lossy = [m["lossy_min_agreement"] for m in models if m["lossy_min_agreement"] is not None]
    return {
        "joint_within_5pct_of_best_everywhere": worst[1]["joint_vs_best_other"] <= 1.05,
        "worst_joint_vs_best_other": {"model": worst[0], "link": worst[1]["link"],
                                      "ratio": worst[1]["joint_vs_best_other"]},
        "best_speedup_vs_mincut_enc_3g_4g": None if best is None else
        {"model": best[0], "link": best[1], "speedup": best[2]},
        "speedup_1p2_somewhere_3g_4g": bool(best and best[2] >= 1.2),
        "lossy_min_agreement": min(lossy) if lossy else None,
        "lossy_agreement_at_least_99": all(a >= 0.99 for a in lossy),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,vggchain,mobilenet", help="trained zoo image models")
    ap.add_argument("--calibration", type=int, default=256, help="calibration byte images (guard, threshold)")
    ap.add_argument("--heldout", type=int, default=512, help="held-out byte images for agreement")
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)
    heldout = byte_images(args.heldout, seed=1)
    models = []
    with tempfile.TemporaryDirectory(prefix="bench_joint_") as tmp:
        for name in args.models.split(","):
            print(f"bench_joint: {name}", file=sys.stderr, flush=True)
            models.append(bench_model(name, Path(tmp), args.calibration, heldout))
    result = {
        "benchmark": "joint",
        "command": "python benchmarks/bench_joint.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "device_slowdown": DEVICE_SLOWDOWN,
        "links": {k: {"uplink_mbps": conditions(k).uplink_mbps, "downlink_mbps": conditions(k).downlink_mbps,
                      "rtt_ms": conditions(k).rtt_ms} for k in LINKS},
        "calibration_images": args.calibration,
        "heldout_images": args.heldout,
        "models": models,
        "verdict": verdict(models),
    }
    emit_json(result, args.output, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
