"""Network profiles, traces, loaders, loss/stall emulation, the schedule driver and
the optional tc-tbf backend (skipped where it cannot run)."""

from __future__ import annotations

import math
import socket
import threading
import time
from pathlib import Path

import pytest

from splitgate.netsim import LinkConditions, ScheduleDriver, ShapingProxy, TbfLink, profile, tbf_available, traces
from splitgate.netsim.profiles import DADS_UPLINKS, PROFILES
from splitgate.planner import RADIOS


def _roundtrip(port: int, payload: bytes) -> float:
    with socket.create_connection(("127.0.0.1", port)) as s:
        start = time.monotonic()
        s.sendall(payload)
        got = 0
        while got < len(payload):
            chunk = s.recv(65536)
            assert chunk
            got += len(chunk)
        return time.monotonic() - start


def test_profiles_use_dads_uplinks_and_huang_radios() -> None:
    for name, up in DADS_UPLINKS.items():
        assert profile(name).uplink_mbps == up
        assert "DADS" in profile(name).sources["uplink_mbps"]
    assert profile("lte") is profile("4g") and profile("4g").downlink_mbps == 13.0
    for p in PROFILES.values():
        assert p.radio in RADIOS and set(p.sources) >= {"uplink_mbps", "downlink_mbps", "rtt_ms", "radio"}
    with pytest.raises(KeyError, match="known"):
        profile("6g")


def test_trace_transfer_integrates_steps_and_outages() -> None:
    tr = traces.steps([{"profile": None, "duration_s": 1, "uplink_mbps": 8, "downlink_mbps": 8, "rtt_ms": 0},
                       {"profile": None, "duration_s": 1, "uplink_mbps": 8, "downlink_mbps": 8, "rtt_ms": 0,
                        "outage": True},
                       {"profile": None, "duration_s": 1, "uplink_mbps": 4, "downlink_mbps": 4, "rtt_ms": 0}])
    # 1 MB/s for 0.5 s (500 KB), nothing for 1 s, then 0.5 MB/s for the last 500 KB.
    assert tr.transfer_end(0.5, 1_000_000, "up") == pytest.approx(3.0)
    assert tr.outage_end(1.2) == 2.0 and tr.outage_end(0.3) == 0.3
    forever = traces.with_outages(traces.constant("4g", 10), [(5, 100)])
    assert math.isinf(forever.transfer_end(4.99, 10**7, "up"))


def test_generators_and_csv_roundtrip(tmp_path: Path) -> None:
    walk = traces.random_walk("4g", 30, seed=3)
    assert walk == traces.random_walk("4g", 30, seed=3)  # seeded
    assert min(walk.uplinks()) >= 5.85 / 20 and max(walk.uplinks()) <= 5.85 * 4
    cut = traces.with_outages(walk, [(10, 3)])
    assert cut.at(11).outage and not cut.at(13.5).outage and cut.at(13.5).uplink_mbps == walk.at(13.5).uplink_mbps
    back = traces.load_csv(traces.save_csv(cut, tmp_path / "t.csv"))
    assert back.points == cut.points and back.duration_s == cut.duration_s


def test_public_log_loaders_read_the_shipped_samples() -> None:
    riiser = traces.load("riiser_tram_synthetic.log")
    ghent = traces.load("ghent_car_synthetic.log")
    assert riiser.points[0].radio == "3g" and ghent.points[0].radio == "lte"
    assert any(p.outage for p in riiser.points)  # the sample's tunnel (0 bytes)
    # column 5 / column 6 is the throughput: first Ghent sample 1879500 B in 1074 ms
    assert ghent.points[0].downlink_mbps == pytest.approx(1879500 * 8 / 1074e3, rel=1e-3)
    assert 55 < riiser.duration_s < 70 and 55 < ghent.duration_s < 70


def test_loss_is_emulated_as_retransmission_stalls(echo_server: str) -> None:
    with ShapingProxy(echo_server, LinkConditions(loss=0.5, retransmit_ms=100), seed=1) as proxy:
        elapsed = _roundtrip(proxy.port, b"x" * 20_000)  # ~14 packets each way: several losses
        assert proxy.losses >= 2
        assert elapsed >= 0.1 * proxy.losses / 2  # losses of one direction stall that direction


def test_stall_holds_traffic_then_ends_by_itself(echo_server: str) -> None:
    with ShapingProxy(echo_server) as proxy:
        _roundtrip(proxy.port, b"warm")
        proxy.stall(400)
        assert _roundtrip(proxy.port, b"a" * 100) >= 0.35
        assert not proxy.conditions.outage


def test_schedule_driver_changes_the_link_on_time(echo_server: str) -> None:
    """Each change reaches the link in order, never before its time, and (on a
    loaded box, generously) not long after it. Waits on the changes, not on sleeps."""
    tr = traces.steps([("wifi", 0.3), ("cat1", 0.3), ("wifi", 0.3)])
    seen: list[tuple[float, str, float]] = []  # (trace time, label, the link's uplink then)
    all_applied = threading.Event()
    with ShapingProxy(echo_server) as proxy:

        def on_change(elapsed_s: float, point) -> None:
            seen.append((elapsed_s, point.label, proxy.conditions.uplink_mbps))
            if len(seen) == len(tr.points):
                all_applied.set()

        with ScheduleDriver(tr, [proxy], on_change=on_change) as driver:
            assert all_applied.wait(10.0), f"changes applied: {seen}"
    assert [(label, up) for _, label, up in seen] == [("wifi", 18.88), ("cat1", 0.13), ("wifi", 18.88)]
    assert [p.label for _, p in driver.applied] == ["wifi", "cat1", "wifi"]
    for (at, label, _), point in zip(seen, tr.points):
        assert point.t_s <= at < point.t_s + 1.0, f"{label} due at {point.t_s}s, applied at {at:.3f}s"


@pytest.mark.skipif(tbf_available() is not None, reason=f"tc tbf backend: {tbf_available()}")
def test_tbf_backend_shapes_bandwidth_in_the_kernel(echo_server: str) -> None:
    with TbfLink(echo_server, LinkConditions(uplink_mbps=2.0, downlink_mbps=50.0)) as link:
        assert _roundtrip(link.port, b"x" * 250_000) >= 0.9  # 2 Mbit at 2 Mbps up, at least ~1 s
        link.set(uplink_mbps=50.0)
        assert _roundtrip(link.port, b"y" * 250_000) < 0.9
