"""Run a locust load test of the cloud tier end to end.

:func:`run_loadtest` gets plan bundles (exporting and planning a zoo model when
none is given), records split traffic from them, starts a local Ray Serve tier
(or targets ``--target``), runs locust headless in a subprocess bounded in
time, and leaves in ``out_dir``: ``locust_stats.csv`` (and the other locust
CSVs), ``report.html``, ``rps_latency.png``, ``locust.log``, ``summary.json``
(and ``step_result.json`` for a step-load run).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from splitgate.loadtests._report import NameStats, plot_history, read_stats, step_table, summary_table
from splitgate.loadtests._traffic import parse_mix, record_traffic, save_traffic
from splitgate.errors import InvalidArgument, SplitgateError

__all__ = ["LoadTestConfig", "LoadTestResult", "run_loadtest"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CSV_PREFIX = "locust"
# Extra seconds locust may take past its run time (start-up, stop, report) before it is killed.
GRACE_S = 60.0


@dataclass
class LoadTestConfig:
    """What to load and how hard. Defaults give a one-minute laptop run.

    Attributes:
        target: ``host:port`` of a running tier's gRPC ingress; None = start a local tier.
        bundles: plan bundle dirs; empty = export and plan zoo model ``model``.
        model: zoo model used when no bundle is given.
        mix: partition weights, e.g. ``"cut-3:3,cloud:1"``; None = cloud + first/middle/last cut.
        users, spawn_rate, duration_s: locust's -u, -r and -t (a plain run).
        wait_ms: think time between a user's requests (0 = closed loop).
        batch, samples, seed: recorded traffic (samples per request, distinct requests, seed).
        replicas, threads: local tier's replicas and onnxruntime threads per session.
        direct: spread users over the replicas' direct-ingress endpoints instead of the proxy.
        step_load: ramp users in steps until p99 crosses ``p99_target_ms``.
        step_users, step_time_s, step_max_users: the step shape.
        out_dir: where reports go.
    """

    target: str | None = None
    bundles: list[str] = field(default_factory=list)
    model: str = "mobilenet"
    mix: str | None = None
    users: int = 8
    spawn_rate: float = 4.0
    duration_s: float = 60.0
    wait_ms: float = 0.0
    batch: int = 1
    samples: int = 4
    seed: int = 0
    replicas: int = 1
    threads: int = 0
    step_load: bool = False
    step_users: int = 1
    step_time_s: float = 10.0
    step_max_users: int = 32
    p99_target_ms: float = 100.0
    call_timeout_s: float = 10.0
    direct: bool = False
    out_dir: str = "loadtest-results"
    quiet: bool = False

    def validate(self) -> None:
        """Raise :class:`InvalidArgument` for settings that cannot run."""
        checks = [
            (self.users >= 1, "users must be >= 1"),
            (self.spawn_rate > 0, "spawn rate must be > 0"),
            (0 < self.duration_s <= 24 * 3600, "duration must be in (0 s, 24 h]"),
            (self.step_users >= 1 and self.step_time_s >= 2, "step users must be >= 1 and step time >= 2 s"),
            (self.step_max_users >= self.step_users, "step max users must be >= step users"),
            (self.p99_target_ms > 0, "p99 target must be > 0"),
            (self.replicas >= 1, "replicas must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidArgument(message)
        if self.mix:
            parse_mix(self.mix)

    @property
    def run_time_s(self) -> float:
        """The locust run-time bound (for a step run: every step, plus slack)."""
        if self.step_load:
            return (self.step_max_users // self.step_users) * self.step_time_s + 5.0
        return self.duration_s


@dataclass
class LoadTestResult:
    """What a run measured and where its files are."""

    target: str
    stats: list[NameStats]
    files: dict[str, str]
    exit_code: int
    step: dict[str, Any] | None = None

    @property
    def total(self) -> NameStats:
        """The aggregate row."""
        return self.stats[-1]

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "exit_code": self.exit_code, "files": self.files,
                "stats": [asdict(s) for s in self.stats], "step": self.step}


def _ensure_bundles(cfg: LoadTestConfig, out: Path, console: Console) -> list[str]:
    if cfg.bundles:
        missing = [b for b in cfg.bundles if not (Path(b) / "manifest.json").is_file()]
        if missing:
            raise InvalidArgument(f"not plan bundles (no manifest.json): {missing}")
        return list(cfg.bundles)
    from splitgate.planner import PlanBundle, build_bundle
    from splitgate.errors import BundleError

    models = out / "models"
    bundle_dir = models / f"{cfg.model}.bundle"
    try:
        PlanBundle.load(bundle_dir)
        console.print(f"reusing plan bundle {bundle_dir}")
        return [str(bundle_dir)]
    except BundleError:
        pass
    from splitgate.planner.zoo import export_zoo_model

    with console.status(f"exporting and planning zoo model '{cfg.model}'"):
        onnx_path = export_zoo_model(cfg.model, models / f"{cfg.model}.onnx", seed=cfg.seed)
        build_bundle(onnx_path, bundle_dir)
    console.print(f"planned zoo model '{cfg.model}' into {bundle_dir}")
    return [str(bundle_dir)]


def _locust_command(cfg: LoadTestConfig, target: str, out: Path, traffic_file: Path) -> list[str]:
    locustfile = HERE / ("stepload.py" if cfg.step_load else "locustfile.py")
    cmd = [
        sys.executable, "-m", "locust", "-f", str(locustfile), "--headless",
        "--host", target,
        "-t", f"{int(cfg.run_time_s + 0.999)}s",
        "--csv", str(out / CSV_PREFIX), "--csv-full-history",
        "--html", str(out / "report.html"),
        "--stop-timeout", "5",
        "--loglevel", "WARNING",
        "--only-summary",
        "--traffic", str(traffic_file),
        "--seed", str(cfg.seed),
        "--wait-ms", str(cfg.wait_ms),
        "--call-timeout", str(cfg.call_timeout_s),
    ]
    if cfg.direct:
        cmd.append("--direct")
    if cfg.step_load:
        cmd += [
            "--step-users", str(cfg.step_users), "--step-time", str(cfg.step_time_s),
            "--step-max-users", str(cfg.step_max_users), "--p99-target-ms", str(cfg.p99_target_ms),
            "--step-result", str(out / "step_result.json"),
        ]
    else:
        cmd += ["-u", str(cfg.users), "-r", str(cfg.spawn_rate)]
    return cmd


def _current_rps(history_csv: Path) -> str:
    """The latest aggregate rps/p99 from locust's history CSV, for the progress bar."""
    try:
        lines = history_csv.read_text(encoding="utf-8").splitlines()
    except OSError:
        return ""
    header = lines[0].split(",") if lines else []
    for line in reversed(lines[1:]):
        cells = line.split(",")
        if len(cells) == len(header) and cells[header.index("Name")] == "Aggregated":
            row = dict(zip(header, cells))
            return f"{row['User Count']} users, {float(row['Requests/s']):.1f} rps, p99 {row['99%']} ms"
    return ""


def _run_locust(cmd: list[str], cfg: LoadTestConfig, out: Path, console: Console) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    log_path = out / "locust.log"
    deadline_s = cfg.run_time_s + GRACE_S
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        start = time.monotonic()
        try:
            with Progress(
                TextColumn("[bold]locust[/]"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
                TimeElapsedColumn(), TextColumn("{task.description}"),
                console=console, transient=True, disable=cfg.quiet,
            ) as bar:
                task = bar.add_task("starting", total=cfg.run_time_s)
                while proc.poll() is None:
                    elapsed = time.monotonic() - start
                    if elapsed > deadline_s:
                        raise TimeoutError(f"locust did not finish within {deadline_s:.0f} s; see {log_path}")
                    bar.update(task, completed=min(elapsed, cfg.run_time_s),
                               description=_current_rps(out / f"{CSV_PREFIX}_stats_history.csv"))
                    time.sleep(0.5)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    return proc.returncode


def run_loadtest(cfg: LoadTestConfig, console: Console | None = None) -> LoadTestResult:
    """Run one load test (plain or step-load) and write its reports.

    Raises:
        InvalidArgument: bad settings, bundles or mix.
        SplitgateError: locust produced no statistics (its log is named).
        TimeoutError: the local tier did not start, or locust overran its bound.
    """
    console = console or Console(quiet=cfg.quiet)
    cfg.validate()
    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob(f"{CSV_PREFIX}_*.csv"), out / "step_result.json"]:
        stale.unlink(missing_ok=True)
    bundles = _ensure_bundles(cfg, out, console)

    with console.status("recording split traffic (running prefixes in onnxruntime)"):
        traffic = record_traffic(
            bundles, parse_mix(cfg.mix) if cfg.mix else None, batch=cfg.batch, samples=cfg.samples, seed=cfg.seed
        )
        traffic_file = save_traffic(traffic, out / "traffic.npz")
    weights = sum(t.weight for t in traffic)
    console.print(
        "traffic: " + ", ".join(f"{t.name} {t.weight / weights:.0%} ({t.tensor_bytes:,} B)" for t in traffic)
    )

    tier = None
    target = cfg.target
    try:
        if target is None:
            from splitgate.cloud import CloudConfig, start_local

            with console.status(f"starting a local Ray Serve tier ({cfg.replicas} replica(s))"):
                tier = start_local(
                    CloudConfig(bundles=bundles, grpc_port=0, num_replicas=cfg.replicas, intra_op_threads=cfg.threads)
                )
            target = tier.address
            console.print(f"local cloud tier on {target} ({cfg.replicas} replica(s))")
        cmd = _locust_command(cfg, target, out, traffic_file)
        what = (f"step load: +{cfg.step_users} users every {cfg.step_time_s:g} s up to {cfg.step_max_users}, "
                f"p99 target {cfg.p99_target_ms:g} ms" if cfg.step_load
                else f"{cfg.users} users (spawn {cfg.spawn_rate:g}/s) for {cfg.duration_s:g} s")
        console.print(f"locust against {target}: {what}")
        exit_code = _run_locust(cmd, cfg, out, console)
    finally:
        if tier is not None:
            with console.status("stopping the local tier"):
                tier.stop()

    stats_csv = out / f"{CSV_PREFIX}_stats.csv"
    history_csv = out / f"{CSV_PREFIX}_stats_history.csv"
    if not stats_csv.is_file() or not history_csv.is_file():
        raise SplitgateError(f"locust wrote no statistics (exit code {exit_code}); see {out / 'locust.log'}")
    stats = read_stats(stats_csv)
    png = plot_history(history_csv, out / "rps_latency.png")
    files = {
        "stats_csv": str(stats_csv),
        "history_csv": str(history_csv),
        "failures_csv": str(out / f"{CSV_PREFIX}_failures.csv"),
        "html": str(out / "report.html"),
        "png": str(png),
        "log": str(out / "locust.log"),
        "traffic": str(traffic_file),
    }
    step = None
    if cfg.step_load:
        step_file = out / "step_result.json"
        if not step_file.is_file():
            raise SplitgateError(f"the step-load shape wrote no result; see {out / 'locust.log'}")
        step = json.loads(step_file.read_text(encoding="utf-8"))
        step["replicas"] = cfg.replicas if cfg.target is None else None
        files["step_result"] = str(step_file)
    result = LoadTestResult(target=target, stats=stats, files=files, exit_code=exit_code, step=step)
    (out / "summary.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    files["summary"] = str(out / "summary.json")

    console.print(summary_table(stats, title=f"load test of {target}"))
    if step is not None:
        console.print(step_table(step))
        console.print(
            f"max sustainable rps at p99 <= {step['p99_target_ms']:g} ms: [bold]{step['max_sustainable_rps']:.1f}[/]"
            f" (at {step['at_users']} users)"
            + ("" if step["crossed"] else "  [yellow](target never crossed: raise --step-max-users)[/]")
        )
    console.print(f"reports in [bold]{out}[/]: report.html, {CSV_PREFIX}_stats*.csv, rps_latency.png")
    return result
