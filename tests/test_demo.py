"""``splitgate demo``: its checks and report (unit), and end to end (integration: a
real Ray Serve tier, a real shaped link, real Gateways).

The end-to-end run happens in a child process: the demo starts (and must stop)
its own Ray, which must not touch the session's shared tier in this process
(``conftest.cloud_tier``).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from splitgate._demo import (
    MODES,
    DemoReport,
    DemoSettings,
    ModeStats,
    PhaseResult,
    _matches,
    _schedule,
    run_link_demo,
)
from splitgate.errors import InvalidArgument


def test_the_schedule_steps_wifi_4g_3g_outage_wifi() -> None:
    points = _schedule().points
    assert [p.label for p in points] == ["wifi", "4g", "3g", "outage", "wifi"]
    assert [p.outage for p in points] == [False, False, False, True, False]
    assert [p.uplink_mbps for p in points if not p.outage] == [18.88, 5.85, 1.1, 18.88]  # DADS's uplinks


def test_raw_outputs_must_meet_rtol_and_lossy_ones_the_top1_class() -> None:
    want = {"logits": np.array([[1.0, 3.0, 2.0]], dtype=np.float32)}
    close = {"logits": want["logits"] * (1 + 1e-6)}
    off = {"logits": np.array([[1.0, 2.9, 2.0]], dtype=np.float32)}
    flipped = {"logits": np.array([[1.0, 2.0, 2.1]], dtype=np.float32)}
    assert _matches(close, want, lossy=False)
    assert not _matches(off, want, lossy=False)
    assert _matches(off, want, lossy=True)
    assert not _matches(flipped, want, lossy=True)


def _phase(label: str, adaptive_ran: str) -> PhaseResult:
    phase = PhaseResult(label, 1.0, 1.0, 10.0, outage=False)
    for mode in MODES:
        stats = phase.modes[mode]
        stats.latencies_ms.append(1.0)
        stats.partitions[adaptive_ran if mode == "adaptive" else "device"] += 1
        stats.matched = 1
    return phase


def test_the_report_is_ok_only_when_the_policy_moved_outputs_matched_and_all_stopped() -> None:
    report = DemoReport("m", 30.0, phases=[_phase("wifi", "cloud"), _phase("3g", "device")],
                        stopped={"gateway adaptive": True, "cloud tier (Ray Serve + Ray)": True})
    assert report.adaptive_partitions == ["cloud", "device"] and report.ok
    report.stopped["cloud tier (Ray Serve + Ray)"] = False
    assert not report.ok
    report.stopped["cloud tier (Ray Serve + Ray)"] = True
    report.phases[1].modes["cloud-only"].matched = 0
    assert not report.all_match and not report.ok
    same = DemoReport("m", 30.0, phases=[_phase("wifi", "device"), _phase("3g", "device")], stopped={"x": True})
    assert not same.ok
    assert ModeStats().count == 0


def test_the_summary_names_what_ran_the_fallbacks_and_the_verdict() -> None:
    from rich.console import Console

    from splitgate._demo import _conclusion, _fallback_legend, _summary_table

    outage = _phase("outage", "device")
    outage.outage = True
    outage.modes["cloud-only"].fallbacks["hedged"] += 1
    report = DemoReport("m", 30.0, phases=[_phase("wifi", "cloud"), outage], stopped={"x": True})
    console = Console(record=True, width=200)
    console.print(_summary_table(report))
    console.print(_conclusion(report, 12.0))
    text = console.export_text()
    assert "cloud ×1" in text and "hedged ×1" in text and "outage: nothing passes" in text
    assert "wifi: cloud -> outage: device" in text and "shown" in text and "not shown" not in text
    assert _fallback_legend(report).startswith("fallback hedged: the cloud call was late")


def test_bad_settings_are_refused_before_anything_starts(tmp_path) -> None:
    with pytest.raises(InvalidArgument, match="requests per phase"):
        run_link_demo(DemoSettings(requests=0, workdir=str(tmp_path)))
    with pytest.raises(InvalidArgument, match="device factor"):
        run_link_demo(DemoSettings(device_factor=0.5, workdir=str(tmp_path)))
    assert not any(tmp_path.iterdir()), "nothing may be written for refused settings"


# -- end to end ----------------------------------------------------------------------


def _psutil():
    return pytest.importorskip("psutil")


def _ray_processes(gcs_address: str) -> list[str]:
    """Processes of the Ray cluster at ``gcs_address`` (by their command lines)."""
    port = gcs_address.rpartition(":")[2]
    found = []
    for proc in _psutil().process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if gcs_address in cmd or f"--gcs_server_port={port}" in cmd:
            found.append(f"{proc.info['pid']}: {cmd[:120]}")
    return found


def _descendants(pid: int) -> list[str]:
    return [f"{p.pid}: {' '.join(p.cmdline())[:120]}" for p in _psutil().Process(pid).children(recursive=True)]


def _gone(gcs_address: str, child_pid: int, timeout_s: float = 15.0) -> list[str]:
    """Wait for the cluster's processes (by address, and the child's own
    descendants) to exit; return those still running."""
    deadline = time.monotonic() + timeout_s
    while (left := _ray_processes(gcs_address) + _descendants(child_pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.mark.integration
def test_demo_shows_the_policy_follow_the_link_and_stops_everything(tmp_path) -> None:
    pytest.importorskip("ray")
    pytest.importorskip("torch")
    _psutil()
    settings = DemoSettings(requests=1, workdir=str(tmp_path))
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as child:
        report = child.submit(run_link_demo, settings).result(timeout=240)
        # The child is still alive here: its Ray must be gone because the demo stopped it,
        # not because the child exited.
        child_pid = child.submit(os.getpid).result()
        assert report.ray_gcs_address, "the demo did not record the Ray it started"
        left = _gone(report.ray_gcs_address, child_pid)
    assert not left, "Ray processes outlived the demo:\n" + "\n".join(left)
    assert report.stopped and all(report.stopped.values()), report.stopped

    labels = [p.label for p in report.phases]
    assert labels == ["wifi", "4g", "3g", "outage", "wifi"]
    picks = report.adaptive_partitions
    assert len(set(picks)) > 1, f"the policy ran one partition in every phase: {picks}"
    assert picks[0] != "device", "on WiFi offloading must win for a Pi-class device"

    for phase in report.phases:
        for mode in MODES:
            stats = phase.modes[mode]
            assert stats.count == 1, (phase.label, mode, stats)
            assert stats.matched == stats.count, f"{phase.label}/{mode}: outputs differ from the full model"
        assert set(phase.modes["device-only"].partitions) == {"device"}
        cloud_only = phase.modes["cloud-only"]
        # ("device" only as a fallback: an open circuit breaker sends the request there)
        # (the best guarded cloud encoding for the phase's link: cloud or cloud@E)
        assert all(pid == "device" or pid.partition("@")[0] == "cloud" for pid in cloud_only.partitions)
        assert cloud_only.partitions["device"] <= sum(cloud_only.fallbacks.values()), (phase.label, cloud_only)

    outage = report.phases[3]
    for mode in MODES:
        stats = outage.modes[mode]
        assert stats.local == stats.count, f"outage/{mode} did not complete locally: {stats}"
        assert stats.bytes_sent == 0
    assert sum(outage.modes["cloud-only"].fallbacks.values()) == 1, "cloud-only must fall back in the outage"
    assert report.ok
