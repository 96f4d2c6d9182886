"""onnxruntime sessions cached per model file, with graceful provider fallback."""

from __future__ import annotations

import threading
from pathlib import Path

import onnxruntime as ort

__all__ = ["SessionCache"]


class SessionCache:
    """One InferenceSession per ONNX file, created on first use.

    Parameters:
        intra_op_threads: threads per session (0 = onnxruntime's default).
        providers: execution providers to try in order; those not available in
            this onnxruntime build are skipped, and CPU is always last.
    """

    def __init__(self, intra_op_threads: int = 0, providers: list[str] | None = None) -> None:
        self._threads = intra_op_threads
        available = set(ort.get_available_providers())
        wanted = [p for p in (providers or []) if p in available]
        self.providers = [*wanted, "CPUExecutionProvider"] if "CPUExecutionProvider" not in wanted else wanted
        self.skipped = [p for p in (providers or []) if p not in available]
        self._sessions: dict[Path, ort.InferenceSession] = {}
        self._lock = threading.Lock()

    def get(self, path: Path) -> ort.InferenceSession:
        with self._lock:
            session = self._sessions.get(path)
            if session is None:
                opts = ort.SessionOptions()
                if self._threads:
                    opts.intra_op_num_threads = self._threads
                session = ort.InferenceSession(str(path), opts, providers=self.providers)
                self._sessions[path] = session
            return session

    def run(self, path: Path, feeds: dict) -> dict:
        """Run the whole model at ``path``; return outputs by name."""
        session = self.get(path)
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds)))
