"""Drift monitoring on the trained resnet18 of the zoo: what the hook costs, and the scores
of unchanged, brightened and noisy traffic.

    .venv/bin/python benchmarks/bench_drift.py [--windows 3] [--out FILE]

Plans the trained resnet18 (gratings10, cached weights) with 256 calibration
images, then through a real device-only Gateway: per request, the cost of the
copy taken on the request's thread and of the binning the drift worker does
(medians of 7 runs of 1,000 after warm-up), and the drift score after 256
requests of in-distribution images, the same brightened by +0.15 (pixel scale)
and with Gaussian pixel noise of sigma 0.15, for ``--windows`` seeds. Prints JSON.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _common import emit_json  # noqa: E402 - benchmarks/ is on sys.path when run as a script


def _median_us(f: Callable[[], object], n: int = 1000) -> float:
    f()
    runs = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(n):
            f()
        runs.append((time.perf_counter() - t) / n * 1e6)
    return round(statistics.median(runs), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    from splitgate.edge import Gateway
    from splitgate.planner import build_bundle
    from splitgate.planner._zoo_train import gratings10
    from splitgate.planner.zoo import calibration_inputs, export_zoo_model

    root = Path(tempfile.mkdtemp(prefix="bench-drift-"))
    model = export_zoo_model("resnet18", root / "resnet18.onnx", trained=True)
    bundle = build_bundle(model, root / "bundle", profile=False,
                          calibration={"input": calibration_inputs(256)["input"]})
    out: dict[str, object] = {"benchmark": "drift", "model": "resnet18", "reference_requests": 256, "window": 256}
    with Gateway([bundle]) as gw:
        x = gratings10(1, seed=5)[0]
        result = gw.infer("resnet18", {"input": x})
        ref = bundle.reference
        monitor = gw._core.telemetry.drift.monitor(bundle)
        ins, outs = ref.sample({"input": x}, result.outputs)
        out["request_thread_copy_us"] = _median_us(lambda: ref.sample({"input": x}, result.outputs))
        out["worker_binning_us"] = _median_us(lambda: monitor.observe(ins, outs))
        out["score_us"] = _median_us(lambda: monitor.report(), 200)
        shifts = {
            "in_distribution": lambda a, rng: a,
            "brightness_+0.15": lambda a, rng: a + 0.5,  # inputs are (pixel - 0.5) / 0.3
            "noise_sigma_0.15": lambda a, rng: a + rng.normal(0, 0.5, a.shape).astype(np.float32),
        }
        scores: dict[str, list[dict[str, object]]] = {k: [] for k in shifts}
        for w in range(args.windows):
            for name, shift in shifts.items():
                with Gateway([bundle]) as fresh:
                    xs = gratings10(256, seed=100 + w)[0]
                    rng = np.random.default_rng(w)
                    for i in range(len(xs)):
                        fresh.infer("resnet18", {"input": shift(xs[i:i + 1], rng)})
                    r = fresh.drift("resnet18")
                    scores[name].append({"score": r.score, "signal": r.signal})
        out["scores"] = scores
    emit_json(out, args.out, indent=2)


if __name__ == "__main__":
    main()
