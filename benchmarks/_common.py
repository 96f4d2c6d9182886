"""Shared helpers for benchmarks: payload-sized suffix bundles, timing statistics."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["emit_json", "payload_bundle", "summarize", "SIZES"]

# Payload sizes of the cloud benchmark (bytes of the cut tensor in one request).
SIZES = {"4KB": 4 * 1024, "600KB": 600 * 1024, "3MB": 3 * 1024 * 1024}


def payload_bundle(root: Path, name: str, payload_bytes: int, *, out_features: int = 16, seed: int = 0):
    """A plan bundle whose cloud input is exactly ``payload_bytes`` of FP32.

    The model is ``y = relu(x @ W)`` with ``x: [batch, payload_bytes/4]`` (dynamic
    batch) and ``W: [payload_bytes/4, out_features]``: a weights-bound suffix like a
    classifier head, cheap per request, and one whose batched run reads ``W`` once
    for all rows (what dynamic batching buys on real suffixes).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from splitgate.planner import build_bundle

    k = payload_bytes // 4
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, out_features)) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out_features])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.onnx"
    onnx.save(model, path)
    return build_bundle(path, root / f"{name}.bundle", model_name=name)


def summarize(samples_ms: list[float]) -> dict[str, float]:
    """p50 / p99 / mean of latency samples in ms."""
    xs = sorted(samples_ms)
    if not xs:
        return {"n": 0}
    p99 = xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]
    return {
        "n": len(xs),
        "p50_ms": round(statistics.median(xs), 3),
        "p99_ms": round(p99, 3),
        "mean_ms": round(statistics.fmean(xs), 3),
    }


def emit_json(doc: Any, out: str | Path | None, *, indent: int = 1, **dumps: Any) -> str:
    """Print a benchmark's result as JSON and, with ``out``, write it there too
    (parent directories created). Returns the text."""
    text = json.dumps(doc, indent=indent, **dumps)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n", encoding="utf-8")
    return text
