"""Realistic split traffic: which (model, partition) to call, and what to send.

A load test of the cloud tier should look like the edge calling it: for a split
partition the request carries the *cut tensors* the device prefix produced, for
``cloud`` the model's own inputs. :func:`record_traffic` builds that traffic
from plan bundles: it runs each partition's ``prefix.onnx`` in onnxruntime on
seeded inputs and keeps the resulting OIP ``ModelInferRequest`` messages, which
the locust users then replay. Nothing here imports locust, gevent or Ray.

Mix syntax (``--mix``): comma-separated ``PARTITION:WEIGHT`` or
``MODEL/PARTITION:WEIGHT`` items, e.g. ``"cut-3:3,cloud:1"``. A bare partition
applies to every bundle that has it; the weight defaults to 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from splitgate import codec
from splitgate.errors import InvalidArgument
from splitgate.protocol import inference_pb2 as pb
from splitgate import contract

if TYPE_CHECKING:
    from splitgate.planner import PlanBundle, TensorSpec

__all__ = [
    "MixItem",
    "Traffic",
    "parse_mix",
    "default_mix",
    "resolve_mix",
    "record_traffic",
    "save_traffic",
    "load_traffic",
]

PARAM_PARTITION = contract.PARTITION
PARAM_PLAN_DIGEST = contract.PLAN_DIGEST
# Size given to dynamic dimensions other than the batch axis (e.g. sequence length).
DYNAMIC_DIM = 8


@dataclass(frozen=True)
class MixItem:
    """One entry of a traffic mix: ``model`` None means "every bundle that has it"."""

    model: str | None
    partition: str
    weight: float


@dataclass
class Traffic:
    """Recorded requests for one (model, partition), replayed round-robin.

    Attributes:
        model: served model name.
        partition: partition id (``cloud`` or ``cut-K``).
        weight: relative share of the load.
        requests: serialized ``ModelInferRequest`` messages (one per seeded sample).
        tensor_bytes: tensor payload bytes of one request.
    """

    model: str
    partition: str
    weight: float
    requests: list[bytes]
    tensor_bytes: int

    @property
    def name(self) -> str:
        """The locust request name: ``model/partition``."""
        return f"{self.model}/{self.partition}"

    def messages(self) -> list[pb.ModelInferRequest]:
        """Parse the recorded requests (do it once, not per call)."""
        return [pb.ModelInferRequest.FromString(raw) for raw in self.requests]


def parse_mix(text: str) -> list[MixItem]:
    """Parse ``"cut-3:3,cloud:1"`` / ``"mobilenet/cut-3:2"`` into mix items.

    Raises:
        InvalidArgument: an empty item, a bad or non-positive weight.
    """
    items: list[MixItem] = []
    for raw in text.split(","):
        raw = raw.strip()
        if not raw:
            continue
        target, sep, weight_text = raw.rpartition(":")
        if not sep:
            target, weight_text = raw, "1"
        try:
            weight = float(weight_text)
        except ValueError:
            raise InvalidArgument(f"--mix item {raw!r}: weight {weight_text!r} is not a number") from None
        if not weight > 0:
            raise InvalidArgument(f"--mix item {raw!r}: weight must be > 0")
        model, slash, partition = target.rpartition("/")
        if not partition:
            raise InvalidArgument(f"--mix item {raw!r}: no partition named")
        items.append(MixItem(model if slash else None, partition, weight))
    if not items:
        raise InvalidArgument(f"--mix {text!r} names no partition")
    return items


def default_mix(bundles: Sequence[PlanBundle]) -> list[MixItem]:
    """``cloud`` plus the first, middle and last split of every bundle, equal weights."""
    items: list[MixItem] = []
    for bundle in bundles:
        splits = [p.id for p in bundle.partitions.values() if p.kind == "split"]
        picks = ["cloud"]
        for i in (0, len(splits) // 2, len(splits) - 1) if splits else ():
            if splits[i] not in picks:
                picks.append(splits[i])
        items += [MixItem(bundle.model_name, pid, 1.0) for pid in picks]
    return items


def resolve_mix(bundles: Sequence[PlanBundle], mix: Sequence[MixItem]) -> list[tuple[PlanBundle, str, float]]:
    """Match mix items to bundles: ``[(bundle, partition_id, weight)]``.

    Raises:
        InvalidArgument: an unknown model, a partition no bundle has, or a
            ``device`` partition (it never reaches the cloud).
    """
    by_name = {b.model_name: b for b in bundles}
    out: list[tuple[PlanBundle, str, float]] = []
    for item in mix:
        if item.model is not None and item.model not in by_name:
            raise InvalidArgument(f"--mix names model {item.model!r}; loaded bundles: {sorted(by_name)}")
        targets = [by_name[item.model]] if item.model is not None else list(by_name.values())
        matched = [b for b in targets if item.partition in b.partitions]
        if not matched:
            valid = sorted({p for b in targets for p in b.partitions})
            raise InvalidArgument(f"--mix names partition {item.partition!r}, which no bundle has; valid: {valid}")
        for bundle in matched:
            if bundle.partitions[item.partition].suffix_path is None:
                raise InvalidArgument(
                    f"--mix names {bundle.model_name}/{item.partition}, which runs entirely on the device "
                    "and sends nothing to the cloud"
                )
            out.append((bundle, item.partition, item.weight))
    return out


def _seeded_inputs(specs: Sequence[TensorSpec], batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = [d if d >= 0 else (batch if axis == 0 else DYNAMIC_DIM) for axis, d in enumerate(spec.shape)]
        dtype = codec.numpy_dtype(spec.datatype, tensor=spec.name)
        if dtype.kind == "f":
            arr = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            arr = rng.integers(0, 2, size=shape).astype(dtype)
        else:  # integer inputs are typically ids / indices: keep them small and valid
            arr = rng.integers(0, 10, size=shape).astype(dtype)
        feeds[spec.name] = arr
    return feeds


def record_traffic(
    bundle_dirs: Sequence[str | os.PathLike[str]],
    mix: Sequence[MixItem] | None = None,
    *,
    batch: int = 1,
    samples: int = 4,
    seed: int = 0,
) -> list[Traffic]:
    """Build the requests the edge would send for every (model, partition) of ``mix``.

    For each of ``samples`` seeded model inputs, a split partition's request
    holds that partition's prefix outputs (run in onnxruntime), a ``cloud``
    request the inputs themselves. Requests carry the partition and plan digest
    parameters, as the edge gateway sends them.

    Raises:
        InvalidArgument: bad mix (see :func:`resolve_mix`), ``batch``/``samples`` < 1.
        splitgate.errors.BundleError: a bundle fails its integrity check.
    """
    import onnxruntime as ort

    from splitgate.planner import PlanBundle

    if batch < 1 or samples < 1:
        raise InvalidArgument(f"batch and samples must be >= 1 (got batch={batch}, samples={samples})")
    bundles = [PlanBundle.load(d) for d in bundle_dirs]
    if not bundles:
        raise InvalidArgument("no plan bundles given")
    plan = resolve_mix(bundles, list(mix) if mix else default_mix(bundles))
    traffic: list[Traffic] = []
    for bundle, pid, weight in plan:
        part = bundle.partitions[pid]
        session = None
        if part.prefix_path is not None:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            session = ort.InferenceSession(str(part.prefix_path), opts, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(seed)
        requests: list[bytes] = []
        tensor_bytes = 0
        for _ in range(samples):
            feeds = _seeded_inputs(bundle.inputs, batch, rng)
            if session is None:
                tensors = feeds
            else:
                names = [t.name for t in part.cut_tensors]
                tensors = dict(zip(names, session.run(names, feeds)))
            request = pb.ModelInferRequest(model_name=bundle.model_name)
            codec.set_params(
                request.parameters, {PARAM_PARTITION: pid, PARAM_PLAN_DIGEST: bundle.plan_digest}
            )
            tensor_bytes = codec.add_inputs(request, tensors)
            requests.append(request.SerializeToString())
        traffic.append(Traffic(bundle.model_name, pid, weight, requests, tensor_bytes))
    return traffic


def save_traffic(traffic: Sequence[Traffic], path: str | os.PathLike[str]) -> Path:
    """Write recorded traffic to one ``.npz`` file (index as JSON + request bytes)."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    index = []
    for i, t in enumerate(traffic):
        keys = []
        for j, raw in enumerate(t.requests):
            key = f"r{i}_{j}"
            arrays[key] = np.frombuffer(raw, dtype=np.uint8)
            keys.append(key)
        index.append(
            {"model": t.model, "partition": t.partition, "weight": t.weight, "tensor_bytes": t.tensor_bytes, "keys": keys}
        )
    arrays["index"] = np.frombuffer(json.dumps(index).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def load_traffic(path: str | os.PathLike[str]) -> list[Traffic]:
    """Read traffic written by :func:`save_traffic`.

    Raises:
        InvalidArgument: the file is missing or not a traffic file.
    """
    try:
        with np.load(path) as data:
            index = json.loads(data["index"].tobytes())
            return [
                Traffic(
                    e["model"], e["partition"], float(e["weight"]),
                    [data[k].tobytes() for k in e["keys"]], int(e["tensor_bytes"]),
                )
                for e in index
            ]
    except (OSError, KeyError, ValueError) as exc:
        raise InvalidArgument(f"{path}: not a recorded traffic file ({exc})") from None
