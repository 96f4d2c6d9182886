"""onnxruntime sessions cached per model file, with graceful provider fallback."""

from __future__ import annotations

import threading
from pathlib import Path

import onnxruntime as ort

from splitgate._ort_errors import RunSite, is_onnxruntime_error, load_error, run_error

__all__ = ["RunSite", "SessionCache"]


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

    def get(self, path: Path, site: RunSite | None = None) -> ort.InferenceSession:
        """The session of the ONNX file at ``path``, created on first use.

        Raises:
            BundleError: onnxruntime cannot load the file (named with ``site``).
            ResourceExhausted: not enough memory to load it.
        """
        with self._lock:
            session = self._sessions.get(path)
            if session is None:
                opts = ort.SessionOptions()
                # errors only: a model whose declared output shapes are wrong (common in exports) would
                # log a warning on every run
                opts.log_severity_level = 3
                if self._threads:
                    opts.intra_op_num_threads = self._threads
                try:
                    session = ort.InferenceSession(str(path), opts, providers=self.providers)
                except Exception as exc:
                    if not is_onnxruntime_error(exc):
                        raise
                    raise load_error(exc, site, str(path)) from None
                self._sessions[path] = session
            return session

    def run(self, path: Path, feeds: dict, site: RunSite | None = None) -> dict:
        """Run the whole model at ``path``; return outputs by name.

        Args:
            path: the ONNX file (a partition's prefix or suffix, or the full model).
            feeds: input name -> array, already validated against the declared inputs.
            site: which model, partition and part this is, for error messages.

        Raises:
            ModelRunError: the model failed on these inputs (INVALID_ARGUMENT;
                the message names the partition, node, input shapes and reason).
            ResourceExhausted: onnxruntime could not allocate memory.
            BundleError: onnxruntime cannot load the file.
        """
        session = self.get(path, site)
        names = [o.name for o in session.get_outputs()]
        try:
            values = session.run(names, feeds, _quiet_run())
        except Exception as exc:
            if not is_onnxruntime_error(exc):
                raise
            raise run_error(exc, site, feeds) from None
        return dict(zip(names, values))


def _quiet_run() -> ort.RunOptions:
    """Run options that keep onnxruntime from logging a failed run's raw dump
    to stderr: the failure is raised as a typed error that says it better."""
    options = ort.RunOptions()
    options.log_severity_level = 4  # fatal only
    return options
