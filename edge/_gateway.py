"""The one inference API apps call: run a partition's prefix on the device,
send the cut tensors to the cloud tier, and return the outputs with a trace."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edge._client import CloudClient
from planner import Partition, PlanBundle
from splitgate.errors import InvalidArgument, NotFound
from splitgate.validate import validate_inputs

__all__ = ["Gateway", "Result", "Trace"]


@dataclass
class Trace:
    """Where one request ran and what it cost."""

    model: str
    partition: str
    device_ms: float = 0.0
    network_ms: float = 0.0
    cloud_ms: float = 0.0
    total_ms: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    fallback: str | None = None


@dataclass
class Result:
    """Outputs by name, and the trace of how they were computed."""

    outputs: dict[str, np.ndarray]
    trace: Trace = field(repr=False)


class Gateway:
    """Run models from plan bundles across the device and a cloud tier.

    Parameters:
        bundles: plan bundle directories (or loaded :class:`PlanBundle` objects).
        cloud: ``host:port`` of the cloud tier, or None for device-only operation.
        intra_op_threads: onnxruntime threads per device session (0 = ORT default).
        timeout_s: per-request deadline for the cloud leg.
    """

    def __init__(
        self,
        bundles: Iterable[str | Path | PlanBundle],
        cloud: str | None = None,
        *,
        intra_op_threads: int = 0,
        timeout_s: float = 30.0,
    ) -> None:
        self._bundles: dict[str, PlanBundle] = {}
        for b in bundles:
            bundle = b if isinstance(b, PlanBundle) else PlanBundle.load(b)
            self._bundles[bundle.model_name] = bundle
        self._client = CloudClient(cloud, timeout_s=timeout_s) if cloud else None
        self._threads = intra_op_threads
        self._sessions: dict[Path, ort.InferenceSession] = {}
        self._lock = threading.Lock()

    @property
    def models(self) -> list[str]:
        return sorted(self._bundles)

    def bundle(self, model: str) -> PlanBundle:
        try:
            return self._bundles[model]
        except KeyError:
            raise NotFound(f"model '{model}' is not loaded; loaded models: {self.models}") from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _session(self, path: Path) -> ort.InferenceSession:
        with self._lock:
            session = self._sessions.get(path)
            if session is None:
                opts = ort.SessionOptions()
                if self._threads:
                    opts.intra_op_num_threads = self._threads
                session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
                self._sessions[path] = session
        return session

    def infer(
        self, model: str, inputs: Mapping[str, Any], *, partition: str | None = None
    ) -> Result:
        """Run ``model`` on ``inputs`` at ``partition`` ("device", "cloud" or "cut-K").

        Raises:
            NotFound: unknown model or partition.
            InvalidArgument: inputs with wrong names, dtypes or shapes; a cloud
                partition requested without a cloud tier.
            Unavailable / DeadlineExceeded: the cloud leg failed.
        """
        start = time.perf_counter()
        bundle = self.bundle(model)
        part = bundle.partition(partition or "device")
        feeds = validate_inputs(inputs, bundle.inputs, where=f"model '{model}'")
        trace = Trace(model=model, partition=part.id)
        outputs = self._run(bundle, part, feeds, trace)
        trace.total_ms = (time.perf_counter() - start) * 1e3
        return Result(outputs=outputs, trace=trace)

    def _run(
        self, bundle: PlanBundle, part: Partition, feeds: dict[str, np.ndarray], trace: Trace
    ) -> dict[str, np.ndarray]:
        cut = feeds
        if part.prefix_path is not None:
            session = self._session(part.prefix_path)
            t0 = time.perf_counter()
            names = [o.name for o in session.get_outputs()]
            cut = dict(zip(names, session.run(names, feeds)))
            trace.device_ms = (time.perf_counter() - t0) * 1e3
        if part.suffix_path is None:
            return cut
        if self._client is None:
            raise InvalidArgument(
                f"model '{bundle.model_name}' partition '{part.id}' needs the cloud tier, "
                "but this Gateway has no cloud address"
            )
        reply = self._client.infer(
            bundle.model_name, cut, partition=part.id, plan_digest=bundle.plan_digest
        )
        trace.cloud_ms = reply.cloud_ms
        trace.network_ms = reply.network_ms
        trace.bytes_sent = reply.bytes_sent
        trace.bytes_received = reply.bytes_received
        return reply.outputs
