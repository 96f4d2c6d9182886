"""``splitgate demo`` end to end: a real Ray Serve tier, a real shaped link, real Gateways.

The demo runs in a child process: it starts (and must stop) its own Ray, which
must not touch the session's shared tier in this process (``conftest.cloud_tier``).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import pytest

pytestmark = pytest.mark.integration

pytest.importorskip("ray")
pytest.importorskip("torch")
psutil = pytest.importorskip("psutil")


def _ray_processes(gcs_address: str) -> list[str]:
    """Processes of the Ray cluster at ``gcs_address`` (by their command lines)."""
    port = gcs_address.rpartition(":")[2]
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if gcs_address in cmd or f"--gcs_server_port={port}" in cmd:
            found.append(f"{proc.info['pid']}: {cmd[:120]}")
    return found


def _descendants(pid: int) -> list[str]:
    return [f"{p.pid}: {' '.join(p.cmdline())[:120]}" for p in psutil.Process(pid).children(recursive=True)]


def _gone(gcs_address: str, child_pid: int, timeout_s: float = 15.0) -> list[str]:
    """Wait for the cluster's processes (by address, and the child's own
    descendants) to exit; return those still running."""
    deadline = time.monotonic() + timeout_s
    while (left := _ray_processes(gcs_address) + _descendants(child_pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_demo_shows_the_policy_follow_the_link_and_stops_everything(tmp_path) -> None:
    from splitgate._demo import MODES, DemoSettings, run_link_demo

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
        assert set(phase.modes["cloud-only"].partitions) == {"cloud"}

    outage = report.phases[3]
    for mode in MODES:
        stats = outage.modes[mode]
        assert stats.local == stats.count, f"outage/{mode} did not complete locally: {stats}"
        assert stats.bytes_sent == 0
    assert sum(outage.modes["cloud-only"].fallbacks.values()) == 1, "cloud-only must fall back in the outage"
    assert report.ok
