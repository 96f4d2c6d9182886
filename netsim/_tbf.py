"""Optional kernel shaping backend: ``tc tbf`` on the loopback of a network namespace.

Where root is available (``ip netns`` and ``tc``), :class:`TbfLink` shapes
bandwidth in the kernel instead of in Python. This kernel has no ``netem``, so
delay, jitter, loss and outages are not available here: chain a
:class:`ShapingProxy` in front (bandwidth 0 = unlimited there) for those.

Only loopback addresses are used. The path of a connection::

    client -> 127.0.0.1:PORT (host relay) -> unix socket -> helper in the netns
           -> TCP over the netns's lo (tbf: uplink = dport B, downlink = sport B)
           -> helper -> unix socket -> host relay -> upstream

Path-based unix sockets cross network namespaces, so nothing but the netns's
own ``lo`` carries the shaped bytes. ``lo`` gets MTU 1500 so that tbf's burst
stays above the MTU. Root qdisc: ``htb`` (classification only; this kernel has
no ``prio``) with a ``tbf`` leaf per direction and two u32 filters (dport ->
uplink class, sport -> downlink class).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from splitgate.netsim._proxy import LinkConditions
from splitgate.netsim._tbf_relay import _join  # the same byte pump the namespace side runs

__all__ = ["TbfLink", "tbf_available"]


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def tbf_available() -> str | None:
    """None if :class:`TbfLink` can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found"
    name = f"sgprobe{uuid.uuid4().hex[:6]}"
    made = _run("ip", "netns", "add", name)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    try:
        _run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        r = _run("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "tbf",
                 "rate", "1mbit", "burst", "32kbit", "latency", "400ms")
        return None if r.returncode == 0 else f"tc tbf failed: {r.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", name)


def _rate(mbps: float | None) -> str:
    return "10gbit" if not mbps else f"{max(mbps, 0.001) * 1000:.3f}kbit"


def _burst(mbps: float | None) -> str:
    # >= MTU (1500) and ~4 ms of traffic, so high rates are not burst-limited.
    rate_bytes = (mbps or 10_000) * 1e6 / 8
    return f"{max(4000, int(rate_bytes * 0.004))}b"


class TbfLink:
    """A kernel-shaped loopback link to ``upstream`` (bandwidth only; see module docs).

    Parameters:
        upstream: ``host:port`` to forward to (loopback).
        conditions: initial bandwidths (only ``uplink_mbps``/``downlink_mbps`` are used).

    Raises:
        RuntimeError: :func:`tbf_available` says no, or the helper fails to start.
    """

    def __init__(self, upstream: str, conditions: LinkConditions | None = None) -> None:
        why = tbf_available()
        if why:
            raise RuntimeError(f"tc tbf backend unavailable: {why}")
        host, _, port = upstream.rpartition(":")
        self._upstream = (host or "127.0.0.1", int(port))
        self._conditions = conditions or LinkConditions()
        self.netns = f"splitgate{uuid.uuid4().hex[:8]}"
        self._dir = Path(tempfile.mkdtemp(prefix="splitgate-tbf-"))
        self._in = self._dir / "in.sock"
        self._out = self._dir / "out.sock"
        self._inner_port = 7000
        self._helper: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def conditions(self) -> LinkConditions:
        return self._conditions

    # -- tc ----------------------------------------------------------------------

    def _tc(self, *args: str) -> None:
        r = _run("ip", "netns", "exec", self.netns, "tc", *args)
        if r.returncode != 0:
            raise RuntimeError(f"tc {' '.join(args)}: {r.stderr.strip()}")

    def _band(self, verb: str, handle: str, parent: str, mbps: float | None) -> None:
        self._tc("qdisc", verb, "dev", "lo", "parent", parent, "handle", handle, "tbf",
                 "rate", _rate(mbps), "burst", _burst(mbps), "latency", "2000ms")

    def set(self, conditions: LinkConditions | None = None, **changes: object) -> LinkConditions:
        """Change the bandwidths now (other fields are ignored by this backend)."""
        from dataclasses import replace

        new = conditions or replace(self._conditions, **changes)  # type: ignore[arg-type]
        self._conditions = new
        if self._helper is not None:
            self._band("change", "10:", "1:1", new.uplink_mbps)
            self._band("change", "20:", "1:2", new.downlink_mbps)
        return new

    # -- life cycle -----------------------------------------------------------------

    def start(self) -> TbfLink:
        ns = self.netns
        for cmd in (("ip", "netns", "add", ns), ("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "mtu", "1500"),
                    ("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")):
            r = _run(*cmd)
            if r.returncode != 0:
                self.stop()
                raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
        try:
            # htb only classifies (its classes are never the limit); the tbf leaves shape.
            self._tc("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "30")
            for cls in ("1:1", "1:2", "1:30"):
                self._tc("class", "add", "dev", "lo", "parent", "1:", "classid", cls, "htb", "rate", "10gbit")
            self._band("add", "10:", "1:1", self._conditions.uplink_mbps)
            self._band("add", "20:", "1:2", self._conditions.downlink_mbps)
            p = str(self._inner_port)
            self._tc("filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                     "match", "ip", "dport", p, "0xffff", "flowid", "1:1")
            self._tc("filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "2", "u32",
                     "match", "ip", "sport", p, "0xffff", "flowid", "1:2")
            self._start_host_relays()
            self._helper = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "netsim._tbf_relay",
                 str(self._in), str(self._out), str(self._inner_port)],
                stdin=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 10
            while not self._in.exists():
                if self._helper.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the tbf relay helper did not start")
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_host_relays(self) -> None:
        ready = threading.Event()

        async def from_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                r2, w2 = await asyncio.open_unix_connection(str(self._in))
            except OSError:
                w.close()
                return
            await _join(r, w, r2, w2)

        async def to_upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                r2, w2 = await asyncio.open_connection(*self._upstream)
            except OSError:
                w.close()
                return
            await _join(r, w, r2, w2)

        async def main() -> None:
            tcp = await asyncio.start_server(from_client, "127.0.0.1", 0)
            self.port = tcp.sockets[0].getsockname()[1]
            await asyncio.start_unix_server(to_upstream, str(self._out))
            ready.set()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(main())
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="tbf-relay", daemon=True)
        self._thread.start()
        ready.wait(10)

    def stop(self) -> None:
        if self._helper is not None:
            self._helper.terminate()
            try:
                self._helper.wait(5)
            except subprocess.TimeoutExpired:
                self._helper.kill()
            self._helper = None
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(5)
            self._loop = None
        _run("ip", "netns", "del", self.netns)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> TbfLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
