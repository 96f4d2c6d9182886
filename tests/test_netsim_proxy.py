"""The shaping proxy over a real TCP echo server: bytes pass unchanged, delay and
bandwidth are lower bounds the link must respect, outages hold traffic."""

from __future__ import annotations

import hashlib
import socket
import time

import pytest

from splitgate.netsim import LinkConditions, ShapingProxy


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(1 << 20, n - got))
        if not chunk:
            raise ConnectionError("closed early")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def test_bytes_pass_unchanged_and_delay_is_respected(echo_server: str) -> None:
    with ShapingProxy(echo_server, LinkConditions(rtt_ms=80, jitter_ms=20)) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            payload = bytes(range(256)) * 4000  # ~1 MB, every byte value
            start = time.monotonic()
            s.sendall(payload)
            echoed = _recv_exactly(s, len(payload))
            elapsed = time.monotonic() - start
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        # One RTT through the proxy is the least the echo can take.
        assert elapsed >= 0.08
        assert proxy.bytes_up == len(payload) and proxy.bytes_down == len(payload)


def test_bandwidth_is_a_floor_on_transfer_time(echo_server: str) -> None:
    # 400 KB at 4 Mbps up must take at least 0.8 s.
    with ShapingProxy(echo_server, LinkConditions(uplink_mbps=4)) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            start = time.monotonic()
            s.sendall(b"x" * 400_000)
            _recv_exactly(s, 400_000)
            assert time.monotonic() - start >= 0.8


def test_outage_holds_traffic_then_recovers(echo_server: str) -> None:
    with ShapingProxy(echo_server) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            s.sendall(b"a")
            assert _recv_exactly(s, 1) == b"a"
            proxy.set(outage=True)
            s.settimeout(0.5)
            s.sendall(b"b")
            with pytest.raises(TimeoutError):
                s.recv(1)
            proxy.set(outage=False)
            s.settimeout(5)
            assert _recv_exactly(s, 1) == b"b"


def test_outage_with_reset_closes_connections(echo_server: str) -> None:
    with ShapingProxy(echo_server, reset_on_outage=True) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            s.sendall(b"a")
            assert _recv_exactly(s, 1) == b"a"
            proxy.set(outage=True)
            s.settimeout(5)
            with pytest.raises((ConnectionError, OSError)):
                s.sendall(b"b")
                if not s.recv(1):
                    raise ConnectionError("closed")


def test_a_port_in_use_is_raised_in_the_caller_and_stop_is_safe(echo_server) -> None:
    """The loop thread's bind error reaches start()'s caller; the thread has ended and
    stop() afterwards does nothing (the shared LoopThread lifecycle)."""
    with ShapingProxy(echo_server) as first:
        second = ShapingProxy(echo_server, listen_port=first.port)
        with pytest.raises(OSError):
            second.start()
        second.stop()
        assert second._runner.loop is None  # noqa: SLF001
        with socket.create_connection(("127.0.0.1", first.port), timeout=5) as s:  # the first still relays
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
