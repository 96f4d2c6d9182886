"""Does the cascade's per-row exit pay, and where? Batches of sure and unsure rows through real Gateways.

The model is the zoo's trained ``resnet18`` (gratings10) with the small model of
``tests/test_cascade.py``: an early exit of itself (its first half, global average
pooling and a ridge-fitted linear head), planned on this machine with the zoo's
calibration inputs (raw partitions, as the tests plan it). Each batch has ``N``
rows (4, 8, 16), a fraction of them *sure* (0.25, 0.5, 0.75: held-out gratings10
images the small model is confident on, by a margin of 0.02 over the threshold,
each alone) and the rest *unsure* (held-out images it is not confident on, topped
up with Gaussian noise as the tests do), in a seeded mixed order.

Per cell three routes answer the same batch, interleaved round by round (the
order rotates), after warm-up:

* ``per_row``: the default Gateway: the cascade where the decision core says it
  pays, the sure rows answered by the small model and only the unsure rows sent
  down the path (``Trace.cascade == "partial"``);
* ``baseline``: the whole batch down the path the policy chose for it, the
  cascade off (``infer(..., partition=<that path>)``: a partition asked for runs
  with no cascade in front);
* ``all_or_nothing``: what the Gateway did before per-row exits: a batch exits
  only when every row is sure, else the whole batch takes the path after the
  small model ran. No Gateway option selects it, so it is emulated on a second
  Gateway by treating the request as not batch-major (the Gateway's own rule for
  such models: ``splitgate.edge._cascade.batch_rows`` answers None during that
  Gateway's calls only), which is that rule exactly, on the same batch.

A fresh pair of Gateways per cell (the live row exit rate is a running rate over
a Gateway's life): warm-up runs until each cascade Gateway has seen at least
``--warmup-rows`` rows, so the live rate has moved from the planned one toward
the batch's. The decision core may then stop running the cascade where it does
not pay (``skipped``): the outcomes are counted per route.

Device speeds: this CPU as is, and an emulated device 20x slower
(``device_slowdown=20`` with ``device_time_from_profile=True``: each device leg
padded to 20x the plan's time for its rows; the Gateway's device learner, on by
default, learns the factor during warm-up). Cloud: none (offline, the path is
``device``), or the plain grpcio server (``splitgate.cloud.baseline``) behind a
``ShapingProxy`` at the netsim ``4g`` profile. The Gateways probe the link once
at start (``probe_interval_s`` 60, so no background probe shares the link with
timed requests) and run one onnxruntime thread per session (``intra_op_threads``
1, as the planner profiles: the default pool's idle threads spin, and one
Gateway's spinning slowed the other's next run); otherwise default settings.

Per cell: median latency per route (``Gateway.infer`` wall time), the ratios
baseline / per-row and baseline / all-or-nothing (> 1: faster than the
baseline), what the cascade did, the path, and each route's top-1 agreement with
the fp32 full model run on the same batch (rows over all timed rounds).

    .venv/bin/python benchmarks/bench_cascade_rows.py -o benchmarks/results/cascade_rows.json   # ~3-4 min
    .venv/bin/python benchmarks/bench_cascade_rows.py --quick                                     # ~1 min
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _common import emit_json

MODEL = "resnet18"
SIZES = (4, 8, 16)
SURE_FRACTIONS = (0.25, 0.5, 0.75)
ROUTES = ("per_row", "baseline", "all_or_nothing")
#: device name -> emulated slowdown (1: this CPU as is, no emulation)
DEVICES = {"cpu": 1.0, "slow20": 20.0}
CLOUDS = ("offline", "4g")
#: a sure row is at least this much above the threshold alone, an unsure one this much below
SURE_MARGIN = 0.02
LINK = "4g"


# -- the model -----------------------------------------------------------------------------


def _session(path: Path | str) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def early_exit_model(full: Path, out: Path) -> Path:
    """The zoo's early-exit small model for the trained classifier (as tests/test_cascade.py)."""
    from splitgate.planner.zoo import export_early_exit

    return export_early_exit(full, out)


def plan(workdir: Path, n_cal: int) -> tuple[Any, Path, float]:
    """Export the trained model, build its early exit and plan both (this machine's speed).

    Returns:
        (bundle, full model path, planning seconds).
    """
    from splitgate.planner import build_bundle
    from splitgate.planner.zoo import calibration_inputs, export_zoo_model

    full = export_zoo_model(MODEL, workdir / f"{MODEL}.onnx", trained=True)
    small = early_exit_model(full, workdir / "small.onnx")
    t0 = time.perf_counter()
    bundle = build_bundle(full, workdir / f"{MODEL}.bundle", model_name=MODEL, cascade=small,
                          calibration={"input": calibration_inputs(n_cal)["input"]}, encodings=("raw",),
                          repeats=5, warmup=2, max_candidates=2, reference_cuts=1)
    return bundle, full, time.perf_counter() - t0


# -- the rows ------------------------------------------------------------------------------


@dataclass
class RowPools:
    """Rows the small model is sure of and rows it is not (each alone), and where they came from."""

    sure: list[np.ndarray]
    unsure: list[np.ndarray]
    unsure_heldout: int
    unsure_noise: int
    heldout_scanned: int


def row_pools(bundle: Any, need: int, heldout: int = 96) -> RowPools:
    """``need`` sure and ``need`` unsure rows: held-out gratings10 images (not the calibration
    stream) by the small model's confidence alone, unsure ones topped up with noise.

    Raises:
        RuntimeError: too few sure images among ``heldout`` held-out ones.
    """
    from splitgate.planner._cascade import confidence
    from splitgate.planner.zoo import calibration_inputs

    spec = bundle.cascade
    small = _session(bundle.cascade_path)

    def conf(x: np.ndarray) -> float:
        return float(confidence(small.run(None, {"input": x[None]})[0], spec.confidence)[0])

    images = calibration_inputs(heldout, seed=11)["input"]
    scored = [(x, conf(x)) for x in images]
    sure = [x for x, c in scored if c >= spec.threshold + SURE_MARGIN][:need]
    unsure = [x for x, c in scored if c < spec.threshold - SURE_MARGIN][:need]
    real = len(unsure)
    noise = np.random.default_rng(0).normal(0.0, 1.0, (8 * need, 3, 64, 64)).astype(np.float32)
    unsure += [x for x in noise if conf(x) < spec.threshold - SURE_MARGIN][: need - real]
    if len(sure) < need or len(unsure) < need:
        raise RuntimeError(f"only {len(sure)} sure and {len(unsure)} unsure rows of {need} needed "
                           f"(threshold {spec.threshold:.3f})")
    return RowPools(sure, unsure, real, len(unsure) - real, heldout)


def mixed_batch(pools: RowPools, rows: int, sure: int, seed: int) -> tuple[np.ndarray, list[bool]]:
    """A batch of ``sure`` sure rows and ``rows - sure`` unsure ones, in a seeded mixed order.

    Returns:
        (float32 ``[rows, 3, 64, 64]``, which rows are sure).
    """
    rng = np.random.default_rng(seed)
    kinds = [True] * sure + [False] * (rows - sure)
    rng.shuffle(kinds)
    picks = {True: iter(rng.permutation(len(pools.sure))), False: iter(rng.permutation(len(pools.unsure)))}
    batch = [(pools.sure if k else pools.unsure)[next(picks[k])] for k in kinds]
    return np.stack(batch).astype(np.float32), kinds


# -- the routes ----------------------------------------------------------------------------


@contextlib.contextmanager
def not_batch_major() -> Iterator[None]:
    """Within: the Gateway treats every request as not batch-major, so its cascade exits a
    batch all or nothing (the rule before per-row exits). Process-wide while it lasts:
    only the all-or-nothing Gateway's calls run inside it."""
    import splitgate.edge._cascade as cascade_module

    real = cascade_module.batch_rows
    cascade_module.batch_rows = lambda *args, **kwargs: None
    try:
        yield
    finally:
        cascade_module.batch_rows = real


@dataclass
class RouteRecord:
    """What one route did over a cell's timed rounds."""

    ms: list[float] = field(default_factory=list)
    by_outcome: dict[str, list[float]] = field(default_factory=dict)
    outcomes: Counter = field(default_factory=Counter)
    paths: Counter = field(default_factory=Counter)
    rows_exited: list[int] = field(default_factory=list)
    agree: int = 0
    rows: int = 0

    def add(self, ms: float, result: Any, reference: np.ndarray, cascade_route: bool) -> None:
        t = result.trace
        self.ms.append(ms)
        outcome = (t.cascade or "skipped") if cascade_route else "off"
        self.outcomes[outcome] += 1
        self.by_outcome.setdefault(outcome, []).append(ms)
        self.paths[t.partition] += 1
        self.rows_exited.append(t.cascade_rows_exited or 0)
        self.agree += int(np.sum(result.outputs["logits"].argmax(axis=1) == reference))
        self.rows += len(reference)

    def summary(self) -> dict[str, Any]:
        xs = sorted(self.ms)
        return {"n": len(xs), "p50_ms": round(statistics.median(xs), 3),
                "p25_ms": round(xs[len(xs) // 4], 3), "p75_ms": round(xs[(3 * len(xs)) // 4], 3),
                "outcomes": dict(sorted(self.outcomes.items())),
                "p50_ms_by_outcome": {k: round(statistics.median(v), 3) for k, v in sorted(self.by_outcome.items())},
                "paths": dict(sorted(self.paths.items())),
                "rows_exited_median": statistics.median(self.rows_exited),
                "top1_agreement": round(self.agree / self.rows, 4)}


def gateway_config(slowdown: float, cloud: str | None) -> Any:
    """The Gateway's settings: defaults, the emulated device, one link probe at start, and
    one onnxruntime thread per session (as the plan was profiled; with the default pool
    the idle threads of one Gateway's sessions spin and slow the other Gateway's next run:
    a route run right after the other Gateway measured up to 1.6x slower on this host)."""
    from splitgate.edge import GatewayConfig

    emulate = slowdown > 1.0
    return GatewayConfig(cloud=cloud, device_slowdown=slowdown, device_time_from_profile=emulate,
                         probe_interval_s=60.0, intra_op_threads=1)


@dataclass
class CellSpec:
    device: str
    cloud: str
    rows: int
    sure: int
    seed: int


def run_cell(bundle: Any, cell: CellSpec, batch: np.ndarray, reference: np.ndarray, cloud_address: str | None,
             rounds: int, warmup_rows: int, tick: Any) -> dict[str, Any]:
    """One cell: the three routes on ``batch``, interleaved, after warm-up.

    Args:
        bundle: the plan bundle.
        cell: which device, cloud, rows and sure rows.
        batch: the request's input rows.
        reference: the fp32 full model's top-1 per row.
        cloud_address: the shaped link's address, or None offline.
        rounds: timed rounds.
        warmup_rows: warm-up until each cascade Gateway has seen this many rows (at least 3 rounds).
        tick: called after each round (progress).

    Returns:
        The cell's record (routes' summaries, ratios).
    """
    from splitgate.edge import Gateway

    slowdown = DEVICES[cell.device]
    address = cloud_address if cell.cloud != "offline" else None
    feeds = {"input": batch}
    warmup = max(3, -(-warmup_rows // cell.rows))
    records = {r: RouteRecord() for r in ROUTES}
    with Gateway([bundle.root], config=gateway_config(slowdown, address)) as gw, \
            Gateway([bundle.root], config=gateway_config(slowdown, address)) as aon:
        path = None
        last = None
        for i in range(warmup + rounds):
            order = ROUTES[i % 3:] + ROUTES[:i % 3] if path is not None else ROUTES
            for route in order:
                t0 = time.perf_counter()
                if route == "per_row":
                    result = gw.infer(MODEL, feeds)
                elif route == "baseline":
                    result = gw.infer(MODEL, feeds, partition=path or "device")
                else:
                    with not_batch_major():
                        result = aon.infer(MODEL, feeds)
                ms = (time.perf_counter() - t0) * 1e3
                if route == "per_row":
                    last = result.trace
                    if result.trace.partition != "cascade":
                        path = result.trace.partition
                if i >= warmup:
                    records[route].add(ms, result, reference, route != "baseline")
            tick()
    routes = {r: rec.summary() for r, rec in records.items()}
    p50 = {r: routes[r]["p50_ms"] for r in ROUTES}
    return {
        "device": cell.device, "cloud": cell.cloud, "rows": cell.rows, "sure_rows": cell.sure,
        "sure_fraction": round(cell.sure / cell.rows, 4), "warmup_rounds": warmup, "rounds": rounds,
        "device_factor_last": None if last is None else round(last.device_factor, 3),
        "routes": routes,
        "baseline_vs_per_row": round(p50["baseline"] / p50["per_row"], 4),
        "baseline_vs_all_or_nothing": round(p50["baseline"] / p50["all_or_nothing"], 4),
    }


# -- the run -------------------------------------------------------------------------------


def cascade_facts(bundle: Any, plan_s: float) -> dict[str, Any]:
    """The plan's cascade figures."""
    spec = bundle.cascade
    return {"source": "early exit (tests/test_cascade.py recipe)", "threshold": round(spec.threshold, 4),
            "planned_exit_rate": round(spec.exit_rate, 4), "agreement_among_exits": round(spec.agreement, 4),
            "calibration_samples": spec.samples, "small_device_ms": round(spec.device_ms, 4),
            "full_device_ms": round(spec.full_device_ms, 4),
            "small_vs_full": round(spec.device_ms / spec.full_device_ms, 4), "planning_s": round(plan_s, 1),
            "partitions": sorted(bundle.partitions)}


def summary(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Per device and cloud: the ratio range, and where per-row beat the baseline by 5 %."""
    out = {}
    for device in DEVICES:
        for cloud in CLOUDS:
            mine = [c for c in cells if c["device"] == device and c["cloud"] == cloud]
            if not mine:
                continue
            ratios = [c["baseline_vs_per_row"] for c in mine]
            out[f"{device}/{cloud}"] = {
                "baseline_vs_per_row_min": min(ratios), "baseline_vs_per_row_max": max(ratios),
                "per_row_faster_by_5pct": [f"{c['rows']}x{c['sure_fraction']:g}" for c in mine
                                           if c["baseline_vs_per_row"] >= 1.05],
                "per_row_slower_by_5pct": [f"{c['rows']}x{c['sure_fraction']:g}" for c in mine
                                           if c["baseline_vs_per_row"] <= 1 / 1.05],
                "min_top1_agreement": {r: min(c["routes"][r]["top1_agreement"] for c in mine) for r in ROUTES},
            }
    return out


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from splitgate.cloud.baseline import start_baseline
    from splitgate.netsim import ShapingProxy, profile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short run: fewer rounds, warm-up rows and calibration")
    ap.add_argument("--calibration", type=int, default=None, help="calibration images (default 128; quick 64)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per cell on the emulated device "
                    "(default 20; quick 3); this CPU gets three times as many")
    ap.add_argument("--warmup-rows", type=int, default=None, help="rows each cascade Gateway sees before timing "
                    "(default 64; quick 16)")
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)
    n_cal = args.calibration or (64 if args.quick else 128)
    rounds = args.rounds or (3 if args.quick else 20)
    warmup_rows = args.warmup_rows or (16 if args.quick else 64)
    console = Console(stderr=True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_cascade_rows_") as tmp:
        with console.status("planning resnet18 with its early exit"):
            bundle, full, plan_s = plan(Path(tmp), n_cal)
        need = max(max(round(f * n), n - round(f * n)) for n in SIZES for f in SURE_FRACTIONS)
        pools = row_pools(bundle, need)
        reference_session = _session(full)
        specs = [CellSpec(d, c, n, round(f * n), seed=100 * n + int(100 * f))
                 for d in DEVICES for c in CLOUDS for n in SIZES for f in SURE_FRACTIONS]
        per_cell = {s.device: rounds * (3 if s.device == "cpu" else 1) for s in specs}
        total = sum(per_cell[s.device] + max(3, -(-warmup_rows // s.rows)) for s in specs)
        cells = []
        link = profile(LINK)
        with start_baseline([str(bundle.root)]) as server, ShapingProxy(server.address, link.conditions()) as proxy, \
                Progress(TextColumn("{task.description}"), BarColumn(),
                         TextColumn("{task.completed:.0f}/{task.total:.0f} rounds"), TimeElapsedColumn(),
                         console=console) as progress:
            task = progress.add_task("cascade rows", total=total)
            for spec in specs:
                progress.update(task, description=f"{spec.device} {spec.cloud} {spec.rows} rows, {spec.sure} sure")
                batch, _ = mixed_batch(pools, spec.rows, spec.sure, spec.seed)
                reference = reference_session.run(None, {"input": batch})[0].argmax(axis=1)
                cells.append(run_cell(bundle, spec, batch, reference, proxy.address, per_cell[spec.device],
                                      warmup_rows, lambda: progress.advance(task)))
        facts = cascade_facts(bundle, plan_s)
    result = {
        "benchmark": "cascade_rows",
        "command": "python benchmarks/bench_cascade_rows.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "load_avg_end": [round(v, 2) for v in os.getloadavg()]},
        "model": MODEL,
        "cascade": facts,
        "rows": {"sure_pool": len(pools.sure), "unsure_pool": len(pools.unsure),
                 "unsure_heldout": pools.unsure_heldout, "unsure_noise": pools.unsure_noise,
                 "heldout_scanned": pools.heldout_scanned, "margin": SURE_MARGIN},
        "config": {"sizes": list(SIZES), "sure_fractions": list(SURE_FRACTIONS), "devices": DEVICES,
                   "link": {"name": LINK, "uplink_mbps": link.uplink_mbps, "downlink_mbps": link.downlink_mbps,
                            "rtt_ms": link.rtt_ms, "jitter_ms": link.jitter_ms},
                   "rounds": {d: rounds * (3 if d == "cpu" else 1) for d in DEVICES}, "warmup_rows": warmup_rows,
                   "calibration_images": n_cal, "quick": args.quick,
                   "all_or_nothing": "emulated: a second Gateway whose requests count as not batch-major"},
        "cells": cells,
        "summary": summary(cells),
        "run_s": round(time.perf_counter() - t_start, 1),
    }
    emit_json(result, args.output, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
