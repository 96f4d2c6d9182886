"""What Gateway.infer costs over a raw onnxruntime ``session.run`` on the
all-device path: the same model, the same input, interleaved, in one run.

    .venv/bin/python benchmarks/bench_edge_overhead.py [--models mobilenet,resnet18] [--out FILE]

Prints JSON: per model the medians after warm-up, the absolute overhead (ms)
and the ratio. The issue's bar: overhead <= 5 % or <= 0.2 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from _common import emit_json  # noqa: E402 - benchmarks/ is on sys.path when run as a script

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _measure(model: str, root: Path, warmup: int, repeats: int) -> dict[str, float]:
    from splitgate.edge import Gateway
    from splitgate.planner import build_bundle
    from splitgate.planner.zoo import export_zoo_model

    path = export_zoo_model(model, root / f"{model}.onnx")
    bundle = build_bundle(path, root / f"{model}.bundle", profile=False)
    (spec,) = bundle.inputs
    x = np.random.default_rng(0).standard_normal([d if d >= 0 else 1 for d in spec.shape]).astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    raw = ort.InferenceSession(str(bundle.model_path), opts, providers=["CPUExecutionProvider"])
    feeds = {spec.name: x}
    raw_ms: list[float] = []
    gw_ms: list[float] = []
    with Gateway([bundle], intra_op_threads=1) as gw:
        for i in range(warmup + repeats):
            # Interleave so both see the same machine load.
            t0 = time.perf_counter()
            raw.run(None, feeds)
            t1 = time.perf_counter()
            gw.infer(bundle.model_name, feeds)
            t2 = time.perf_counter()
            if i >= warmup:
                raw_ms.append((t1 - t0) * 1e3)
                gw_ms.append((t2 - t1) * 1e3)
    raw_p50 = statistics.median(raw_ms)
    gw_p50 = statistics.median(gw_ms)
    overhead = gw_p50 - raw_p50
    return {
        "raw_session_run_p50_ms": round(raw_p50, 4),
        "gateway_infer_p50_ms": round(gw_p50, 4),
        "overhead_ms": round(overhead, 4),
        "ratio": round(gw_p50 / raw_p50, 4),
        "within_bar": overhead <= 0.2 or gw_p50 / raw_p50 <= 1.05,
        "repeats": repeats,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet,resnet18")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=500)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {m: _measure(m, Path(tmp), args.warmup, args.repeats) for m in args.models.split(",")}
    doc = {"benchmark": "edge_overhead", "models": results}
    emit_json(doc, args.out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
