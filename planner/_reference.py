"""Reference statistics for drift detection, recorded at plan time from the calibration inputs.

A bundle planned with real inputs (``calibration`` or ``samples``) carries
``reference.json``: what the model's inputs and outputs looked like when it was
planned. The edge keeps the same statistics over a sliding window of recent
requests and compares them (:mod:`splitgate.edge._drift`). Both sides bin a
request with :meth:`ReferenceStats.request_counts`, so plan time and run time
count the same way.

Signals (``signal`` names, also the Prometheus label values):

* ``input:<name>``: the values of an input's elements, sub-sampled
  (:func:`subsample`: at most :data:`ELEMENTS_PER_REQUEST` per request, a fixed
  odd stride), in quantile bins of the reference values;
* ``input_mean:<name>`` / ``input_std:<name>``: the per-request mean and
  standard deviation of those sub-sampled elements (a brightness shift moves
  the mean, added noise the standard deviation), in quantile bins;
* ``confidence:<name>``: for a classifier-shaped output (float ``[N, C]``,
  ``C >= 2``), the top-1 confidence of each row (a softmax first when the rows
  are logits, i.e. not already probabilities), in quantile bins;
* ``class:<name>``: the predicted class (argmax) of each row. The reference
  keeps the full class histogram; the classes are grouped into at most as many
  bins of about equal reference mass as the sample size supports, so a window
  of a few hundred requests is not dominated by sampling noise over many
  rarely seen classes.

Bin counts follow the reference sample: ``clamp(n // 50, 2, 10)`` for ``n``
reference requests (or rows), 10 for element values. Generated (random)
calibration inputs say nothing about real traffic: no reference is recorded
from them (drift is then unavailable on the edge).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitgate.errors import BundleError

__all__ = [
    "ELEMENTS_PER_REQUEST",
    "MAX_BINS",
    "REFERENCE_FILE",
    "ReferenceStats",
    "Signal",
    "build_reference",
    "reference_from_model",
    "subsample",
    "top1",
]

REFERENCE_FILE = "reference.json"
SCHEMA = 1
#: elements of each input sampled per request (plan time and run time alike).
ELEMENTS_PER_REQUEST = 256
#: at most this many bins per signal.
MAX_BINS = 10
#: at most this many calibration requests are run for the reference.
MAX_REQUESTS = 512
_KINDS = ("elements", "mean", "std", "confidence", "class")


def subsample(a: np.ndarray, k: int = ELEMENTS_PER_REQUEST) -> np.ndarray:
    """At most ``k`` elements of ``a`` as float64, taken at a fixed odd stride (deterministic, cheap:
    a strided view of the flattened array, so rows and channels are all visited)."""
    flat = np.asarray(a).reshape(-1)
    stride = max(1, flat.size // k) | 1
    return flat[::stride][:k].astype(np.float64, copy=False)


def _moments(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``(x, mean, std)`` of sub-sampled elements (std as numpy's, population)."""
    if x.size == 0:
        return x, 0.0, 0.0
    m = float(x.mean())
    d = x - m
    return x, m, math.sqrt(float(d @ d) / x.size)


def _is_probabilities(rows: np.ndarray) -> bool:
    return bool(rows.size) and float(rows.min()) >= 0.0 and float(rows.max()) <= 1.0 and bool(
        np.allclose(rows.sum(axis=1), 1.0, atol=1e-3))


def top1(out: np.ndarray, softmax: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 confidence and class of each row of a ``[N, C]`` output (softmax first when ``softmax``)."""
    rows = np.asarray(out, dtype=np.float64)
    cls = rows.argmax(axis=1)
    if softmax:
        z = rows - rows.max(axis=1, keepdims=True)
        conf = 1.0 / np.exp(z).sum(axis=1)  # the max's probability: exp(0) / sum(exp(z))
    else:
        conf = rows[np.arange(rows.shape[0]), cls]
    return conf, cls


def _classifier_shaped(a: np.ndarray) -> bool:
    return a.dtype.kind == "f" and a.ndim == 2 and a.shape[1] >= 2


def _bins_for(n: int) -> int:
    return int(min(MAX_BINS, max(2, n // 50)))


def _quantile_edges(values: np.ndarray, bins: int) -> list[float]:
    """Inner edges of ``bins`` quantile bins (duplicates merged; rounded to 6 significant digits)."""
    if values.size == 0:
        return []
    qs = np.quantile(values, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    return sorted({float(f"{q:.6g}") for q in qs})


@dataclass(frozen=True)
class Signal:
    """One binned statistic of the reference.

    Attributes:
        name: ``input:x``, ``input_mean:x``, ``input_std:x``, ``confidence:y`` or ``class:y``.
        kind: ``elements``, ``mean``, ``std``, ``confidence`` or ``class``.
        tensor: the input or output it reads.
        freq: reference frequency of each bin (sums to 1).
        edges: inner bin edges (quantile bins; empty for ``class``).
        groups: ``class`` only: the bin of each class id (classes beyond the list: the last bin).
        softmax: ``confidence``/``class``: the output holds logits (a softmax is applied).
    """

    name: str
    kind: str
    tensor: str
    freq: tuple[float, ...]
    edges: tuple[float, ...] = ()
    groups: tuple[int, ...] = ()
    softmax: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "_edges", np.asarray(self.edges, dtype=np.float64))
        object.__setattr__(self, "_groups", np.asarray(self.groups, dtype=np.int64))

    @property
    def bins(self) -> int:
        """Number of bins."""
        return len(self.freq)

    def count(self, values: np.ndarray) -> np.ndarray:
        """Counts of ``values`` in this signal's bins (int64, length :attr:`bins`)."""
        if self.kind == "class":
            ids = np.asarray(values, dtype=np.int64).reshape(-1)
            groups = self._groups  # type: ignore[attr-defined]
            idx = np.full(ids.shape, self.bins - 1, dtype=np.int64)  # classes the reference never listed
            known = (ids >= 0) & (ids < groups.size)
            idx[known] = groups[ids[known]]
        else:
            idx = np.searchsorted(self._edges, values, side="right")  # type: ignore[attr-defined]
        return np.bincount(idx, minlength=self.bins)[: self.bins]

    def count_one(self, value: float) -> np.ndarray:
        """Counts of one value (a request's mean or std): a one-hot vector."""
        out = np.zeros(self.bins, dtype=np.int64)
        out[bisect.bisect_right(self.edges, value)] = 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        d: dict[str, Any] = {"kind": self.kind, "tensor": self.tensor, "freq": list(self.freq)}
        if self.kind == "class":
            d["groups"] = list(self.groups)
        else:
            d["edges"] = list(self.edges)
        if self.kind in ("confidence", "class"):
            d["softmax"] = self.softmax
        return d

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> Signal:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: an unknown kind or inconsistent bins.
        """
        kind = str(d["kind"])
        if kind not in _KINDS:
            raise ValueError(f"signal {name!r}: unknown kind {kind!r}")
        sig = cls(name, kind, str(d["tensor"]), tuple(float(f) for f in d["freq"]),
                  tuple(float(e) for e in d.get("edges", ())), tuple(int(g) for g in d.get("groups", ())),
                  bool(d.get("softmax", False)))
        if not sig.freq or (kind != "class" and len(sig.edges) + 1 != len(sig.freq)):
            raise ValueError(f"signal {name!r}: {len(sig.edges)} edges for {len(sig.freq)} bins")
        if kind == "class" and any(not 0 <= g < len(sig.freq) for g in sig.groups):
            raise ValueError(f"signal {name!r}: a class group outside its {len(sig.freq)} bins")
        return sig


@dataclass(frozen=True)
class ReferenceStats:
    """The reference statistics of one plan (``reference.json``).

    Attributes:
        signals: signal name -> :class:`Signal`, inputs first.
        source: where the inputs came from (a file name, ``"--sample"``, ``"arrays"``).
        requests: calibration requests the statistics were taken over.
        summary: per input ``{"mean", "std", "min", "max"}`` of the sub-sampled elements,
            and per classifier output ``{"classes", "histogram", "mean_confidence"}`` (for people).
    """

    signals: dict[str, Signal]
    source: str
    requests: int
    summary: dict[str, Any]

    def sample(self, feeds: Mapping[str, Any], outputs: Mapping[str, Any]) -> tuple[dict[str, np.ndarray],
                                                                                 dict[str, np.ndarray]]:
        """What :meth:`request_counts` reads of a request, copied (a few hundred elements per input,
        the classifier outputs): cheap to take on the request's thread, safe to bin later on another
        (the caller may reuse its arrays). ``request_counts`` of the sample equals that of the request."""
        ins = {t: subsample(feeds[t]).copy() for t in self._tensors("in") if t in feeds}
        outs = {t: np.array(outputs[t], copy=True) for t in self._tensors("out")
                if t in outputs and _classifier_shaped(np.asarray(outputs[t]))}
        return ins, outs

    def __post_init__(self) -> None:
        for side, inputs in (("in", True), ("out", False)):
            tensors = sorted({s.tensor for s in self.signals.values()
                              if (s.kind in ("elements", "mean", "std")) == inputs})
            object.__setattr__(self, f"_{side}", tensors)

    def _tensors(self, side: str) -> list[str]:
        return getattr(self, f"_{side}")

    def request_counts(self, feeds: Mapping[str, Any], outputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Bin one request: signal name -> counts per bin. Tensors a signal reads that are
        missing (or of another shape kind) are skipped."""
        out: dict[str, np.ndarray] = {}
        per_tensor: dict[Any, Any] = {}
        for name, sig in self.signals.items():
            if sig.kind in ("elements", "mean", "std"):
                x = per_tensor.get(sig.tensor)
                if x is None:
                    if sig.tensor not in feeds:
                        continue
                    x = per_tensor[sig.tensor] = _moments(subsample(feeds[sig.tensor]))
                if x[0].size == 0:
                    continue
                if sig.kind == "elements":
                    out[name] = sig.count(x[0])
                else:
                    out[name] = sig.count_one(x[1] if sig.kind == "mean" else x[2])
                continue
            key = (sig.tensor, "top1")
            if key not in per_tensor:
                y = outputs.get(sig.tensor)
                per_tensor[key] = top1(np.asarray(y), sig.softmax) if y is not None and _classifier_shaped(
                    np.asarray(y)) else None
            if per_tensor[key] is None:
                continue
            conf, cls = per_tensor[key]
            out[name] = sig.count(conf if sig.kind == "confidence" else cls)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``reference.json``)."""
        return {"schema": SCHEMA, "source": self.source, "requests": self.requests,
                "elements_per_request": ELEMENTS_PER_REQUEST, "summary": self.summary,
                "signals": {n: s.to_dict() for n, s in self.signals.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = REFERENCE_FILE) -> ReferenceStats:
        """Inverse of :meth:`to_dict`.

        Raises:
            BundleError: an unsupported schema or a malformed document (the message names ``where``).
        """
        try:
            if data.get("schema") != SCHEMA:
                raise ValueError(f"schema {data.get('schema')!r} is not supported (this code reads {SCHEMA})")
            if int(data.get("elements_per_request", ELEMENTS_PER_REQUEST)) != ELEMENTS_PER_REQUEST:
                raise ValueError("sampled with another elements_per_request")
            signals = {str(n): Signal.from_dict(str(n), s) for n, s in data["signals"].items()}
            return cls(signals, str(data.get("source", "")), int(data["requests"]), dict(data.get("summary", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"{where}: malformed drift reference ({exc})") from None


def _binned(name: str, kind: str, tensor: str, values: np.ndarray, bins: int, **extra: Any) -> Signal:
    edges = tuple(_quantile_edges(values, bins))
    counts = np.bincount(np.searchsorted(np.asarray(edges), values, side="right"), minlength=len(edges) + 1)
    freq = tuple(float(f"{c / max(values.size, 1):.6g}") for c in counts)
    return Signal(name, kind, tensor, freq, edges, **extra)


def _class_signal(name: str, tensor: str, cls: np.ndarray, classes: int, softmax: bool) -> tuple[Signal, list[int]]:
    """The class histogram, classes grouped into at most ``_bins_for(rows)`` bins of about equal mass."""
    hist = np.bincount(cls, minlength=classes)[:classes]
    bins = min(_bins_for(cls.size), classes)
    order = sorted(range(classes), key=lambda c: (-hist[c], c))
    groups = [bins - 1] * classes
    total, acc, g = max(int(hist.sum()), 1), 0, 0
    for c in order:
        groups[c] = g
        acc += int(hist[c])
        if g < bins - 1 and acc >= (g + 1) * total / bins:
            g += 1
    counts = np.bincount(np.asarray(groups)[cls], minlength=bins)[:bins]
    freq = tuple(float(f"{n / total:.6g}") for n in counts)
    return Signal(name, "class", tensor, freq, groups=tuple(groups), softmax=softmax), [int(h) for h in hist]


def build_reference(
    requests: Sequence[Mapping[str, np.ndarray]], outputs: Sequence[Mapping[str, np.ndarray]], source: str,
) -> ReferenceStats | None:
    """The reference statistics of calibration ``requests`` and the model's ``outputs`` on them.

    Args:
        requests: input name -> array, one dict per request.
        outputs: output name -> array for the same requests, in order.
        source: where the requests came from (recorded).

    Returns:
        The :class:`ReferenceStats`, or None when no signal could be taken
        (no numeric input or classifier output, no request).
    """
    if not requests:
        return None
    signals: dict[str, Signal] = {}
    summary: dict[str, Any] = {}
    n = len(requests)
    for name in requests[0]:
        if np.asarray(requests[0][name]).dtype.kind not in "fiu":
            continue
        samples = [subsample(r[name]) for r in requests]
        if not any(s.size for s in samples):
            continue
        pooled = np.concatenate(samples)
        moments = [_moments(s) for s in samples if s.size]
        means = np.array([m[1] for m in moments])
        stds = np.array([m[2] for m in moments])
        signals[f"input:{name}"] = _binned(f"input:{name}", "elements", name, pooled, MAX_BINS)
        signals[f"input_mean:{name}"] = _binned(f"input_mean:{name}", "mean", name, means, _bins_for(n))
        signals[f"input_std:{name}"] = _binned(f"input_std:{name}", "std", name, stds, _bins_for(n))
        summary[name] = {k: float(f"{v:.6g}") for k, v in (("mean", pooled.mean()), ("std", pooled.std()),
                                                            ("min", pooled.min()), ("max", pooled.max()))}
    for name in outputs[0] if outputs else ():
        ys = [np.asarray(o[name]) for o in outputs]
        if not all(_classifier_shaped(y) for y in ys):
            continue
        rows = np.concatenate(ys).astype(np.float64)
        softmax = not _is_probabilities(rows)
        conf, cls = top1(rows, softmax)
        signals[f"confidence:{name}"] = _binned(f"confidence:{name}", "confidence", name, conf,
                                                _bins_for(conf.size), softmax=softmax)
        sig, hist = _class_signal(f"class:{name}", name, cls, rows.shape[1], softmax)
        signals[sig.name] = sig
        summary[name] = {"classes": rows.shape[1], "histogram": hist,
                         "mean_confidence": float(f"{conf.mean():.6g}"), "softmax": softmax}
    if not signals:
        return None
    return ReferenceStats(signals, source, n, summary)


def reference_from_model(model_bytes: bytes, requests: Sequence[Mapping[str, np.ndarray]],
                         source: str) -> ReferenceStats | None:
    """Run the model (onnxruntime, CPU, one thread: deterministic) on at most
    :data:`MAX_REQUESTS` calibration requests and take their reference statistics.

    Raises:
        BundleError: onnxruntime cannot load the model.
        InvalidArgument: the model fails on a calibration request.
    """
    import onnxruntime as ort

    from splitgate._ort_errors import clean_reason
    from splitgate.errors import InvalidArgument

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4
    try:
        session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises several types
        raise BundleError(f"onnxruntime cannot load the model: {clean_reason(str(exc))[2]}") from None
    names = [o.name for o in session.get_outputs()]
    reqs = list(requests)[:MAX_REQUESTS]
    outs = []
    for i, r in enumerate(reqs):
        try:
            outs.append(dict(zip(names, session.run(None, dict(r)))))
        except Exception as exc:  # noqa: BLE001 - any ORT failure is reported the same way
            raise InvalidArgument(f"the model fails on calibration request {i} ({source}): "
                                  f"{clean_reason(str(exc))[2]}") from None
    return build_reference(reqs, outs, source)
