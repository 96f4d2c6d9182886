"""Online device costs: a device that slows down 3x mid-run and recovers, against an oracle.

    .venv/bin/python benchmarks/bench_device_drift.py [--model mobilenet] [--requests 60]
        [--slow-from 20 --slow-to 40 --slow-factor 3] [--repeats 3] [--emulation profile|stretch]
        [--scenarios split,cloud] [--out FILE]

The real parts: three :class:`splitgate.edge.Gateway` s with real onnxruntime sessions,
each calling the same real cloud over real gRPC -- the plain grpcio baseline
server (:func:`splitgate.cloud.baseline.start_baseline`, no Ray) on 127.0.0.1 -- through
its own :class:`splitgate.netsim.ShapingProxy` (fixed bandwidth and RTT, no jitter), so
the network cost is real and no Gateway's traffic delays another's:

* ``adaptive``: the policy with online device costs (``learn_device=True``);
* ``off``: the same policy deciding on the profile (``learn_device=False``);
* ``oracle``: ``partition=`` forced to the partition that is best at the
  device's true speed in that phase -- best *measured*: before the run the
  oracle Gateway runs every candidate at both speeds (``--calibrate`` requests
  each, interleaved) and the lowest median wins.

The device: a zoo model (``splitgate.planner.zoo.export_zoo_model``) planned with
``--plan-slowdown`` (a phone-class device next to this machine's core: the
64x64 zoo models run in ~0.2 ms here). ``--emulation profile`` (default) runs
every device leg for real and pads it to the planned time times the current
slowdown (``GatewayConfig.device_time_from_profile``): the device is exactly
the plan at 1x, exactly 3x slower in the slow phase. ``--emulation stretch``
stretches the real compute instead (``device_slowdown``): more realistic noise,
but a 4 ms scheduling hiccup of a 0.2 ms run becomes a second at 300x.
``Gateway.set_device_slowdown`` switches the speed of all three Gateways at
requests ``--slow-from`` and ``--slow-to``.

Two scenarios (``--scenarios``), each on its own link: ``split`` -- a split
wins when the device is slow, and its prefix keeps the device measured, so the
recovery shows in its runs; ``cloud`` -- ``cloud`` wins, nothing runs on the
device, and the recovery is seen only by the Gateway's device probe (the
cheapest prefix, twice, every 3 offloaded requests). The link of a scenario,
unless ``--uplink``/``--rtt`` are given: one from a small grid where the device
wins at 1x and that kind of partition at ``--slow-factor`` x, by
``bundle.estimate`` with ``device_factor`` 1 and 3, by >= 15% both ways under
the link *as a Gateway's probe measures it* (:func:`pick_link`; the JSON lists
the links tried).

Per request, the three Gateways run in a shuffled order (load drift hits them
alike). Reported per run: the chosen partition per request, the lag after each
change (requests from the change until the adaptive Gateway picks a partition
within 5% of the best one's calibrated median at the new speed), mean latency
over the run, per-phase medians and
means, and the ratios to the oracle (the bar: adaptive/oracle <= 1.10, lags <=
5). Each Gateway first runs every candidate once and a few policy requests
(warm sessions, the first link probe), and the policy Gateways then probe the
link afresh (replacing estimates from the warm-up's forced calls): not
counted. Link probes are spaced
60 s apart for the policy Gateways (the link is fixed here; this measures the
device side). JSON to stdout and ``--out``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from _common import emit_json  # noqa: E402 - benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

UPLINKS_MBPS = (0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6, 8.0, 11.0, 16.0)
RTTS_MS = (5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0)


def _margins(bundle: Any, up: float, down: float | None, rtt: float, slow: float) -> tuple[str, float, float]:
    """(the plan's best at ``slow`` x, device's margin over the rest at 1x, the winner's over device at ``slow`` x)."""
    from splitgate.planner import Conditions

    def est(factor: float) -> dict[str, float]:
        c = Conditions(uplink_mbps=up, downlink_mbps=down, rtt_ms=rtt, device_factor=factor)
        return {pid: bundle.estimate(pid, c).latency_ms for pid in bundle.candidates}

    normal, slowed = est(1.0), est(slow)
    winner = min(slowed, key=slowed.__getitem__)
    other = min(v for p, v in normal.items() if p != "device")
    return winner, other / normal["device"] - 1, slowed["device"] / slowed[winner] - 1


def _probed(bundle: Any, address: str, up: float, rtt: float) -> Any:
    """The link ``up`` Mbps / ``rtt`` ms as a fresh Gateway's probe measures it (server sessions warm)."""
    from splitgate.edge import Gateway
    from splitgate.netsim import LinkConditions, ShapingProxy
    from splitgate.planner._graph import dummy_inputs

    with ShapingProxy(address, LinkConditions(uplink_mbps=up, downlink_mbps=4 * up, rtt_ms=rtt)) as proxy:
        with Gateway([bundle], cloud=proxy.address) as gw:
            for pid in bundle.candidates:
                if bundle.partitions[pid].suffix_path is not None:
                    gw.infer(bundle.model_name, dummy_inputs(bundle.inputs, seed=1), partition=pid)
            gw.probe(reset=True)
            return gw.conditions()


def pick_link(bundle: Any, address: str, slow: float, *, prefer: str = "split", margin: float = 0.15,
              tries: int = 8) -> dict[str, Any]:
    """The link: device best at 1x and a ``prefer``-kind partition (``split`` or
    ``cloud``; the other kind if none) at ``slow`` x, by ``margin`` both ways in
    the plan (above the policy's 10% hysteresis) -- *as a Gateway measures the
    link*: its probe also sees the proxy's and gRPC's overheads (a few ms of
    RTT). The grid links are ranked by their plan margins with the RTT overhead
    the last probe showed, and the best untried one is probed, until one holds."""
    overhead, tried = 0.0, []
    for _ in range(tries):
        ranked = []
        for up in UPLINKS_MBPS:
            for rtt in RTTS_MS:
                if any(t["uplink_mbps"] == up and t["rtt_ms"] == rtt for t in tried):
                    continue
                winner, m1, m3 = _margins(bundle, up, 4 * up, rtt + overhead, slow)
                if winner != "device":
                    ranked.append((bundle.partitions[winner].kind == prefer, min(m1, m3), up, rtt))
        if not ranked:
            break
        _, _, up, rtt = max(ranked)
        seen = _probed(bundle, address, up, rtt)
        overhead = max(seen.rtt_ms - rtt, 0.0)
        winner, m1, m3 = _margins(bundle, seen.uplink_mbps, seen.downlink_mbps, seen.rtt_ms, slow)
        row = {"uplink_mbps": up, "downlink_mbps": 4 * up, "rtt_ms": rtt,
               "probed_uplink_mbps": round(seen.uplink_mbps, 3), "probed_rtt_ms": round(seen.rtt_ms, 2),
               "planned_best_slow": winner, "planned_margin_normal": round(m1, 3),
               "planned_margin_slow": round(m3, 3)}
        tried.append(row)
        print(f"link {up} Mbps / {rtt} ms: probed {seen.uplink_mbps:.2f} Mbps / {seen.rtt_ms:.0f} ms, "
              f"{winner} at {slow:g}x, margins {m1:.2f} / {m3:.2f}", file=sys.stderr, flush=True)
        if winner != "device" and min(m1, m3) >= margin:
            return {**row, "tried": tried}
    raise SystemExit(f"no link where the device wins at 1x and loses at {slow:g}x by {margin:.0%}: {tried}")


def _speed(emulation: str, plan_slowdown: float, factor: float) -> float:
    """The Gateway's device_slowdown for a device ``factor`` x slower than planned."""
    return factor if emulation == "profile" else plan_slowdown * factor


def calibrate_oracle(gw: Any, bundle: Any, feeds: dict, speeds: dict[str, float], n: int,
                     rng: random.Random) -> dict[str, Any]:
    """Median latency of every candidate at each speed (forced, interleaved); the oracle's picks."""
    out: dict[str, Any] = {}
    model = bundle.model_name
    for phase, slowdown in speeds.items():
        gw.set_device_slowdown(slowdown)
        samples: dict[str, list[float]] = {p: [] for p in bundle.candidates}
        for _ in range(n):
            order = list(bundle.candidates)
            rng.shuffle(order)
            for pid in order:
                samples[pid].append(gw.infer(model, feeds, partition=pid).trace.total_ms)
        medians = {p: round(statistics.median(xs), 2) for p, xs in samples.items()}
        out[phase] = {"medians_ms": medians, "best": min(medians, key=medians.__getitem__)}
    return out


def _warm(gw: Any, bundle: Any, feeds: dict, policy_requests: int) -> None:
    for pid in bundle.candidates:
        gw.infer(bundle.model_name, feeds, partition=pid)
    for _ in range(policy_requests):
        gw.infer(bundle.model_name, feeds)


def _lag(choices: list[str], change: int, medians: dict[str, float], near: float = 1.05) -> int | None:
    """Requests from ``change`` until the choice follows: a partition whose measured
    median at the new speed (``medians``, the oracle calibration) is within
    ``near`` of the best one's (None: never)."""
    best = min(medians.values())
    for j in range(change, len(choices)):
        if medians.get(choices[j], float("inf")) <= near * best:
            return j - change
    return None


def _phase_of(i: int, slow_from: int, slow_to: int) -> str:
    return "slow" if slow_from <= i < slow_to else "normal"


def run_once(bundle: Any, feeds: dict, address: str, link: dict[str, Any], args: argparse.Namespace,
             seed: int) -> dict[str, Any]:
    """One run: warm-up, oracle calibration, then the drifting device; see the module docs."""
    from splitgate.edge import Gateway
    from splitgate.netsim import LinkConditions, ShapingProxy

    rng = random.Random(seed)
    model = bundle.model_name
    conditions = LinkConditions(uplink_mbps=link["uplink_mbps"], downlink_mbps=link["downlink_mbps"],
                                rtt_ms=link["rtt_ms"])
    emulation = dict(device_time_from_profile=args.emulation == "profile",
                     device_slowdown=_speed(args.emulation, args.plan_slowdown, 1.0), intra_op_threads=1)
    speeds = {"normal": _speed(args.emulation, args.plan_slowdown, 1.0),
              "slow": _speed(args.emulation, args.plan_slowdown, args.slow_factor)}
    proxies = [ShapingProxy(address, conditions, seed=seed + k).start() for k in range(3)]
    gws = {
        "adaptive": Gateway([bundle], cloud=proxies[0].address, learn_device=True, probe_interval_s=60.0, **emulation),
        "off": Gateway([bundle], cloud=proxies[1].address, learn_device=False, probe_interval_s=60.0, **emulation),
        "oracle": Gateway([bundle], cloud=proxies[2].address, learn_device=False, **emulation),
    }
    try:
        # The oracle first: its forced calls create the server's suffix sessions, so
        # no policy Gateway times a cold session as network (a 49 KB call that
        # took 150 ms more would set its bandwidth estimate 4x too low); then a
        # fresh link probe, so both start from the link as it is.
        for name in ("oracle", "adaptive", "off"):
            _warm(gws[name], bundle, feeds, args.warmup)
        for name in ("adaptive", "off"):
            gws[name].probe(reset=True)
        seen = gws["adaptive"].conditions(model=model)
        measured = {"uplink_mbps": round(seen.uplink_mbps, 3), "rtt_ms": round(seen.rtt_ms, 2),
                    "planned_best_normal": bundle.choose(_at(seen, 1.0)),
                    "planned_best_slow": bundle.choose(_at(seen, args.slow_factor))}
        calibration = calibrate_oracle(gws["oracle"], bundle, feeds, speeds, args.calibrate, rng)
        rows: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        for i in range(args.requests):
            phase = _phase_of(i, args.slow_from, args.slow_to)
            for gw in gws.values():
                gw.set_device_slowdown(speeds[phase])
            row: dict[str, Any] = {"i": i, "phase": phase}
            order = list(gws)
            rng.shuffle(order)
            for name in order:
                forced = calibration[phase]["best"] if name == "oracle" else None
                r = gws[name].infer(model, feeds, partition=forced)
                row[name] = {"partition": r.trace.partition, "total_ms": round(r.trace.total_ms, 2),
                             "device_ms": round(r.trace.device_ms, 2), "fallback": r.trace.fallback,
                             "device_factor": round(r.trace.device_factor, 3)}
            rows.append(row)
        wall = time.perf_counter() - t0
    finally:
        for gw in gws.values():
            gw.close()
        for proxy in proxies:
            proxy.stop()
    return {"measured_link": measured, **summarize_run(rows, calibration, args, wall)}


def _at(c: Any, factor: float) -> Any:
    """Conditions ``c`` (the link as a Gateway measured it) at a device ``factor`` x slower than planned."""
    import dataclasses

    return dataclasses.replace(c, device_factor=factor, battery_pct=100.0, cloud_load=0.0)


def summarize_run(rows: list[dict[str, Any]], calibration: dict[str, Any], args: argparse.Namespace,
                  wall_s: float) -> dict[str, Any]:
    """Lags, means, per-phase medians and the ratios to the oracle of one run."""
    names = ("adaptive", "off", "oracle")
    choices = {n: [r[n]["partition"] for r in rows] for n in names}
    lat = {n: [r[n]["total_ms"] for r in rows] for n in names}
    lags = {"to_slow": _lag(choices["adaptive"], args.slow_from, calibration["slow"]["medians_ms"]),
            "to_normal": _lag(choices["adaptive"], args.slow_to, calibration["normal"]["medians_ms"])}
    phases: dict[str, Any] = {}
    spans = {"normal_1": (0, args.slow_from), "slow": (args.slow_from, args.slow_to),
             "normal_2": (args.slow_to, args.requests)}
    for phase, (a, b) in spans.items():
        phases[phase] = {
            n: {"median_ms": round(statistics.median(lat[n][a:b]), 2),
                "mean_ms": round(statistics.fmean(lat[n][a:b]), 2),
                "choices": {p: choices[n][a:b].count(p) for p in dict.fromkeys(choices[n][a:b])}}
            for n in names
        }
    mean = {n: round(statistics.fmean(lat[n]), 2) for n in names}
    return {
        "oracle_calibration": calibration,
        "lag_requests": lags,
        "mean_ms": mean,
        "adaptive_vs_oracle": round(mean["adaptive"] / mean["oracle"], 4),
        "off_vs_oracle": round(mean["off"] / mean["oracle"], 4),
        "median_ms": {n: round(statistics.median(lat[n]), 2) for n in names},
        "phases": phases,
        "adaptive_choices": choices["adaptive"],
        "adaptive_device_factor": [r["adaptive"]["device_factor"] for r in rows],
        "off_choices": choices["off"],
        "oracle_choices": choices["oracle"],
        "fallbacks": {n: sum(r[n]["fallback"] is not None for r in rows) for n in names},
        "passed": bool(lags["to_slow"] is not None and lags["to_slow"] <= 5 and lags["to_normal"] is not None
                       and lags["to_normal"] <= 5 and mean["adaptive"] <= 1.10 * mean["oracle"]),
        "wall_s": round(wall_s, 1),
        "requests": rows,
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ratios = [r["adaptive_vs_oracle"] for r in runs]
    off = [r["off_vs_oracle"] for r in runs]
    lags = [v for r in runs for v in r["lag_requests"].values()]
    return {
        "adaptive_vs_oracle": ratios,
        "adaptive_vs_oracle_median": round(statistics.median(ratios), 4),
        "off_vs_oracle": off,
        "off_vs_oracle_median": round(statistics.median(off), 4),
        "worst_lag_requests": None if None in lags else max(lags),
        "within_10pct": all(x <= 1.10 for x in ratios),
        "lags_within_5": None not in lags and max(lags) <= 5,
        "passed": all(r["passed"] for r in runs),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet", help="a zoo model (planner.zoo)")
    ap.add_argument("--plan-slowdown", type=float, default=100.0,
                    help="the device vs this machine, at plan time (the 64x64 zoo models: ~0.2 ms here)")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--slow-from", type=int, default=20)
    ap.add_argument("--slow-to", type=int, default=40)
    ap.add_argument("--slow-factor", type=float, default=3.0)
    ap.add_argument("--emulation", choices=("profile", "stretch"), default="profile")
    ap.add_argument("--scenarios", default="split,cloud",
                    help="what wins when the device is slow: split (its prefix shows the recovery), "
                         "cloud (nothing runs on the device: the device probe must)")
    ap.add_argument("--uplink", type=float, default=None, help="Mbps: one link for every scenario (default: picked)")
    ap.add_argument("--rtt", type=float, default=40.0, help="ms (with --uplink)")
    ap.add_argument("--repeats", type=int, default=3, help="independent runs per scenario (fresh Gateways each)")
    ap.add_argument("--warmup", type=int, default=5, help="policy requests per Gateway before a run")
    ap.add_argument("--calibrate", type=int, default=3, help="oracle requests per candidate and speed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="keep every request's trace in the JSON")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()

    from splitgate.cloud.baseline import start_baseline
    from splitgate.planner import build_bundle
    from splitgate.planner._graph import dummy_inputs
    from splitgate.planner.zoo import export_zoo_model

    t_start = time.perf_counter()
    scenarios: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"planning {args.model} (device {args.plan_slowdown:g}x this machine) ...", file=sys.stderr, flush=True)
        path = export_zoo_model(args.model, work / f"{args.model}.onnx", seed=0)
        bundle = build_bundle(path, work / f"{args.model}.bundle", model_name=args.model,
                              device_slowdown=args.plan_slowdown)
        feeds = dummy_inputs(bundle.inputs, seed=1)
        server = start_baseline([str(bundle.root)])
        try:
            for scenario in [s for s in args.scenarios.split(",") if s]:
                if args.uplink is not None:
                    link = {"uplink_mbps": args.uplink, "downlink_mbps": 4 * args.uplink, "rtt_ms": args.rtt}
                else:
                    link = pick_link(bundle, server.address, args.slow_factor, prefer=scenario)
                runs = []
                for k in range(args.repeats):
                    run = run_once(bundle, feeds, server.address, link, args, seed=args.seed + 101 * k)
                    if not args.full:
                        run.pop("requests")
                    runs.append(run)
                    print(f"{scenario} run {k}: adaptive/oracle {run['adaptive_vs_oracle']:.3f}, off/oracle "
                          f"{run['off_vs_oracle']:.3f}, lags {run['lag_requests']} ({run['wall_s']} s)",
                          file=sys.stderr, flush=True)
                scenarios[scenario] = {"link": link, "summary": _summary(runs), "runs": runs}
        finally:
            server.stop()
        plan = {pid: {k: bundle.profile["partitions"][pid].get(k) for k in ("device_ms", "cloud_ms", "up_bytes")}
                for pid in bundle.candidates}
    doc = {
        "benchmark": "device_drift",
        "config": {k: getattr(args, k) for k in (
            "model", "plan_slowdown", "requests", "slow_from", "slow_to", "slow_factor", "emulation", "repeats",
            "warmup", "calibrate", "seed")},
        "plan": plan,
        "summary": {name: sc["summary"] for name, sc in scenarios.items()},
        "passed": all(sc["summary"]["passed"] for sc in scenarios.values()),
        "scenarios": scenarios,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    emit_json(doc, args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
