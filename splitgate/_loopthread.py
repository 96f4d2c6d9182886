"""An asyncio event loop on a daemon thread, for servers started from sync code.

The TLS front (:mod:`splitgate.security._front`) and the shaping proxy
(:mod:`splitgate.netsim._proxy`) both run an asyncio server behind a blocking
``start()``/``stop()``; this is their shared lifecycle.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["LoopThread"]


class LoopThread:
    """One event loop on one daemon thread.

    Parameters:
        name: the thread's name.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, open_: Callable[[], Awaitable[None]], close: Callable[[], Awaitable[None]]) -> None:
        """Run ``open_()`` on a new loop thread and return once it finished; the loop then
        runs until :meth:`stop`, which awaits ``close()`` on it before closing the loop.

        Raises:
            BaseException: whatever ``open_()`` raised (the thread has ended then).
        """
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self.loop = loop
            try:
                loop.run_until_complete(open_())
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                errors.append(exc)
                self.loop = None
                loop.close()
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(close())
            loop.close()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            raise errors[0]

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule ``fn(*args)`` on the loop from any thread (nothing when not running)."""
        loop = self.loop
        if loop is not None:
            loop.call_soon_threadsafe(fn, *args)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the loop (after ``close()``) and wait up to ``timeout_s`` for the thread."""
        loop, thread = self.loop, self._thread
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=timeout_s)
        self.loop = None
