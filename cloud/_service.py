"""The cloud tier's OIP logic, independent of how it is hosted.

:class:`SuffixService` turns a ``ModelInferRequest`` for (model, partition) into
a ``ModelInferResponse`` by running that partition's suffix in onnxruntime. The
Ray Serve deployment wraps it; so does the plain grpcio baseline used by the
benchmarks. It raises typed :mod:`splitgate.errors`; hosts map them to statuses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from cloud._batch import Item
from planner import PlanBundle
from splitgate import codec
from splitgate.encoding import read_decoded_inputs
from splitgate.errors import FailedPrecondition, InvalidArgument, NotFound
from splitgate.protocol import inference_pb2 as pb
from splitgate.validate import validate_inputs

__all__ = [
    "SuffixService",
    "Prepared",
    "PARAM_PARTITION",
    "PARAM_PLAN_DIGEST",
    "PARAM_CLOUD_MS",
    "PARAM_QUEUE_DEPTH",
    "PARAM_BATCH_SIZE",
]

PARAM_PARTITION = "splitgate.partition"
PARAM_PLAN_DIGEST = "splitgate.plan_digest"
PARAM_CLOUD_MS = "splitgate.cloud_ms"
PARAM_QUEUE_DEPTH = "splitgate.queue_depth"
PARAM_BATCH_SIZE = "splitgate.batch_size"

SERVER_NAME = "splitgate-cloud"
# Partition used when a plain OIP client sends the model's own inputs.
DEFAULT_PARTITION = "cloud"


class SuffixService:
    """Serve the suffixes of every partition of a set of plan bundles.

    Parameters:
        bundle_dirs: plan bundle directories (verified on load).
        intra_op_threads: onnxruntime threads per session (0 = ORT default).
    """

    def __init__(self, bundle_dirs: Iterable[str | Path], *, intra_op_threads: int = 0) -> None:
        self._bundles: dict[str, PlanBundle] = {}
        for d in bundle_dirs:
            bundle = PlanBundle.load(d)
            self._bundles[bundle.model_name] = bundle
        self._threads = intra_op_threads
        self._sessions: dict[tuple[str, str], ort.InferenceSession] = {}
        self._lock = threading.Lock()
        self._in_flight = 0

    # -- lookup -----------------------------------------------------------

    @property
    def models(self) -> list[str]:
        return sorted(self._bundles)

    def bundle(self, model: str) -> PlanBundle:
        try:
            return self._bundles[model]
        except KeyError:
            raise NotFound(f"model '{model}' is not served here; served models: {self.models}") from None

    def _session(self, model: str, partition_id: str) -> tuple[ort.InferenceSession, object]:
        bundle = self.bundle(model)
        partition = bundle.partition(partition_id)
        if partition.suffix_path is None:
            raise InvalidArgument(
                f"model '{model}' partition '{partition_id}' runs entirely on the device; "
                "it has no cloud suffix"
            )
        key = (model, partition_id)
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                opts = ort.SessionOptions()
                if self._threads:
                    opts.intra_op_num_threads = self._threads
                session = ort.InferenceSession(
                    str(partition.suffix_path), opts, providers=["CPUExecutionProvider"]
                )
                self._sessions[key] = session
        return session, partition

    # -- OIP methods --------------------------------------------------------

    def server_live(self) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def server_ready(self) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self._bundles))

    def server_metadata(self) -> pb.ServerMetadataResponse:
        from splitgate import __version__

        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=["splitgate"])

    def model_ready(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name in self._bundles)

    def model_metadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        """Metadata of the full model; ``version`` may name a partition to describe its suffix."""
        bundle = self.bundle(request.name)
        if request.version and request.version != DEFAULT_PARTITION:
            partition = bundle.partition(request.version)
            inputs = partition.cut_tensors
        else:
            inputs = bundle.inputs
        response = pb.ModelMetadataResponse(
            name=bundle.model_name, versions=[bundle.plan_digest[:12]], platform="onnxruntime_onnx"
        )
        for spec in inputs:
            response.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        for spec in bundle.outputs:
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
        return response

    def prepare(self, request: pb.ModelInferRequest) -> Prepared:
        """Resolve and validate a ModelInfer request without running it.

        Raises:
            NotFound: unknown model or partition.
            FailedPrecondition: the request's plan digest is not the served plan.
            InvalidArgument: bad inputs or requested outputs.
        """
        params = codec.read_params(request.parameters)
        model = request.model_name
        bundle = self.bundle(model)
        partition_id = str(params.get(PARAM_PARTITION, DEFAULT_PARTITION))
        digest = params.get(PARAM_PLAN_DIGEST)
        if digest and digest != bundle.plan_digest:
            raise FailedPrecondition(
                f"model '{model}': request plan digest {str(digest)[:12]} differs from the served "
                f"plan {bundle.plan_digest[:12]}; reload the bundle on the edge"
            )
        session, partition = self._session(model, partition_id)
        where = f"model '{model}' partition '{partition_id}'"
        # Cut tensors may arrive compressed (splitgate.encoding); decode before validating.
        feeds = validate_inputs(read_decoded_inputs(request), partition.cut_tensors, where=where)
        wanted = [o.name for o in request.outputs]
        names = [o.name for o in session.get_outputs()]
        for name in wanted:
            if name not in names:
                raise InvalidArgument(f"{where}: unknown requested output {name!r}; outputs are {names}")
        dynamic = frozenset(t.name for t in partition.cut_tensors if t.shape and t.shape[0] < 0)
        item = Item(
            key=(model, partition_id), feeds=feeds, outputs=tuple(wanted or names), batchable_inputs=dynamic
        )
        return Prepared(item=item, model=model, partition_id=partition_id, request_id=request.id,
                        plan_digest=bundle.plan_digest, where=where)

    def run(self, key: tuple[str, str], outputs: tuple[str, ...], feeds: dict) -> list:
        """Run the suffix ``key`` = (model, partition) once. Raises InvalidArgument."""
        session, _ = self._session(*key)
        return _run(session, list(outputs), feeds, f"model '{key[0]}' partition '{key[1]}'")

    def respond(
        self, prepared: Prepared, values: list, *, cloud_ms: float, queue_depth: int, batch_size: int = 1
    ) -> pb.ModelInferResponse:
        """Build the response of a prepared request from its suffix outputs."""
        response = pb.ModelInferResponse(model_name=prepared.model, id=prepared.request_id)
        codec.add_outputs(response, dict(zip(prepared.item.outputs, values)))
        codec.set_params(
            response.parameters,
            {
                PARAM_PARTITION: prepared.partition_id,
                PARAM_PLAN_DIGEST: prepared.plan_digest,
                PARAM_CLOUD_MS: cloud_ms,
                PARAM_QUEUE_DEPTH: queue_depth,
                PARAM_BATCH_SIZE: batch_size,
            },
        )
        return response

    def model_infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """Run one suffix, unbatched. Raises NotFound / InvalidArgument / FailedPrecondition.

        ``splitgate.queue_depth`` is the number of ModelInfer calls inside this
        service (running or waiting for a session) when the call started.
        """
        with self._lock:
            self._in_flight += 1
            depth = self._in_flight
        try:
            prepared = self.prepare(request)
            start = time.perf_counter()
            values = self.run(prepared.item.key, prepared.item.outputs, prepared.item.feeds)
            cloud_ms = (time.perf_counter() - start) * 1e3
        finally:
            with self._lock:
                self._in_flight -= 1
        return self.respond(prepared, values, cloud_ms=cloud_ms, queue_depth=depth)


@dataclass
class Prepared:
    """A validated ModelInfer request, ready to run (alone or in a batch)."""

    item: Item
    model: str
    partition_id: str
    request_id: str
    plan_digest: str
    where: str


_ORT_INPUT_ERRORS = tuple(
    getattr(ort.capi.onnxruntime_pybind11_state, n)
    for n in ("InvalidArgument", "RuntimeException", "Fail")
    if hasattr(ort.capi.onnxruntime_pybind11_state, n)
)


def _run(session: ort.InferenceSession, outputs: list[str], feeds: dict, where: str) -> list:
    # Inputs passed validation, so an ORT failure here means the values or a
    # dynamic dimension don't fit the graph (e.g. a wrong spatial size).
    try:
        return session.run(outputs, feeds)
    except _ORT_INPUT_ERRORS as exc:
        raise InvalidArgument(f"{where}: onnxruntime rejected the inputs: {exc}") from None
