"""Pretrained models exported by other projects, planned as a user would.

Runs when ``SPLITGATE_REAL_MODELS`` names the directory that
``../shared/real-models.sh DIR`` fills (a CRNN text recognizer with a dynamic
width, a YOLOX detector, an int32 byte-level classifier); skipped otherwise, so
the suite never needs them. Every partition of each plan must equal the
original model in onnxruntime at the planned shape and at other valid shapes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from splitgate.planner import DynamicShapeError, PlanBundle, build_bundle

ROOT = Path(os.environ.get("SPLITGATE_REAL_MODELS", "/nonexistent"))
pytestmark = pytest.mark.skipif(not (ROOT / ".complete").is_file(),
                                reason="set SPLITGATE_REAL_MODELS to a directory filled by shared/real-models.sh")
FAST = {"repeats": 2, "warmup": 1, "encodings": ("raw",)}

# file, --input-shape values to plan at, shapes to check (planned + others)
CASES = {
    "crnn_text_dynamic_width.onnx": (["input1=1x1x64x256", "input1=1x1x64x512"],
                                     [(1, 1, 64, 256), (1, 1, 64, 100), (1, 1, 64, 1024)]),
    "yolox_detector_416.onnx": (None, [(1, 3, 416, 416)]),
    "bytes_cnn_int32.onnx": (None, [(1, 2048), (4, 2048)]),
}


def _feeds(session: ort.InferenceSession, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    (inp,) = session.get_inputs()
    rng = np.random.default_rng(sum(shape))
    if "int" in inp.type:
        return {inp.name: rng.integers(0, 256, shape).astype(np.int32)}
    return {inp.name: rng.random(shape).astype(np.float32)}


def _run(bundle: PlanBundle, pid: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    part = bundle.partition(pid)
    cut = dict(feeds)
    if part.prefix_path is not None:
        pre = ort.InferenceSession(str(part.prefix_path))
        cut = dict(zip([o.name for o in pre.get_outputs()], pre.run(None, feeds)))
    if part.suffix_path is None:
        return [cut[o.name] for o in bundle.outputs]
    suf = ort.InferenceSession(str(part.suffix_path))
    return suf.run([o.name for o in bundle.outputs], {i.name: cut[i.name] for i in suf.get_inputs()})


def test_dynamic_width_needs_a_shape() -> None:
    with pytest.raises(DynamicShapeError, match="image_width"):
        build_bundle(ROOT / "crnn_text_dynamic_width.onnx", Path("/nonexistent/bundle"), **FAST)


@pytest.mark.parametrize("name", list(CASES))
def test_every_partition_equals_the_original_at_real_sizes(name: str, tmp_path: Path) -> None:
    shapes_flag, check = CASES[name]
    bundle = build_bundle(ROOT / name, tmp_path / "b", input_shapes=shapes_flag, **FAST)
    original = ort.InferenceSession(str(ROOT / name))
    for shape in check:
        feeds = _feeds(original, shape)
        expected = original.run([o.name for o in bundle.outputs], feeds)
        assert bundle.costs({k: v.shape for k, v in feeds.items()})["cloud"]["up_bytes"] == feeds[next(iter(feeds))].nbytes
        for pid in bundle.partitions:
            for got, want in zip(_run(bundle, pid, feeds), expected):
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"{name} {pid} at {shape}")
