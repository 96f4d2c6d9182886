"""Block a foreground server command until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import threading

__all__ = ["wait_for_stop"]


def wait_for_stop() -> None:
    """Return on SIGTERM or KeyboardInterrupt; the caller then stops what it started."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
