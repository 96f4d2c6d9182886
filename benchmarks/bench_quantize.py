"""Int8 device prefixes against fp32 ones, and what ``--quantize`` costs in planning time.

1. **prefixes**: for the real-size ResNet-18 (``resnet18_224``: seeded weights,
   3x224x224, batch 1) and the small zoo ``resnet18`` (trained briefly on
   gratings10), at a few chain cuts and the full model: the fp32 prefix and the
   int8 twin the planner builds (:class:`splitgate.planner._quantize.PrefixQuantizer`:
   static QDQ, per-channel weights, activation ranges of the full model
   calibrated once on 16 calibration requests). Each prefix runs in its own
   onnxruntime session with 1 intra-op thread; sessions are timed in the same
   run, round by round in shuffled order (drift hits them alike), median after
   warm-up; the ratio is int8 / fp32 from those medians. Bytes are the serialized
   models. Agreement: the int8 prefix then the fp32 suffix against the fp32 full
   model on held-out inputs (not the calibration ones): top-1 agreement and worst
   per-sample cosine of the logits. resnet18_224 has no trained weights in the zoo,
   so its inputs are random and its logits nearly tied: its top-1 agreement says
   how easily argmax flips there, not what a trained network would lose.
2. **formats**: the full resnet18_224 in the other onnxruntime int8 formats
   (static QOperator, dynamic) against the same fp32 session: why the planner
   uses QDQ for conv nets.
3. **planning**: ``build_bundle`` wall time with ``quantize`` off and on (the
   other options default; random calibration inputs), per model, one run each;
   resnet18_224's int8 twins fail the default guard on random inputs, so it is
   also planned with the guard at 0.5 top-1 agreement (``loose_guard_s``): the
   cost when its twins are kept, measured and encoded.

Prints JSON (and writes it with ``-o``)::

    .venv/bin/python benchmarks/bench_quantize.py [--rounds 20] [--heldout 32] [-o benchmarks/results/quantize.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import emit_json  # noqa: E402 - benchmarks/ is on sys.path when run as a script


def _session(model: Any, threads: int = 1) -> Any:
    from splitgate.planner._profile import make_session

    return make_session(model, threads, spinning=False)


def _time_sessions(sessions: dict[str, Any], feeds: dict[str, Any], rounds: int, warmup: int = 3,
                   seed: int = 0) -> dict[str, float]:
    """Median ms per session: warm-up, then ``rounds`` rounds, each session once per round in shuffled order."""
    inputs = {k: [i.name for i in s.get_inputs()] for k, s in sessions.items()}
    for _ in range(warmup):
        for k, s in sessions.items():
            s.run(None, {n: feeds[n] for n in inputs[k]})
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    order = list(sessions)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            s = sessions[k]
            f = {n: feeds[n] for n in inputs[k]}
            t0 = time.perf_counter()
            s.run(None, f)
            samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def _agreement(full: Any, pre: Any, suf: Any | None, inputs: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Top-1 agreement and worst cosine of (int8 prefix [+ fp32 suffix]) against the fp32 full model."""
    from splitgate.planner._accuracy import compare_outputs

    ref, got = [], []
    out_names = [o.name for o in full.get_outputs()]
    for feeds in inputs:
        ref.append(dict(zip(out_names, full.run(None, feeds))))
        if suf is None:
            got.append(dict(zip(out_names, pre.run(None, feeds))))
            continue
        pre_out = [o.name for o in pre.get_outputs()]
        cut = dict(zip(pre_out, pre.run(None, feeds)))
        suf_out = [o.name for o in suf.get_outputs()]
        got.append(dict(zip(suf_out, suf.run(None, {i.name: cut[i.name] for i in suf.get_inputs()}))))
    (row,) = compare_outputs(ref, got).values()
    return {"top1_agreement": round(row.get("top1_agreement", float("nan")), 4),
            "cosine_min": round(row["cosine_min"], 6)}


def prefix_rows(name: str, model_path: Path, calibration: list[dict[str, np.ndarray]],
                heldout: list[dict[str, np.ndarray]], cuts: int, rounds: int) -> dict[str, Any]:
    """fp32 vs int8 prefixes at ``cuts`` evenly spaced chain cuts and the full model."""
    from splitgate.planner import Extractor, ModelGraph, chain_cuts
    from splitgate.planner._accuracy import Calibration, Guard
    from splitgate.planner._quantize import PrefixQuantizer

    g = ModelGraph.load(model_path)
    ex = Extractor(g)
    chain = chain_cuts(g)
    picked = [chain[(i + 1) * len(chain) // (cuts + 1)] for i in range(cuts)]
    full = _session(g.model, 2)
    rows: dict[str, Any] = {}
    # the guard is off here (min agreement 0): the benchmark reports agreement, it does not filter on it
    guard = Guard(min_top1_agreement=0.0, min_cosine=-1.0)
    with PrefixQuantizer(g.model, Calibration(calibration, "bench", len(calibration)), guard, threads=2) as q:
        parts: list[tuple[str, Any, Any]] = [(f"cut-{c.index}", ex.prefix([c.tensor]), ex.suffix([c.tensor]))
                                             for c in picked]
        parts.append(("device", None, None))
        sessions: dict[str, Any] = {}
        for pid, pre, suf in parts:
            int8, result = q.quantize(pid, pre, suf)
            assert int8 is not None, result.dropped
            sessions[f"{pid}/fp32"] = _session(pre if pre is not None else g.model)
            sessions[f"{pid}/int8"] = _session(int8)
            rows[pid] = {
                "fp32_bytes": result.fp32_bytes, "int8_bytes": result.int8_bytes,
                "bytes_ratio": round(result.int8_bytes / result.fp32_bytes, 4),
                "quantize_s": round(result.seconds, 3),
                "calibration_set": _agreement(full, _session(int8, 2), _session(suf, 2) if suf else None, calibration),
                "heldout": _agreement(full, _session(int8, 2), _session(suf, 2) if suf else None, heldout),
            }
        calibration_s = q.calibration_s
    medians = _time_sessions(sessions, heldout[0], rounds)
    for pid, row in rows.items():
        fp32, int8 = medians[f"{pid}/fp32"], medians[f"{pid}/int8"]
        row.update(fp32_ms=round(fp32, 3), int8_ms=round(int8, 3), time_ratio=round(int8 / fp32, 3))
    return {"model": name, "calibration_requests": len(calibration), "heldout_requests": len(heldout),
            "calibration_s": round(calibration_s, 3), "partitions": rows}


def format_rows(model_path: Path, calibration: list[dict[str, np.ndarray]], heldout: list[dict[str, np.ndarray]],
                rounds: int, work: Path) -> dict[str, Any]:
    """The full model in fp32, QDQ (the planner's), static QOperator and dynamic int8, timed together."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        quantize_dynamic,
        quantize_static,
    )

    model = onnx.load(os.fspath(model_path))
    name = model.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    files = {"fp32": model_path}
    for fmt, qf in (("qdq", QuantFormat.QDQ), ("qoperator", QuantFormat.QOperator)):
        files[fmt] = work / f"{fmt}.onnx"
        quantize_static(os.fspath(model_path), os.fspath(files[fmt]), Reader(), quant_format=qf, per_channel=True)
    files["dynamic"] = work / "dynamic.onnx"
    quantize_dynamic(os.fspath(model_path), os.fspath(files["dynamic"]))
    medians = _time_sessions({k: _session(os.fspath(v)) for k, v in files.items()}, {name: heldout[0][name]}, rounds)
    return {k: {"ms": round(v, 3), "time_ratio": round(v / medians["fp32"], 3),
                "mb": round(files[k].stat().st_size / 1e6, 2)} for k, v in medians.items()}


def planning_cost(models: dict[str, Path], work: Path, loose: set[str]) -> dict[str, Any]:
    """``build_bundle`` wall time with quantize off and on, default options (and, for the
    models in ``loose``, on with the guard at 0.5 top-1 agreement)."""
    from splitgate.planner import build_bundle

    out: dict[str, Any] = {}
    for name, path in models.items():
        row: dict[str, Any] = {}
        runs = [("plain", {"quantize": False}), ("quantize", {"quantize": True})]
        if name in loose:
            runs.append(("loose_guard", {"quantize": True, "min_top1_agreement": 0.5}))
        for label, options in runs:
            t0 = time.perf_counter()
            b = build_bundle(path, work / f"{name}-{label}.bundle", **options)
            row[f"{label}_s"] = round(time.perf_counter() - t0, 2)
            if options["quantize"]:
                q = b.profile["quantization"]
                row[label] = {"twins_tried": len(q["measured"]), "dropped": q["dropped"],
                              "int8_in_bundle": [pid for pid in b.partitions if "~int8" in pid],
                              "calibration_s": q["calibration_s"]}
            if label != "plain":
                row[f"{label}_ratio"] = round(row[f"{label}_s"] / row["plain_s"], 2)
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per session")
    parser.add_argument("--heldout", type=int, default=64, help="held-out inputs for agreement")
    parser.add_argument("--cuts", type=int, default=4, help="chain cuts per model")
    parser.add_argument("--no-planning", action="store_true", help="skip the planning-time runs")
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args(argv)
    from splitgate.planner.zoo import calibration_inputs, export_zoo_model

    work = Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    r224 = export_zoo_model("resnet18_224", work / "resnet18_224.onnx")
    r18 = export_zoo_model("resnet18", work / "resnet18.onnx", trained=True)
    rng = np.random.default_rng(0)
    big = [{"input": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(16 + args.heldout)]
    imgs = calibration_inputs(16, seed=0)["input"]
    held = calibration_inputs(args.heldout, seed=1)["input"]
    result: dict[str, Any] = {
        "benchmark": "quantize",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "onnxruntime": __import__("onnxruntime").__version__, "threads": 1},
        "prefixes": [
            prefix_rows("resnet18_224", r224, big[:16], big[16:], args.cuts, args.rounds),
            prefix_rows("resnet18 (trained)", r18, [{"input": imgs[i:i + 1]} for i in range(16)],
                        [{"input": held[i:i + 1]} for i in range(len(held))], args.cuts, args.rounds),
        ],
        "formats_resnet18_224": format_rows(r224, big[:16], big[16:], args.rounds, work),
    }
    if not args.no_planning:
        result["planning"] = planning_cost({"resnet18": export_zoo_model("resnet18", work / "r18_seeded.onnx"),
                                            "resnet18_224": r224}, work, {"resnet18_224"})
    emit_json(result, args.output, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
