"""The accuracy guard of lossy cut-tensor encodings, measured on calibration inputs.

An encoded candidate (``cut-K@int8``) runs the same suffix as its raw twin on
decoded cut tensors. The guard compares the suffix outputs on decoded tensors
with those on the raw tensors, over a set of calibration inputs:

* classifier outputs (float, rank 2, ``[batch, classes]`` with classes >= 2,
  or every output with ``output_kind="classifier"``): **top-1 agreement**, the
  fraction of samples whose argmax is unchanged;
* other float outputs: **cosine similarity** per sample (flattened; the guard
  uses the minimum over samples) and the **max relative error**
  ``max|y - y_raw| / max|y_raw|`` over the calibration set;
* integer/bool outputs: exact agreement (counted as top-1 agreement).

An encoding passes when every output passes; the thresholds are
:class:`Guard` fields (from :class:`splitgate.planner.PlanOptions`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitgate.planner._graph import TensorSpec, dummy_inputs
from splitgate.errors import InvalidArgument

__all__ = ["Guard", "Calibration", "load_calibration", "compare_outputs", "check"]

OUTPUT_KINDS = ("auto", "classifier", "other")


@dataclass(frozen=True)
class Guard:
    """Thresholds an encoding must meet on calibration inputs.

    Attributes:
        min_top1_agreement: classifier outputs: argmax unchanged on at least this fraction.
        min_cosine: other float outputs: per-sample cosine similarity at least this (worst sample).
        max_rel_error: other float outputs: ``max|y - y_raw| / max|y_raw|`` at most this (None = unchecked).
        output_kind: ``"auto"`` (rank-2 float outputs with >= 2 columns are
            classifier logits), ``"classifier"`` or ``"other"`` for every output.
    """

    min_top1_agreement: float = 0.99
    min_cosine: float = 0.999
    max_rel_error: float | None = None
    output_kind: str = "auto"

    def validate(self) -> None:
        """Raises InvalidArgument on a bad threshold."""
        if not 0.0 <= self.min_top1_agreement <= 1.0 or not -1.0 <= self.min_cosine <= 1.0:
            raise InvalidArgument("min_top1_agreement must be in [0, 1] and min_cosine in [-1, 1]")
        if self.max_rel_error is not None and self.max_rel_error < 0:
            raise InvalidArgument("max_rel_error must be >= 0 or None")
        if self.output_kind not in OUTPUT_KINDS:
            raise InvalidArgument(f"output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"min_top1_agreement": self.min_top1_agreement, "min_cosine": self.min_cosine,
                "max_rel_error": self.max_rel_error, "output_kind": self.output_kind}


@dataclass
class Calibration:
    """Calibration inputs split into requests of the planning batch.

    Attributes:
        requests: one feed dict per request (``batch`` rows each).
        source: where they came from (``"random"``, a file name or ``"arrays"``).
        samples: total rows.
    """

    requests: list[dict[str, np.ndarray]]
    source: str
    samples: int


def load_calibration(
    source: str | os.PathLike[str] | Mapping[str, np.ndarray] | None,
    inputs: Sequence[TensorSpec],
    *,
    samples: int = 32,
    batch: int = 1,
) -> Calibration:
    """Calibration requests for a model.

    Args:
        source: an ``.npz`` file or a mapping input name -> array with the
            samples along axis 0; None = ``samples`` seeded random requests
            (standard normal floats, zero integers: fine for timing and bytes,
            weak for accuracy — pass real inputs).
        inputs: the model's inputs.
        samples: rows to generate when ``source`` is None.
        batch: rows per request (dynamic batch dims only; a fixed batch dim wins).

    Returns:
        The :class:`Calibration`.

    Raises:
        InvalidArgument: unreadable file, a missing input, or inconsistent sample counts.
    """
    if source is None:
        reqs = [dummy_inputs(list(inputs), dynamic=batch, seed=10_000 + i) for i in range(max(1, samples))]
        return Calibration(reqs, "random", len(reqs) * batch)
    from splitgate.planner._shapes import read_arrays

    source, label = read_arrays(source, "calibration inputs")
    missing = [s.name for s in inputs if s.name not in source]
    if missing:
        raise InvalidArgument(f"calibration inputs lack {missing} (have {sorted(source)})")
    from splitgate.codec import numpy_dtype

    arrays = {s.name: np.asarray(source[s.name]).astype(numpy_dtype(s.datatype, tensor=s.name), copy=False)
              for s in inputs}
    counts = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
    if len(counts) != 1 or 0 in counts:
        raise InvalidArgument(f"calibration inputs need the same nonzero number of samples on axis 0, got {counts}")
    n = counts.pop()
    fixed = {s.shape[0] for s in inputs if s.shape and s.shape[0] >= 0}
    step = fixed.pop() if fixed else max(1, batch)
    reqs = [{k: a[i:i + step] for k, a in arrays.items()} for i in range(0, n - step + 1, step)]
    if not reqs:
        raise InvalidArgument(f"{n} calibration samples are fewer than one request of {step}")
    return Calibration(reqs, label, len(reqs) * step)


def _rows(a: Any) -> np.ndarray:
    """A tensor as ``[samples, features]`` (a scalar is one sample)."""
    a = np.asarray(a)
    return a.reshape(1, -1) if a.ndim == 0 else a.reshape(a.shape[0], int(np.prod(a.shape[1:], dtype=np.int64)))


def _is_classifier(a: np.ndarray, kind: str) -> bool:
    if kind == "classifier":
        return True
    if kind == "other":
        return False
    return a.dtype.kind == "f" and a.ndim == 2 and a.shape[1] >= 2


def compare_outputs(
    ref: Sequence[Mapping[str, np.ndarray]], got: Sequence[Mapping[str, np.ndarray]], *, output_kind: str = "auto"
) -> dict[str, dict[str, Any]]:
    """Per-output agreement of ``got`` with ``ref`` (same requests, same order).

    Returns:
        output name -> ``{"kind": "classifier"|"other"|"exact", "top1_agreement"
        (classifier/exact), "cosine_min", "cosine_mean", "max_rel_error" (floats)}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for name in ref[0]:
        r = np.concatenate([_rows(x[name]) for x in ref])
        g = np.concatenate([_rows(x[name]) for x in got])
        row: dict[str, Any] = {}
        if r.dtype.kind != "f":
            row["kind"] = "exact"
            row["top1_agreement"] = float(np.mean(np.all(r == g, axis=1)))
            out[name] = row
            continue
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        if _is_classifier(np.asarray(ref[0][name]), output_kind) and r.shape[1] >= 2:
            row["kind"] = "classifier"
            row["top1_agreement"] = float(np.mean(r64.argmax(axis=1) == g64.argmax(axis=1)))
        else:
            row["kind"] = "other"
        nr, ng = np.linalg.norm(r64, axis=1), np.linalg.norm(g64, axis=1)
        dot = np.sum(r64 * g64, axis=1)
        both_zero = (nr == 0) & (ng == 0)
        cos = np.clip(np.where(both_zero, 1.0, dot / np.maximum(nr * ng, 1e-300)), -1.0, 1.0)
        cos = np.where(np.all(r64 == g64, axis=1), 1.0, cos)  # identical rows: exactly 1, not 1 - ulp
        row["cosine_min"] = float(cos.min())
        row["cosine_mean"] = float(cos.mean())
        scale = float(np.abs(r64).max())
        err = float(np.abs(r64 - g64).max())
        row["max_rel_error"] = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
        out[name] = row
    return out


def check(metrics: Mapping[str, Mapping[str, Any]], guard: Guard) -> str | None:
    """None if every output passes ``guard``, else the reason it fails."""
    for name, m in metrics.items():
        if m["kind"] in ("classifier", "exact"):
            if m["top1_agreement"] < guard.min_top1_agreement:
                return (f"output '{name}': top-1 agreement {m['top1_agreement']:.4f} "
                        f"< {guard.min_top1_agreement:g}")
            continue
        if m["cosine_min"] < guard.min_cosine:
            return f"output '{name}': cosine similarity {m['cosine_min']:.6f} < {guard.min_cosine:g}"
        if guard.max_rel_error is not None and m["max_rel_error"] > guard.max_rel_error:
            return f"output '{name}': max relative error {m['max_rel_error']:.4g} > {guard.max_rel_error:g}"
    return None
