"""The helper :class:`splitgate.netsim.TbfLink` runs inside its network namespace.

``python -m splitgate.netsim._tbf_relay IN_SOCK OUT_SOCK PORT``: accept on unix socket
IN_SOCK, carry each connection over TCP 127.0.0.1:PORT (the namespace's shaped
``lo``), and hand it to unix socket OUT_SOCK (served by the host side).
"""

from __future__ import annotations

import asyncio
import sys


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        w.close()


async def _join(r1: asyncio.StreamReader, w1: asyncio.StreamWriter,
                r2: asyncio.StreamReader, w2: asyncio.StreamWriter) -> None:
    await asyncio.gather(_pipe(r1, w2), _pipe(r2, w1))


async def main(in_sock: str, out_sock: str, port: int) -> None:
    async def inner(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await asyncio.open_unix_connection(out_sock)
        except OSError:
            w.close()
            return
        await _join(r, w, r2, w2)

    async def outer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            w.close()
            return
        await _join(r, w, r2, w2)

    await asyncio.start_server(inner, "127.0.0.1", port)
    server = await asyncio.start_unix_server(outer, in_sock)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
