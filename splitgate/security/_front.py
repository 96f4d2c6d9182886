"""The TLS front: an asyncio TLS terminator relaying bytes to a plaintext
loopback gRPC port (Ray Serve's gRPC ingress has no TLS option)."""

from __future__ import annotations

import asyncio
import ssl
from typing import Self

from splitgate._loopthread import LoopThread
from splitgate.errors import ConfigError
from splitgate.security._tls import TlsConfig

__all__ = ["TlsFront"]

_CHUNK_BYTES = 64 * 1024


def _server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """A server-side SSL context for ``tls`` that speaks HTTP/2 (gRPC) via ALPN.

    Raises:
        ConfigError: cert or key missing, mutual TLS without ``ca``, or files that do not load.
    """
    if tls.cert is None or tls.key is None:
        raise ConfigError("a TLS front needs both cert and key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
        if tls.require_client_cert:
            if tls.ca is None:
                raise ConfigError("mutual TLS (require_client_cert) needs ca")
            ctx.load_verify_locations(tls.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS front: cannot load certificates: {exc}") from None
    ctx.set_alpn_protocols(["h2"])  # gRPC clients insist on HTTP/2 via ALPN
    return ctx


def _parse_upstream(upstream: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) -> (host, port); an empty host means 127.0.0.1."""
    host, _, port = upstream.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy ``src`` to ``dst`` until either ends, then close ``dst``."""
    try:
        while data := await src.read(_CHUNK_BYTES):
            dst.write(data)
            await dst.drain()
    except (ConnectionError, OSError, ssl.SSLError):
        pass
    finally:
        dst.close()  # either side ending ends the connection (TLS has no half-close)


class TlsFront:
    """Terminate TLS (optionally mutual) on ``host:port`` and relay the
    plaintext bytes to a loopback ``upstream`` gRPC port, unchanged.

    Used in front of Ray Serve's gRPC proxy, which has no TLS option. The
    relay is byte-for-byte (HTTP/2 passes through), so call metadata such as
    the auth token reaches the upstream. Runs its own event loop thread.

    Parameters:
        upstream: ``host:port`` of the plaintext server (should be loopback).
        tls: server certificate/key (+ ``ca``/``require_client_cert`` for mutual TLS).
        host, port: where to listen (port 0 = a free one; see :attr:`address`).

    Raises:
        ConfigError: the certificates do not load.
    """

    def __init__(self, upstream: str, tls: TlsConfig, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._upstream = _parse_upstream(upstream)
        self._ctx = _server_ssl_context(tls)
        self._host = host
        self.port = port
        self._runner = LoopThread("tls-front")
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.handshake_failures = 0

    @property
    def address(self) -> str:
        """``host:port`` where the front listens (the real port once started)."""
        return f"{self._host}:{self.port}"

    def start(self) -> Self:
        """Listen and relay on a daemon thread; returns once listening.

        Raises:
            ConfigError: the address cannot be bound.
        """
        try:
            self._runner.start(self._open, self._close)
        except Exception as exc:  # noqa: BLE001 - a bind or TLS set-up failure, in one line
            raise ConfigError(f"TLS front on {self._host}:{self.port}: {exc}") from None
        return self

    def stop(self) -> None:
        """Stop listening and abort open connections (waits up to 10 s for the thread)."""
        self._runner.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _open(self) -> None:
        """Bind the listener (on the loop thread)."""
        self._server = await asyncio.start_server(self._handle, self._host, self.port, ssl=self._ctx)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        """Close the listener and abort every open connection."""
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.sleep(0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client connection: open the upstream and relay both ways."""
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._writers.discard(writer)
            self._writers.discard(up_writer)
