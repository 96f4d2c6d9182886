"""The cloud tier's OIP logic, independent of how it is hosted.

:class:`SuffixService` turns a ``ModelInferRequest`` for (model, partition) into
a ``ModelInferResponse`` by running that partition's suffix in onnxruntime. The
Ray Serve deployment wraps it; so does the plain grpcio baseline used by the
benchmarks. It raises typed :mod:`splitgate.errors`; hosts map them to statuses.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from splitgate.cloud._admission import AdmissionQueue, request_terms
from splitgate.cloud._batch import Item
from splitgate.planner import PlanBundle
from splitgate import codec
from splitgate._ort_errors import RunSite, clean_reason, is_onnxruntime_error, load_error, run_error
from splitgate.encoding import read_decoded_inputs
from splitgate.errors import (
    BundleError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SplitgateError,
)
from splitgate.protocol import inference_pb2 as pb
from splitgate.security import TrustedKeys, verify_bundle
from splitgate.validate import Limits, validate_inputs, validate_outputs
from splitgate import contract

__all__ = [
    "PARAM_BATCH_SIZE",
    "PARAM_CLOUD_MS",
    "PARAM_PARTITION",
    "PARAM_PLAN_DIGEST",
    "PARAM_QUEUE_DEPTH",
    "Prepared",
    "SuffixService",
]

PARAM_PARTITION = contract.PARTITION
PARAM_PLAN_DIGEST = contract.PLAN_DIGEST
PARAM_CLOUD_MS = contract.CLOUD_MS
PARAM_QUEUE_DEPTH = contract.QUEUE_DEPTH
PARAM_BATCH_SIZE = contract.BATCH_SIZE

SERVER_NAME = "splitgate-cloud"
# Partition used when a plain OIP client sends the model's own inputs.
DEFAULT_PARTITION = "cloud"


class SuffixService:
    """Serve the suffixes of every partition of a set of plan bundles.

    Several versions of one model may be served at once, keyed by plan digest:
    a request carrying ``splitgate.plan_digest`` runs on exactly that version
    (FAILED_PRECONDITION if it is not served), one without it on the model's
    *current* version. :meth:`add_bundle` loads a new version next to the old
    ones, smoke-tests it and switches atomically; :meth:`activate` rolls back.
    Suffix sessions are built from bytes whose sha256 matches the manifest, so
    a file changed on disk after loading is refused (FAILED_PRECONDITION), never run.

    Parameters:
        bundle_dirs: plan bundle directories (verified on load); the last one of
            a model is its current version.
        intra_op_threads: onnxruntime threads per session (0 = ORT default).
        limits: size limits and NaN policy applied to every ModelInfer request.
        trusted: public keys whose bundle signatures are accepted (None or
            empty = signatures not checked); see :func:`splitgate.security.verify_bundle`.
        allow_unsigned: with ``trusted``, still serve unsigned bundles (development only).
        providers: onnxruntime execution providers of the suffix sessions, in
            order (None = CPU); ``providers_used`` collects what the sessions got.
    """

    def __init__(
        self, bundle_dirs: Iterable[str | Path], *, intra_op_threads: int = 0, limits: Limits | None = None,
        trusted: TrustedKeys | None = None, allow_unsigned: bool = False,
        providers: Iterable[str] | None = None,
    ) -> None:
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.providers_used: list[str] = []  # execution providers the sessions actually run on
        self.trusted = trusted
        self.allow_unsigned = allow_unsigned
        self._versions: dict[str, dict[str, PlanBundle]] = {}
        self._current: dict[str, str] = {}
        self._threads = intra_op_threads
        self.limits = limits or Limits()
        self._sessions: dict[tuple[str, str, str], ort.InferenceSession] = {}
        self._lock = threading.Lock()
        self._in_flight = 0
        for d in bundle_dirs:
            self.add_bundle(d, smoke=False)

    # -- versions -----------------------------------------------------------

    def add_bundle(
        self, source: str | Path | PlanBundle, *, activate: bool = True, smoke: bool = True
    ) -> PlanBundle:
        """Load a bundle version next to those already served; with ``activate``
        make it the model's current version, atomically.

        With ``smoke``, the new version's whole-model suffix (partition
        ``cloud``) runs once on zeros first; if that fails nothing changes.

        Raises:
            BundleSignatureError: with ``trusted``, an unsigned (unless
                ``allow_unsigned``), tampered or foreign-signed bundle.
            BundleError: the bundle fails its integrity check or the smoke run.
        """
        bundle = source if isinstance(source, PlanBundle) else PlanBundle.load(source)
        verify_bundle(bundle, self.trusted, allow_unsigned=self.allow_unsigned)
        if smoke:
            self._smoke(bundle)
        with self._lock:
            self._versions.setdefault(bundle.model_name, {})[bundle.plan_digest] = bundle
            if activate or bundle.model_name not in self._current:
                self._current[bundle.model_name] = bundle.plan_digest
        return bundle

    def activate(self, model: str, digest: str) -> None:
        """Make a served version current again (roll back, or forward)."""
        self.bundle(model, digest)
        with self._lock:
            self._current[model] = digest

    def remove_bundle(self, model: str, digest: str) -> None:
        """Stop serving a version that is not current; its sessions are dropped."""
        with self._lock:
            if self._current.get(model) == digest:
                raise FailedPrecondition(
                    f"model '{model}': version {digest[:12]} is current; activate another first"
                )
            self._versions.get(model, {}).pop(digest, None)
            for key in [k for k in self._sessions if k[0] == model and k[1] == digest]:
                del self._sessions[key]

    def versions(self, model: str) -> list[str]:
        """Plan digests served for ``model``, oldest first."""
        return list(self._versions.get(model, {}))

    def current(self, model: str) -> str:
        """The plan digest a request without one runs on."""
        return self.bundle(model).plan_digest

    def _smoke(self, bundle: PlanBundle) -> None:
        part = bundle.partition("cloud")
        feeds = bundle.sample_inputs()  # a valid request at the planned shape (zeros may not be)
        try:
            self._load_session(bundle, part).run(None, feeds)
        except SplitgateError as exc:
            raise BundleError(f"bundle {bundle.root}: version not activated: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any failure refuses the version
            detail = clean_reason(str(exc))[2] if is_onnxruntime_error(exc) else f"{type(exc).__name__}: {exc}"
            raise BundleError(
                f"bundle {bundle.root}: smoke run of model '{bundle.model_name}' on zeros failed, version not "
                f"activated: {detail}"
            ) from None

    # -- lookup -----------------------------------------------------------

    @property
    def models(self) -> list[str]:
        return sorted(self._current)

    def serves(self, model: str) -> bool:
        """True if some version of ``model`` is served here (cheap; no lookup errors)."""
        return model in self._current

    def bundle(self, model: str, digest: str | None = None) -> PlanBundle:
        """The served bundle of ``model``: version ``digest``, or the current one.

        Raises:
            NotFound: the model is not served.
            FailedPrecondition: ``digest`` is not a served version of it.
        """
        versions = self._versions.get(model)
        if not versions:
            raise NotFound(f"model '{model}' is not served here; served models: {self.models}")
        if not digest:
            return versions[self._current[model]]
        try:
            return versions[digest]
        except KeyError:
            served = [d[:12] for d in versions]
            raise FailedPrecondition(
                f"model '{model}': request plan digest {digest[:12]} differs from the served "
                f"plan(s) {served}; reload the bundle on the edge"
            ) from None

    def _load_session(self, bundle: PlanBundle, partition) -> ort.InferenceSession:
        """A suffix session built from bytes whose sha256 matches the manifest.

        Raises:
            BundleError: the file fails its sha256 check, or onnxruntime cannot load it.
        """
        path = Path(partition.suffix_path)
        rel = path.relative_to(bundle.root).as_posix()
        files = bundle.manifest.get("files", {})
        data = path.read_bytes() if path.is_file() else b""
        if rel in files and hashlib.sha256(data).hexdigest() != files[rel]:
            raise BundleError(
                f"model '{bundle.model_name}' partition '{partition.id}': {rel} in {bundle.root} fails its "
                "sha256 check (changed on disk since the bundle was loaded); refused"
            )
        opts = ort.SessionOptions()
        # errors only: a model whose declared output shapes are wrong (common in exports) would
        # log a warning on every run
        opts.log_severity_level = 3
        if self._threads:
            opts.intra_op_num_threads = self._threads
        # No busy-waiting intra-op threads: on a shared host a spinning pool thread
        # takes the core the gRPC/event-loop thread needs (same for every host of
        # this service, so the Ray tier and the plain baseline stay comparable).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            if f"{rel}.data" in files:  # external weights: ORT resolves them next to the file
                session = ort.InferenceSession(str(path), opts, providers=self.providers)
            else:
                session = ort.InferenceSession(data, opts, providers=self.providers)
        except Exception as exc:
            if not is_onnxruntime_error(exc):
                raise
            raise load_error(exc, RunSite.of(bundle.model_name, partition, "suffix", "cloud"), rel) from None
        with self._lock:
            for used in session.get_providers():  # what onnxruntime registered (CUDA may fall back)
                if used not in self.providers_used:
                    self.providers_used.append(used)
        return session

    def _session(
        self, model: str, partition_id: str, digest: str | None = None
    ) -> tuple[ort.InferenceSession, object]:
        bundle = self.bundle(model, digest)
        partition = bundle.partition(partition_id)
        if partition.suffix_path is None:
            raise InvalidArgument(
                f"model '{model}' partition '{partition_id}' runs entirely on the device; "
                "it has no cloud suffix"
            )
        key = (model, bundle.plan_digest, partition_id)
        with self._lock:
            session = self._sessions.get(key)
        if session is None:
            session = self._load_session(bundle, partition)  # outside the lock: may take a while
            with self._lock:
                session = self._sessions.setdefault(key, session)
        return session, partition

    # -- OIP methods --------------------------------------------------------

    def server_live(self) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def server_ready(self) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self._current))

    def server_metadata(self) -> pb.ServerMetadataResponse:
        from splitgate import __version__

        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=["splitgate"])

    def model_ready(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name in self._current)

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
        partition_id = str(params.get(PARAM_PARTITION, DEFAULT_PARTITION))
        digest = params.get(PARAM_PLAN_DIGEST)
        bundle = self.bundle(model, str(digest) if digest else None)
        session, partition = self._session(model, partition_id, bundle.plan_digest)
        where = f"model '{model}' partition '{partition_id}'"
        # Cut tensors may arrive compressed (splitgate.encoding); decode before validating.
        feeds = validate_inputs(
            read_decoded_inputs(request), partition.cut_tensors, where=where, limits=self.limits
        )
        names = [o.name for o in session.get_outputs()]
        wanted = validate_outputs([o.name for o in request.outputs], names, where=where)
        dynamic = frozenset(t.name for t in partition.cut_tensors if t.shape and t.shape[0] < 0)
        item = Item(
            key=(model, partition_id, bundle.plan_digest), feeds=feeds, outputs=tuple(wanted),
            batchable_inputs=dynamic,
        )
        return Prepared(item=item, model=model, partition_id=partition_id, request_id=request.id,
                        plan_digest=bundle.plan_digest, where=where)

    def run(self, key: tuple[str, str, str], outputs: tuple[str, ...], feeds: dict) -> list:
        """Run the suffix ``key`` = (model, partition, plan digest) once.

        Raises:
            ModelRunError: the suffix failed on these (validated) inputs: INVALID_ARGUMENT
                naming the partition, node, input shapes and onnxruntime's reason.
            ResourceExhausted: onnxruntime could not allocate memory for the run.
            BundleError: onnxruntime cannot load the suffix file.
        """
        session, partition = self._session(*key)
        return _run(session, list(outputs), feeds, RunSite.of(key[0], partition, "suffix", "cloud"))

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

    def model_infer(
        self, request: pb.ModelInferRequest, *, admission: AdmissionQueue | None = None,
        grpc_remaining_s: float | None = None,
    ) -> pb.ModelInferResponse:
        """Run one suffix, unbatched, on the calling thread.

        With ``admission``, the request (of a served model) first joins that
        bounded priority queue and waits for its turn; its deadline is the
        tighter of ``splitgate.deadline_ms`` and ``grpc_remaining_s``.

        ``splitgate.queue_depth`` is the number of ModelInfer calls inside this
        service (running or waiting for a session or a turn) when the call started.

        Raises:
            NotFound, InvalidArgument, FailedPrecondition: as :meth:`prepare`.
            QueueFull, DeadlineUnmeetable: refused by ``admission`` before any compute.
        """
        with self._lock:
            self._in_flight += 1
            depth = self._in_flight
        turn = False
        cloud_ms: float | None = None
        try:
            if admission is not None and self.serves(request.model_name):
                priority, deadline_ms = request_terms(
                    codec.read_params(request.parameters), admission.policy, grpc_remaining_s
                )
                admission.wait_turn(admission.offer(None, priority=priority, deadline_ms=deadline_ms))
                turn = True
            start = time.perf_counter()
            prepared = self.prepare(request)
            values = self.run(prepared.item.key, prepared.item.outputs, prepared.item.feeds)
            cloud_ms = (time.perf_counter() - start) * 1e3
        finally:
            if turn:
                admission.finished(1, cloud_ms)  # type: ignore[union-attr]
            with self._lock:
                self._in_flight -= 1
        return self.respond(prepared, values, cloud_ms=cloud_ms, queue_depth=depth)


def infer_span(metadata: Iterable[tuple[str, Any]] | None, request: pb.ModelInferRequest) -> Any:
    """The cloud tier's span of one ModelInfer call, as a context manager: an OpenTelemetry
    server span (where the package is installed) under the W3C trace context the edge put in
    the call's gRPC ``metadata``; a no-op without OpenTelemetry."""
    from splitgate._tracing import server_span

    params = request.parameters
    partition = params[PARAM_PARTITION].string_param if PARAM_PARTITION in params else DEFAULT_PARTITION
    return server_span(metadata, "splitgate.cloud.infer", {
        "rpc.system": "grpc", "rpc.method": "ModelInfer", "splitgate.model": request.model_name,
        "splitgate.partition": partition,
    })


@dataclass
class Prepared:
    """A validated ModelInfer request, ready to run (alone or in a batch)."""

    item: Item
    model: str
    partition_id: str
    request_id: str
    plan_digest: str
    where: str


def _run(session: ort.InferenceSession, outputs: list[str], feeds: dict, site: RunSite) -> list:
    # Inputs passed validation, so an ORT failure here means the values or a
    # dynamic dimension don't fit the graph (e.g. a wrong spatial size).
    options = ort.RunOptions()
    options.log_severity_level = 4  # no raw dump on stderr: the failure is raised typed instead
    try:
        return session.run(outputs, feeds, options)
    except Exception as exc:
        if not is_onnxruntime_error(exc):
            raise
        raise run_error(exc, site, feeds) from None
