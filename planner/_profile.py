"""Profiling by measurement: per-node estimates and measured partition sessions.

Two levels, as QDMP warns that summed per-layer latencies are not the
latency of the fused blocks a runtime actually executes:

1. :func:`profile_nodes` — the fast estimate. One onnxruntime session of the
   full model with ``SessionOptions.enable_profiling``; each kernel's time in
   the profile JSON is attributed to the graph node it came from (ORT renames
   fused kernels, e.g. ``conv_nchwc``; times it cannot attribute by name are
   spread over the attributed ones). The sum over a prefix estimates it.
2. :func:`time_partition` — the real thing. The actual prefix and suffix models
   of a partition run in their own sessions (warm-up, repeats, median and
   10th/90th percentiles); :func:`time_partitions` measures several
   partitions interleaved, round by round, so load drift hits them alike.

Device and cloud are profiled separately: the device side with its own thread
count and an optional slowdown factor, or from a :class:`NodeProfile` measured
on a real device and saved as JSON (``NodeProfile.save``/``load``), so a phone
can be profiled once and its model planned anywhere.
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from splitgate.planner._graph import ModelGraph, dummy_inputs
from splitgate.errors import BundleError, InvalidArgument

__all__ = ["Timing", "NodeProfile", "profile_nodes", "time_session", "time_partition", "time_partitions", "make_session"]

_FUSED_SUFFIX = re.compile(r"(_nchwc|_token_\d+|_fused|_bn|_mul|_add|_relu)$")


@dataclass(frozen=True)
class Timing:
    """Repeated-run timing of one session.

    Attributes:
        median_ms: median run time.
        p10_ms: 10th percentile.
        p90_ms: 90th percentile (p90/p10 is the spread).
        runs: measured runs (after warm-up).
        p25_ms: lower quartile: what the planner uses as the session's time
            (:attr:`typical_ms`).
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    p25_ms: float | None = None

    @property
    def typical_ms(self) -> float:
        """The time the planner costs a session at: the lower quartile.

        On a machine shared with other work a run that is preempted takes a
        whole scheduler slice longer (a 0.5 ms run becomes 10 ms); once a third
        or more of the runs are hit, the median jumps by an order of magnitude
        from one planning run to the next, and a device slowdown multiplies
        that. The lower quartile stays put until three quarters of the runs
        are hit, and is within the run-to-run spread of the median on a quiet
        machine. Falls back to the median for timings saved without it.
        """
        return self.median_ms if self.p25_ms is None else self.p25_ms

    def to_dict(self) -> dict[str, Any]:
        """JSON form (ms rounded to µs)."""
        d: dict[str, Any] = {
            "median_ms": round(self.median_ms, 4),
            "p10_ms": round(self.p10_ms, 4),
            "p90_ms": round(self.p90_ms, 4),
            "runs": self.runs,
        }
        if self.p25_ms is not None:
            d["p25_ms"] = round(self.p25_ms, 4)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Timing:
        """Inverse of :meth:`to_dict`."""
        p25 = d.get("p25_ms")
        return cls(float(d["median_ms"]), float(d["p10_ms"]), float(d["p90_ms"]), int(d["runs"]),
                   None if p25 is None else float(p25))

    @classmethod
    def of(cls, samples_ms: list[float]) -> Timing:
        """Summarise samples (at least one)."""
        xs = sorted(samples_ms)
        q = lambda f: xs[min(len(xs) - 1, max(0, int(round(f * (len(xs) - 1)))))]  # noqa: E731
        return cls(statistics.median(xs), q(0.1), q(0.9), len(xs), q(0.25))


@dataclass
class NodeProfile:
    """Per-node times of one model on one machine (the fast estimate).

    Attributes:
        node_ms: node name -> ms per run (fused kernels attributed to a node
            they came from; nodes fused away or constant-folded have 0).
        total_ms: median measured time of the whole model.
        threads: intra-op threads of the profiled session.
        attributed: fraction of kernel time attributed by node name.
        source: free text, e.g. ``"local"`` or a device name.
    """

    node_ms: dict[str, float]
    total_ms: float
    threads: int
    attributed: float = 1.0
    source: str = "local"
    meta: dict[str, Any] = field(default_factory=dict)

    def sum(self, nodes: Any) -> float:
        """Summed estimate over ``nodes``."""
        return float(sum(self.node_ms.get(n, 0.0) for n in nodes))

    def scaled(self, factor: float) -> NodeProfile:
        """A copy with every time multiplied by ``factor`` (a slowdown)."""
        return NodeProfile(
            {k: v * factor for k, v in self.node_ms.items()},
            self.total_ms * factor,
            self.threads,
            self.attributed,
            self.source,
            dict(self.meta, slowdown=factor),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "source": self.source,
            "threads": self.threads,
            "total_ms": round(self.total_ms, 4),
            "attributed": round(self.attributed, 4),
            "meta": self.meta,
            "node_ms": {k: round(v, 5) for k, v in self.node_ms.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NodeProfile:
        """Inverse of :meth:`to_dict`.

        Raises:
            InvalidArgument: a malformed profile.
        """
        try:
            return cls(
                {str(k): float(v) for k, v in d["node_ms"].items()},
                float(d["total_ms"]),
                int(d.get("threads", 1)),
                float(d.get("attributed", 1.0)),
                str(d.get("source", "imported")),
                dict(d.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidArgument(f"malformed node profile: {exc!r}") from exc

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the profile as JSON."""
        p = Path(path)
        p.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NodeProfile:
        """Read a profile written by :meth:`save` (e.g. measured on a phone).

        Raises:
            InvalidArgument: missing or malformed file.
        """
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"cannot read device profile {p}: {exc}") from exc
        return cls.from_dict(data)


def make_session(
    model: onnx.ModelProto | str | os.PathLike[str], threads: int, *, profile_dir: str | None = None,
    spinning: bool = True,
):
    """A quiet CPU onnxruntime session with ``threads`` intra-op threads (full optimisation).

    ``spinning=False`` makes the session's worker threads block instead of
    busy-waiting for work after a run (``session.intra_op.allow_spinning``):
    needed when several sessions take turns, where one session's spinning
    threads would steal the CPU from the next.

    Raises:
        BundleError: onnxruntime refuses the model.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_dir is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(profile_dir, "ort")
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    try:
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises several types
        raise BundleError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from exc


def time_session(session: Any, feeds: Mapping[str, np.ndarray], *, warmup: int = 2, repeats: int = 10) -> tuple[Timing, list]:
    """Run a session ``warmup`` times, then ``repeats`` timed runs.

    Returns:
        The :class:`Timing` and the outputs of the last run.
    """
    names = [o.name for o in session.get_outputs()]
    feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
    out: list = []
    for _ in range(max(0, warmup)):
        out = session.run(names, feeds)
    samples = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = session.run(names, feeds)
        samples.append((time.perf_counter() - t0) * 1e3)
    return Timing.of(samples), out


def _attribute(name: str, nodes: Mapping[str, str]) -> str | None:
    """The graph node a profiled kernel belongs to: ORT names kernels after their
    node, or (layout transforms such as NCHWc) after the tensor they write."""
    base = name[: -len("_kernel_time")] if name.endswith("_kernel_time") else name
    while base:
        if base in nodes:
            return nodes[base]
        stripped = _FUSED_SUFFIX.sub("", base)
        if stripped == base:
            return None
        base = stripped
    return None


def profile_nodes(
    g: ModelGraph, *, threads: int = 1, warmup: int = 2, repeats: int = 5, batch: int = 1, source: str = "local",
    feeds: Mapping[str, np.ndarray] | None = None,
) -> NodeProfile:
    """Per-node times from onnxruntime's profiler (``SessionOptions.enable_profiling``).

    Args:
        g: the model.
        threads: intra-op threads (use the device's core count for a device profile).
        warmup: untimed runs first.
        repeats: profiled runs; each node's time is its median over them.
        batch: value of dynamic dims in the seeded inputs.
        source: label stored in the profile.
        feeds: the inputs to run (a shape bucket's); default: seeded inputs
            with dynamic dims at ``batch``.

    Returns:
        The :class:`NodeProfile`.

    Raises:
        BundleError: onnxruntime cannot run the model.
    """
    nodes = {t: n for t, n in g.producer.items()}
    nodes.update({n: n for n in g.order})
    if feeds is None:
        feeds = dummy_inputs(g.inputs, dynamic=batch)
    with tempfile.TemporaryDirectory() as tmp:
        sess = make_session(g.model, threads)
        try:
            timing, _ = time_session(sess, feeds, warmup=warmup, repeats=repeats)
        except Exception as exc:  # noqa: BLE001
            raise BundleError(f"onnxruntime cannot run the model: {str(exc).splitlines()[0]}") from exc
        psess = make_session(g.model, threads, profile_dir=tmp)
        names = [o.name for o in psess.get_outputs()]
        psess.run(names, feeds)  # warm-up (first run allocates)
        runs = max(1, repeats)
        for _ in range(runs):
            psess.run(names, feeds)
        path = psess.end_profiling()
        events = json.loads(Path(path).read_text(encoding="utf-8"))
    per: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per.setdefault(e["name"], []).append(float(e.get("dur", 0.0)) / 1e3)
    node_ms: dict[str, float] = {}
    attributed = unattributed = 0.0
    for name, durs in per.items():
        # the first run is the warm-up; per node, the median of the rest
        ms = statistics.median(durs[1:] if len(durs) > 1 else durs)
        target = _attribute(name, nodes)
        if target is None:
            unattributed += ms
        else:
            node_ms[target] = node_ms.get(target, 0.0) + ms
            attributed += ms
    if attributed > 0 and unattributed > 0:
        k = (attributed + unattributed) / attributed
        node_ms = {n: v * k for n, v in node_ms.items()}
    share = attributed / (attributed + unattributed) if attributed + unattributed > 0 else 1.0
    return NodeProfile(node_ms, timing.median_ms, threads, share, source, {"batch": batch, "repeats": repeats})


def time_partitions(
    partitions: Sequence[tuple[onnx.ModelProto | Path | None, onnx.ModelProto | Path | None]],
    feeds: Mapping[str, np.ndarray],
    *,
    device_threads: int = 1,
    cloud_threads: int = 2,
    warmup: int = 2,
    repeats: int = 10,
    seed: int = 0,
    device_gap_ms: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[Timing | None, Timing | None]]:
    """Measure several partitions' real prefix and suffix sessions, interleaved.

    Every session is created first; then each round runs every session once,
    in a shuffled order. Timing one partition after another lets machine load
    that drifts during planning (other processes, thermal or frequency
    changes) land on some partitions and not others, and the decision table
    compares partitions with each other; interleaved, drift hits them alike,
    and each session runs after others as it will on a device between
    requests (caches not hot from its own previous run).

    Args:
        partitions: ``(prefix, suffix)`` per partition; None for an absent side
            (cloud-only has no prefix, device-only no suffix).
        feeds: the model's inputs; each suffix is fed its prefix's real outputs.
        device_threads: intra-op threads of the prefix sessions.
        cloud_threads: intra-op threads of the suffix sessions.
        warmup: untimed rounds.
        repeats: timed rounds.
        seed: seed of the round order.
        device_gap_ms: idle time before each prefix run. The edge runs a
            prefix after waiting on the network or the app, with caches taken
            by other work and clocks down; back-to-back runs are faster than
            that (0.6 vs 0.9 ms for the zoo MobileNet on the dev VM), and a
            device slowdown multiplies the difference.
        progress: ``callback(done, total)`` per round.

    Returns:
        ``(device timing, cloud timing)`` per partition, None for an absent side.

    Raises:
        BundleError: onnxruntime cannot load or run a side.
    """
    runs: list[tuple[int, int, Any, list[str], dict[str, np.ndarray]]] = []
    try:
        for i, (prefix, suffix) in enumerate(partitions):
            cut: dict[str, np.ndarray] = dict(feeds)
            for side, model, threads in ((0, prefix, device_threads), (1, suffix, cloud_threads)):
                if model is None:
                    continue
                s = make_session(model, threads, spinning=False)
                names = [o.name for o in s.get_outputs()]
                args = {x.name: cut[x.name] for x in s.get_inputs()}
                out = s.run(names, args)
                if side == 0:
                    cut = dict(zip(names, out))
                runs.append((i, side, s, names, args))
        samples: dict[tuple[int, int], list[float]] = {(i, side): [] for i, side, *_ in runs}
        rng = random.Random(seed)
        total = max(0, warmup) + max(1, repeats)
        for r in range(total):
            order = list(runs)
            rng.shuffle(order)
            for i, side, s, names, args in order:
                if side == 0 and device_gap_ms > 0:
                    time.sleep(device_gap_ms / 1e3)
                t0 = time.perf_counter()
                s.run(names, args)
                if r >= warmup:
                    samples[(i, side)].append((time.perf_counter() - t0) * 1e3)
            if progress is not None:
                progress(r + 1, total)
    except BundleError:
        raise
    except Exception as exc:  # noqa: BLE001 - ORT run failures
        raise BundleError(f"onnxruntime failed while timing a partition: {str(exc).splitlines()[0]}") from exc
    out_t: list[tuple[Timing | None, Timing | None]] = []
    for i in range(len(partitions)):
        dev, cloud = samples.get((i, 0)), samples.get((i, 1))
        out_t.append((Timing.of(dev) if dev else None, Timing.of(cloud) if cloud else None))
    return out_t


def time_partition(
    prefix: onnx.ModelProto | Path | None,
    suffix: onnx.ModelProto | Path | None,
    feeds: Mapping[str, np.ndarray],
    *,
    device_threads: int = 1,
    cloud_threads: int = 2,
    warmup: int = 2,
    repeats: int = 10,
) -> tuple[Timing | None, Timing | None]:
    """Measure a partition's real prefix and suffix sessions.

    Args:
        prefix: device model (None for cloud-only).
        suffix: cloud model (None for device-only).
        feeds: the model's inputs; the suffix is fed the prefix's real outputs.
        device_threads: intra-op threads of the prefix session.
        cloud_threads: intra-op threads of the suffix session.
        warmup: untimed runs per session.
        repeats: timed runs per session.

    Returns:
        ``(device timing, cloud timing)``; None for an absent side.

    Raises:
        BundleError: onnxruntime cannot load or run a side.
    """
    dev = cloud = None
    cut: dict[str, np.ndarray] = dict(feeds)
    try:
        if prefix is not None:
            s = make_session(prefix, device_threads)
            dev, out = time_session(s, feeds, warmup=warmup, repeats=repeats)
            cut = dict(zip([o.name for o in s.get_outputs()], out))
        if suffix is not None:
            s = make_session(suffix, cloud_threads)
            cloud, _ = time_session(s, cut, warmup=warmup, repeats=repeats)
    except BundleError:
        raise
    except Exception as exc:  # noqa: BLE001 - ORT run failures
        raise BundleError(f"onnxruntime failed while timing a partition: {str(exc).splitlines()[0]}") from exc
    return dev, cloud
