"""An asyncio TCP proxy that shapes the link between edge and cloud.

Each direction has its own bandwidth (a token bucket: bytes leave no faster
than the rate), one-way delay (half the RTT, plus uniform jitter), packet loss
(emulated as TCP sees it: a lost packet is retransmitted after an RTO, and
everything behind it waits), stalls and an outage switch. Bytes are forwarded
unchanged, so gRPC/HTTP2 passes through as is. The proxy runs its event loop in
a background thread so that synchronous code (tests, the Gateway) can use it,
and conditions can change at run time (see :class:`splitgate.netsim.ScheduleDriver`).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, replace

from splitgate._loopthread import LoopThread

__all__ = ["LinkConditions", "ShapingProxy"]

_CHUNK = 16 * 1024  # small chunks keep the rate smooth at low bandwidth
#: Bytes per emulated packet (Ethernet MSS) for the loss model.
MSS = 1460
#: Linux's minimum retransmission timeout, ms.
MIN_RTO_MS = 200.0


@dataclass(frozen=True)
class LinkConditions:
    """The link's state. Bandwidths in Mbps (None = unlimited), times in ms.

    Attributes:
        uplink_mbps: edge -> cloud bandwidth.
        downlink_mbps: cloud -> edge bandwidth.
        rtt_ms: round-trip time added by the link (half each way).
        jitter_ms: uniform extra delay in [0, jitter_ms] per chunk, kept in order.
        outage: True = nothing passes (bytes are held, new connections stall);
            with ``reset_on_outage`` connections are closed instead.
        loss: probability that a packet (:data:`MSS` bytes) is lost. A TCP
            proxy cannot drop bytes of a stream, so a loss is emulated the way
            TCP experiences it: the link stalls for one retransmission
            (:attr:`rto_ms`) and everything behind the lost packet waits.
        retransmit_ms: the retransmission delay of a lost packet; None = one
            RTO, ``max(200 ms, 2 x RTT)`` (Linux's minimum RTO is 200 ms).
    """

    uplink_mbps: float | None = None
    downlink_mbps: float | None = None
    rtt_ms: float = 0.0
    jitter_ms: float = 0.0
    outage: bool = False
    loss: float = 0.0
    retransmit_ms: float | None = None

    @property
    def rto_ms(self) -> float:
        """Delay added per lost packet, ms."""
        if self.retransmit_ms is not None:
            return self.retransmit_ms
        return max(MIN_RTO_MS, 2.0 * self.rtt_ms)


class _Direction:
    """Delivery schedule of one direction: departure times under a token bucket."""

    def __init__(self) -> None:
        self.free_at = 0.0  # when the link finishes sending what it already holds
        self.last_delivery = 0.0

    def schedule(self, nbytes: int, rate_mbps: float | None, delay_s: float, stall_s: float = 0.0) -> float:
        now = time.monotonic()
        start = max(now, self.free_at)
        tx = 0.0 if not rate_mbps else nbytes * 8 / (rate_mbps * 1e6)
        # A retransmission stalls the link: later chunks wait behind it.
        self.free_at = start + tx + stall_s
        # Keep order: jitter may not let a chunk overtake the previous one.
        self.last_delivery = max(self.free_at + delay_s, self.last_delivery)
        return self.last_delivery


class ShapingProxy:
    """Forward ``127.0.0.1:<port>`` to ``upstream`` under :class:`LinkConditions`.

    Parameters:
        upstream: ``host:port`` to forward to.
        conditions: initial link state.
        listen_port: 0 picks a free port; see :attr:`address`.
        reset_on_outage: close connections when an outage starts (like a dead
            radio) instead of holding bytes (like a black hole).
        seed: jitter seed, for reproducible experiments.

    Use as a context manager, or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        upstream: str,
        conditions: LinkConditions | None = None,
        *,
        listen_port: int = 0,
        reset_on_outage: bool = False,
        seed: int = 0,
    ) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host or "127.0.0.1", int(port))
        self._conditions = conditions or LinkConditions()
        self._listen_port = listen_port
        self._reset_on_outage = reset_on_outage
        self._rng = random.Random(seed)
        self._runner = LoopThread("shaping-proxy")
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()
        self._resume: asyncio.Event | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.losses = 0
        self.port = 0

    # -- control ----------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def conditions(self) -> LinkConditions:
        return self._conditions

    def set(self, conditions: LinkConditions | None = None, **changes: object) -> LinkConditions:
        """Change the link now: pass a whole LinkConditions or fields to change."""
        new = conditions or replace(self._conditions, **changes)  # type: ignore[arg-type]
        was_out = self._conditions.outage
        self._conditions = new
        self._runner.call_soon(self._apply_outage, was_out, new.outage)
        return new

    def stall(self, duration_ms: float) -> None:
        """Freeze the link for ``duration_ms`` (a handover, a tunnel entrance): an
        outage that ends by itself. Connections are held, not reset."""
        self.set(outage=True)
        self._runner.call_soon(self._stall_timer, duration_ms / 1e3)

    def _stall_timer(self, seconds: float) -> None:
        asyncio.get_running_loop().call_later(seconds, self._end_stall)

    def _end_stall(self) -> None:
        self.set(outage=False)

    def _apply_outage(self, was_out: bool, now_out: bool) -> None:
        assert self._resume is not None
        if now_out:
            self._resume.clear()
            if self._reset_on_outage and not was_out:
                for w in list(self._writers):
                    w.transport.abort()
        else:
            self._resume.set()

    def start(self) -> ShapingProxy:
        """Listen and relay on a daemon thread; returns once listening."""
        self._runner.start(self._serve_start, self._serve_stop)
        return self

    def stop(self) -> None:
        self._runner.stop()

    def __enter__(self) -> ShapingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- data path --------------------------------------------------------

    async def _serve_start(self) -> None:
        self._resume = asyncio.Event()
        if not self._conditions.outage:
            self._resume.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self._listen_port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve_stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        assert self._resume is not None
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            await self._relay(client_r, client_w)
        except asyncio.CancelledError:
            # Stopping the proxy: finish quietly (asyncio's server callback
            # would report a cancelled handler as an error).
            client_w.transport.abort()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        assert self._resume is not None
        await self._resume.wait()  # during an outage new connections stall
        try:
            up_r, up_w = await asyncio.open_connection(*self._upstream)
        except OSError:
            client_w.transport.abort()
            return
        self._writers.update((client_w, up_w))
        try:
            await asyncio.gather(
                self._pipe(client_r, up_w, uplink=True),
                self._pipe(up_r, client_w, uplink=False),
            )
        finally:
            for w in (client_w, up_w):
                self._writers.discard(w)
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, uplink: bool) -> None:
        assert self._resume is not None
        direction = _Direction()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                at, data = item
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                await self._resume.wait()
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        sender = asyncio.ensure_future(deliver())
        self._tasks.add(sender)
        sender.add_done_callback(self._tasks.discard)
        try:
            while data := await reader.read(_CHUNK):
                await self._resume.wait()
                c = self._conditions
                rate = c.uplink_mbps if uplink else c.downlink_mbps
                delay = (c.rtt_ms / 2 + (self._rng.uniform(0, c.jitter_ms) if c.jitter_ms else 0)) / 1e3
                stall = self._losses(len(data), c.loss) * c.rto_ms / 1e3 if c.loss > 0 else 0.0
                queue.put_nowait((direction.schedule(len(data), rate, delay, stall), data))
                if uplink:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait(None)
            try:
                await sender
            except (ConnectionError, OSError, asyncio.CancelledError):
                pass

    def _losses(self, nbytes: int, loss: float) -> int:
        """How many of the packets carrying ``nbytes`` are lost (binomial draw)."""
        packets = max(1, math.ceil(nbytes / MSS))
        lost = sum(1 for _ in range(packets) if self._rng.random() < loss)
        self.losses += lost
        return lost
