"""The Ray Serve deployment that hosts :class:`SuffixService` behind gRPC ingress.

Ray Serve's gRPC ingress (the proxy, and with direct ingress each replica's own
port) routes each ``inference.GRPCInferenceService`` method to the deployment
method of the same name. Typed splitgate errors become gRPC statuses by setting
them on the request's ``grpc_context``.

ModelInfer is async: the request is validated on the replica's event loop,
queued in a ``@serve.batch`` queue, and batches run in a worker thread (ORT
releases the GIL), so the loop keeps accepting requests while a batch computes
and ``splitgate.queue_depth`` counts real waiting work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from splitgate.cloud._admission import AdmissionPolicy, AdmissionQueue, ServiceTime, request_terms
from splitgate.cloud._batch import group_batches, run_group
from splitgate.cloud._fetch import resolve_bundles
from splitgate.cloud._service import SuffixService, infer_span
from splitgate.cloud.config import CloudConfig, execution_providers
from splitgate import codec
from splitgate.errors import ConfigError, Overloaded, QueueFull, ResourceExhausted, SplitgateError, Unauthenticated
from splitgate.protocol import inference_pb2 as pb
from splitgate.security import TokenCheck, TrustedKeys, malformed_message, token_digest
from splitgate.validate import Limits
from splitgate import contract

__all__ = ["ENDPOINTS_EXTENSION", "PROVIDERS_EXTENSION", "SERVICER_FUNCTION", "InferenceDeployment", "build_app"]

# What Ray Serve's gRPC ingress must import to expose the OIP service.
# (splitgate's registration: like the generated add_..._to_server, but bytes that
# do not parse reach the deployment as a marker answered INVALID_ARGUMENT
# instead of gRPC's UNKNOWN / INTERNAL.)
SERVICER_FUNCTION = "splitgate.security.add_inference_servicer"
# ServerMetadata.extensions entry that lists the replicas' direct-ingress gRPC
# endpoints: "splitgate.endpoints=host:port,host:port" (absent without direct ingress).
ENDPOINTS_EXTENSION = contract.ENDPOINTS_EXTENSION
# ServerMetadata.extensions entry naming the onnxruntime execution providers the
# answering replica's suffix sessions run on: "splitgate.providers=CUDAExecutionProvider,CPUExecutionProvider".
PROVIDERS_EXTENSION = contract.PROVIDERS_EXTENSION
_log = logging.getLogger("ray.serve")  # lands in the replica's own Serve log
_ENDPOINTS_TTL_S = 2.0


def _fail(context: RayServegRPCContext, exc: BaseException) -> None:
    if isinstance(exc, SplitgateError):
        context.set_code(exc.code)
        context.set_details(str(exc))
        if isinstance(exc, Overloaded) and exc.retry_after_ms is not None:
            # (trailing metadata: the only place a failed call can carry it)
            context.set_trailing_metadata([(contract.RETRY_AFTER_MS, str(int(exc.retry_after_ms + 0.999)))])
    else:  # a bug must still answer, never hang
        context.set_code(grpc.StatusCode.INTERNAL)
        context.set_details(f"internal error: {type(exc).__name__}: {exc}")


def _answer(context: RayServegRPCContext, empty: Any, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception as exc:  # noqa: BLE001
        _fail(context, exc)
        return empty


def _request_bytes(request: pb.ModelInferRequest) -> int:
    return request.ByteSize()


def _grpc_enforces(limit: int) -> bool:
    """True if Serve's gRPC servers (proxy and direct ingress, configured from
    ``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE`` in this process's environment) already
    refuse requests over ``limit`` bytes with RESOURCE_EXHAUSTED before parsing,
    so measuring each request again (``ByteSize``, ~60 us at 600 KB) is redundant."""
    try:
        return int(os.environ.get("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", "")) <= limit
    except ValueError:
        return False


def _warm_and_announce(service: SuffixService, refs: Sequence[str], local_dirs: Sequence[str],
                       requested: Sequence[str]) -> None:
    """Open the first model's whole-model suffix (so the providers that really
    run are known, and the first request does not pay for the session), then
    log one line for this replica and set its ``splitgate_replica_execution_provider``
    gauge (Ray's metrics: 1 for the provider its sessions run on)."""
    if service.models:
        try:
            service._session(service.models[0], "cloud")
        except Exception as exc:  # noqa: BLE001 - the first request reports it properly
            _log.warning("splitgate replica: warm-up of model '%s' failed: %s", service.models[0], exc)
    ran = service.providers_used or service.providers
    fetched = {str(r): str(d) for r, d in zip(refs, local_dirs) if str(r) != str(d)}
    _log.info(
        "splitgate replica: suffix sessions run on %s (requested %s); models %s%s", ran,
        list(requested) or "auto", service.models, f"; fetched {fetched}" if fetched else "",
    )
    for handler in _log.handlers:  # Serve buffers replica logs (1000 lines when throughput-optimized)
        handler.flush()
    try:
        from ray.serve.metrics import Gauge

        gauge = Gauge("splitgate_replica_execution_provider", tag_keys=("provider",),
                      description="1 for the onnxruntime execution provider this replica's suffix sessions run on")
        gauge.set(1, tags={"provider": ran[0]})
    except Exception:  # noqa: BLE001 - metrics are best effort
        pass


@serve.deployment(name="splitgate-cloud", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class InferenceDeployment:
    """One replica serving every loaded bundle's suffixes over OIP, with dynamic batching.

    Parameters:
        bundle_dirs: plan bundles to serve (absolute paths visible on every node).
        intra_op_threads: onnxruntime threads per session (0 = ORT default).
        max_batch_size: most rows one suffix run may take (1 = no batching).
        batch_wait_timeout_s: how long a batch waits for mates after its first request.
        max_message_bytes: largest ModelInfer request accepted (RESOURCE_EXHAUSTED above).
        compute_threads: threads that run suffix batches concurrently.
        token_digests: sha256 of the accepted bearer tokens (None = no token auth);
            every RPC without one is answered UNAUTHENTICATED.
        nan_policy: ``"allow"`` or ``"reject"`` NaN/Inf in float cut tensors.
        publish_endpoints: list the replicas' direct-ingress endpoints in
            ServerMetadata (off when clients must come through a TLS front).
        admission: :class:`~splitgate.cloud._admission.AdmissionPolicy` fields
            (``max_queue``, ``priority_levels``, ``default_priority``,
            ``default_deadline_ms``); None = the defaults. Requests that would
            wait past ``max_queue`` or miss their deadline are refused before
            any compute (RESOURCE_EXHAUSTED / UNAVAILABLE with trailing metadata
            ``splitgate.retry_after_ms``); waiting ones run by priority.
        trusted_keys: PEM public keys whose bundle signatures are accepted
            (empty = not checked); ``allow_unsigned``: serve unsigned bundles anyway.
        bundle_cache: where this replica's node keeps bundles fetched from URIs
            (None = ``SPLITGATE_BUNDLE_CACHE`` or ``~/.cache/splitgate/bundles``).
            ``bundle_dirs`` may hold URIs (``cloud/_fetch.py``): they are fetched
            and verified here, on the replica's node, not on the driver.
        providers: onnxruntime execution providers (empty = auto: CUDA when this
            node has it, else CPU); logged once and listed in ServerMetadata.
        batcher: ``"drain"`` (default): the event loop only hands the parsed
            request to the compute threads, which decode, validate, run and
            encode; each compute thread takes *everything* queued (up to
            ``max_batch_size`` rows) when it becomes free, so batches grow with
            the queue and an idle replica runs a lone request at once, with no
            timer. ``"serve"``: Ray's ``@serve.batch`` queue with
            ``batch_wait_timeout_s``, decode/validate/encode on the event loop.
    """

    def __init__(
        self,
        bundle_dirs: Sequence[str],
        intra_op_threads: int = 0,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.002,
        max_message_bytes: int = 64 * 1024 * 1024,
        compute_threads: int = 1,
        token_digests: Sequence[str] | None = None,
        nan_policy: str = "allow",
        publish_endpoints: bool = True,
        batcher: str = "drain",
        *,
        trusted_keys: Sequence[str] | None = None,
        allow_unsigned: bool = False,
        bundle_cache: str | None = None,
        providers: Sequence[str] | None = None,
        admission: dict[str, Any] | None = None,
    ) -> None:
        self._policy = AdmissionPolicy(**(admission or {}))
        trusted = TrustedKeys.from_pems(trusted_keys or [])
        # Bundle URIs are fetched here, on this replica's node, into its cache (verified).
        local_dirs = resolve_bundles(bundle_dirs, cache_dir=bundle_cache, trusted=trusted, allow_unsigned=allow_unsigned)
        self._service = SuffixService(
            local_dirs, intra_op_threads=intra_op_threads,
            # Decoded bytes: compressed cut tensors (zstd, int8) may inflate past the wire limit.
            limits=Limits(nan_policy=nan_policy, max_request_bytes=4 * int(max_message_bytes)),
            trusted=trusted, allow_unsigned=allow_unsigned, providers=execution_providers(list(providers or [])),
        )
        _warm_and_announce(self._service, bundle_dirs, local_dirs, list(providers or []))
        self._auth = TokenCheck(digests=token_digests) if token_digests else None
        self._publish = publish_endpoints
        self._max_batch = max(int(max_batch_size), 1)
        self._max_bytes = int(max_message_bytes)
        self._check_size = not _grpc_enforces(self._max_bytes)
        self._pool = ThreadPoolExecutor(max_workers=max(compute_threads, 1), thread_name_prefix="suffix")
        if batcher not in ("drain", "serve"):
            raise ValueError(f"batcher must be 'drain' or 'serve', not {batcher!r}")
        self._batcher = batcher
        self._drain = _DrainQueue(
            self._work, self._max_batch, max(compute_threads, 1), batch_wait_timeout_s, self._policy
        ) if batcher == "drain" else None
        self._timing = self._drain.queue.timing if self._drain is not None else ServiceTime()
        self._in_flight = 0
        self._endpoints: list[str] = []
        self._endpoints_at = 0.0
        # serve.batch settles requests per call; batches mix suffixes and are
        # grouped by (model, partition) and shape inside _infer_batch.
        self._infer_batch.set_max_batch_size(self._max_batch)
        self._infer_batch.set_batch_wait_timeout_s(float(batch_wait_timeout_s))

    # -- health and metadata ------------------------------------------------

    def _denied(self, grpc_context: RayServegRPCContext, request: object = None) -> bool:
        """Check the bearer token (when auth is on) and that the request parsed;
        set UNAUTHENTICATED / INVALID_ARGUMENT and return True if not."""
        if self._auth is not None:
            try:
                self._auth.check(grpc_context.invocation_metadata())
            except Unauthenticated as exc:
                _fail(grpc_context, exc)
                return True
        message = malformed_message(request)
        if message is not None:
            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details(message)
            return True
        return False

    def ServerLive(self, request: pb.ServerLiveRequest, grpc_context: RayServegRPCContext):
        if self._denied(grpc_context, request):
            return pb.ServerLiveResponse()
        return _answer(grpc_context, pb.ServerLiveResponse(), self._service.server_live)

    def ServerReady(self, request: pb.ServerReadyRequest, grpc_context: RayServegRPCContext):
        if self._denied(grpc_context, request):
            return pb.ServerReadyResponse()
        return _answer(grpc_context, pb.ServerReadyResponse(), self._service.server_ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, grpc_context: RayServegRPCContext):
        if self._denied(grpc_context, request):
            return pb.ServerMetadataResponse()
        try:
            response = self._service.server_metadata()
            endpoints = await self._direct_endpoints() if self._publish else []
            if endpoints:
                response.extensions.append(ENDPOINTS_EXTENSION + ",".join(endpoints))
            ran = self._service.providers_used or self._service.providers
            response.extensions.append(PROVIDERS_EXTENSION + ",".join(ran))
            return response
        except Exception as exc:  # noqa: BLE001
            _fail(grpc_context, exc)
            return pb.ServerMetadataResponse()

    def ModelReady(self, request: pb.ModelReadyRequest, grpc_context: RayServegRPCContext):
        if self._denied(grpc_context, request):
            return pb.ModelReadyResponse()
        return _answer(grpc_context, pb.ModelReadyResponse(), lambda: self._service.model_ready(request))

    def ModelMetadata(self, request: pb.ModelMetadataRequest, grpc_context: RayServegRPCContext):
        if self._denied(grpc_context, request):
            return pb.ModelMetadataResponse()
        return _answer(
            grpc_context, pb.ModelMetadataResponse(), lambda: self._service.model_metadata(request)
        )

    # -- inference ------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, grpc_context: RayServegRPCContext):
        with infer_span(grpc_context.invocation_metadata(), request):  # OpenTelemetry, where installed
            return await self._model_infer(request, grpc_context)

    async def _model_infer(self, request: pb.ModelInferRequest, grpc_context: RayServegRPCContext):
        if self._denied(grpc_context, request):
            return pb.ModelInferResponse()
        self._in_flight += 1
        depth = self._in_flight
        if self._drain is not None:
            # Always through the queue, even when idle: running a lone call on the
            # event loop saves two thread hops but blocks the loop, which hides the
            # start of a burst from the batcher (measured; see the README).
            try:
                # Admission first: a refusal costs no decode and no compute.
                priority, deadline_ms = self._terms(request)
                ok, value = await self._drain.submit(request, depth, priority, deadline_ms)
                if ok:
                    return value
                _fail(grpc_context, value)
                return pb.ModelInferResponse()
            except SplitgateError as exc:
                _fail(grpc_context, exc)
                return pb.ModelInferResponse()
            finally:
                self._in_flight -= 1
        try:
            self._admit_unqueued(request, depth)
            size = _request_bytes(request)
            if size > self._max_bytes:
                raise ResourceExhausted(
                    f"ModelInfer request of {size} bytes exceeds the cloud tier's limit of "
                    f"{self._max_bytes} bytes (max_message_bytes)"
                )
            prepared = self._service.prepare(request)
            if depth == 1:
                # Nothing else in flight: a batch could only wait for mates that
                # are not coming, so run now (batching costs nothing when idle).
                loop = asyncio.get_running_loop()
                ok, values, cloud_ms, batch = await loop.run_in_executor(
                    self._pool, self._run_single, prepared.item
                )
            else:
                ok, values, cloud_ms, batch = await self._infer_batch(prepared)
            if not ok:
                raise values
            return self._service.respond(
                prepared, values, cloud_ms=cloud_ms, queue_depth=depth, batch_size=batch
            )
        except Exception as exc:  # noqa: BLE001
            _fail(grpc_context, exc)
            return pb.ModelInferResponse()
        finally:
            self._in_flight -= 1

    def _terms(self, request: pb.ModelInferRequest) -> tuple[int, float | None]:
        """(priority level, deadline ms) of a request; no deadline for a model not
        served here (it is answered NOT_FOUND at once, e.g. the edge's bandwidth probe).

        Raises:
            InvalidArgument: a malformed ``priority`` or ``splitgate.deadline_ms``.
        """
        if not request.parameters and self._policy.default_deadline_ms is None:
            return self._policy.default_priority, None
        level, deadline_ms = request_terms(codec.read_params(request.parameters), self._policy)
        return level, (deadline_ms if self._service.serves(request.model_name) else None)

    def _admit_unqueued(self, request: pb.ModelInferRequest, depth: int) -> None:
        """Admission for the ``serve`` batcher (Serve's FIFO batch queue, no priority):
        the queue bound on requests in flight and the deadline estimate.

        Raises:
            QueueFull, DeadlineUnmeetable: refused before any compute.
        """
        limit = self._policy.max_queue
        waiting = max(depth - self._max_batch, 0)
        if limit and waiting >= limit:
            retry = min(max(self._timing.estimate_ms(depth, 0), 5.0), 5000.0)
            raise QueueFull(
                f"the cloud replica's queue is full ({waiting} waiting, max_queue {limit}); refused before "
                f"any compute, retry after {retry:.0f} ms", retry_after_ms=retry,
            )
        _, deadline_ms = self._terms(request)
        if deadline_ms is not None:
            # The same estimate and refusal as the drain batcher's queue, for the work ahead.
            check = AdmissionQueue(self._policy, workers=1, timing=self._timing)
            check.running(depth - 1)
            check.offer(None, priority=1, deadline_ms=deadline_ms)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _infer_batch(self, batch: list) -> list[tuple]:
        """Run a batch of prepared requests; returns (ok, values|error, cloud_ms, rows) each."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._run_batch, batch)

    def _run_batch(self, batch: list) -> list[tuple]:
        items = [p.item for p in batch]
        results: list[tuple] = [None] * len(batch)  # type: ignore[list-item]
        for group in group_batches(items, self._max_batch):
            members = [items[i] for i in group]
            rows = sum(m.batch_size if m.signature() else 1 for m in members)
            start = time.perf_counter()
            try:
                key = members[0].key
                per_item = run_group(members, lambda outs, feeds, key=key: self._service.run(key, outs, feeds))
            except Exception as exc:  # noqa: BLE001 - one bad group must not fail the others
                if len(members) > 1:  # isolate the culprit: rerun singly
                    for i in group:
                        results[i] = self._run_single(items[i])
                    continue
                results[group[0]] = (False, exc, 0.0, 1)
                continue
            cloud_ms = (time.perf_counter() - start) * 1e3
            for i, values in zip(group, per_item):
                results[i] = (True, values, cloud_ms, rows)
        return results

    def _work(self, entries: list) -> list[tuple]:
        """Compute thread, drain batcher: (request, depth) pairs -> (ok, response | error)."""
        out: list[tuple] = [None] * len(entries)  # type: ignore[list-item]
        prepared: list = []
        where: list[int] = []
        for i, (request, _depth) in enumerate(entries):
            try:
                size = _request_bytes(request) if self._check_size else 0
                if size > self._max_bytes:
                    raise ResourceExhausted(
                        f"ModelInfer request of {size} bytes exceeds the cloud tier's limit of "
                        f"{self._max_bytes} bytes (max_message_bytes)"
                    )
                prepared.append(self._service.prepare(request))
                where.append(i)
            except Exception as exc:  # noqa: BLE001 - answered per request
                out[i] = (False, exc)
        if prepared:
            results = self._run_batch(prepared) if len(prepared) > 1 else [self._run_single(prepared[0].item)]
            for i, p, (ok, values, cloud_ms, rows) in zip(where, prepared, results):
                if not ok:
                    out[i] = (False, values)
                    continue
                try:
                    out[i] = (True, self._service.respond(
                        p, values, cloud_ms=cloud_ms, queue_depth=entries[i][1], batch_size=rows
                    ))
                except Exception as exc:  # noqa: BLE001
                    out[i] = (False, exc)
        return out

    def _run_single(self, item) -> tuple:
        start = time.perf_counter()
        try:
            values = self._service.run(item.key, item.outputs, item.feeds)
        except Exception as exc:  # noqa: BLE001
            return (False, exc, 0.0, 1)
        rows = item.batch_size if item.signature() else 1
        return (True, values, (time.perf_counter() - start) * 1e3, rows)

    # -- discovery --------------------------------------------------------------

    async def _direct_endpoints(self) -> list[str]:
        """The app's replicas' direct-ingress gRPC endpoints (cached for a few seconds)."""
        now = time.monotonic()
        if now - self._endpoints_at < _ENDPOINTS_TTL_S:
            return self._endpoints
        self._endpoints_at = now
        try:
            from splitgate.cloud._discovery import direct_grpc_endpoints

            self._endpoints = await direct_grpc_endpoints(serve.get_replica_context().app_name)
        except Exception:  # noqa: BLE001 - discovery is best effort; the proxy still works
            self._endpoints = []
        return self._endpoints


class _DrainQueue:
    """Continuous batching without timers: compute threads take all queued work,
    from a bounded priority queue that refuses at once what cannot be served in time.

    The event loop offers ``(request, depth)`` to an :class:`AdmissionQueue`
    (a refusal raises there, before any decode or compute) and awaits a
    future; a free compute thread takes up to ``max_rows`` rows in priority
    order (whatever arrived while it was busy), refuses those whose deadline
    their own run would now miss, runs ``work(entries)`` and settles all
    futures with one ``call_soon_threadsafe``. Under load the batch size
    follows the queue depth; when idle a request runs at once. Each run's
    time teaches the queue's service-time estimate.
    """

    def __init__(
        self, work: Callable[[list], list], max_rows: int, threads: int, wait_s: float = 0.0,
        policy: AdmissionPolicy | None = None,
    ) -> None:
        self._work = work
        self._max = max(int(max_rows), 1)
        self._wait = max(float(wait_s), 0.0)
        self._gap = float("inf")  # smoothed time between arrivals
        self._last = 0.0
        self.queue = AdmissionQueue(policy, workers=threads)
        for k in range(threads):
            threading.Thread(target=self._loop, name=f"suffix-drain-{k}", daemon=True).start()

    def submit(
        self, request: Any, depth: int, priority: int | None = None, deadline_ms: float | None = None
    ) -> asyncio.Future:
        """Queue a request (``priority`` None = the policy's default level); returns
        the future of its ``(ok, response | error)``.

        Raises:
            QueueFull, DeadlineUnmeetable: refused at admission.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        now = time.monotonic()
        gap = now - self._last
        self._last = now
        self._gap = gap if self._gap == float("inf") else 0.8 * self._gap + 0.2 * gap
        self.queue.offer(
            (request, depth, future, loop), priority=priority or self.queue.policy.default_priority,
            deadline_ms=deadline_ms, rows=_rows(request),
        )
        return future

    def _loop(self) -> None:
        while True:
            # Requests arriving closer together than the batch wait: wait (at most
            # that long) for mates; at a slower pace a lone request runs at once.
            taken, refused = self.queue.take(self._max, self._wait if self._gap < self._wait else 0.0)
            settled = [(e.item, (False, exc)) for e, exc in refused]
            if taken:
                rows = sum(e.rows for e in taken)
                start = time.perf_counter()
                try:
                    results = self._work([(e.item[0], e.item[1]) for e in taken])
                except BaseException as exc:  # noqa: BLE001 - a bug must still answer, never hang
                    results = [(False, exc)] * len(taken)
                run_ms = (time.perf_counter() - start) * 1e3
                self.queue.finished(rows, run_ms if any(ok for ok, _ in results) else None)
                settled += [(e.item, result) for e, result in zip(taken, results)]
            by_loop: dict[Any, list] = {}
            for (_request, _depth, future, loop), result in settled:
                by_loop.setdefault(loop, []).append((future, result))
            for loop, answers in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_settle, answers)
                except RuntimeError:  # loop closed: the replica is stopping
                    pass


def _rows(request: Any) -> int:
    """Rows a request adds to a batch: its first input's first dimension, as
    decoded (a ``zstd`` tensor travels as a flat byte string and names its shape
    in ``splitgate.shape``); 1 if unknown."""
    try:
        tensor = request.inputs[0]
        decoded = tensor.parameters.get(contract.SHAPE)
        if decoded is not None and decoded.string_param:
            return max(int(decoded.string_param.split(",")[0]), 1)
        shape = tensor.shape
        return max(int(shape[0]), 1) if shape else 1
    except Exception:  # noqa: BLE001 - malformed requests fail later, one row
        return 1


def _settle(settled: list) -> None:
    for future, result in settled:
        if not future.done():
            future.set_result(result)


def build_app(bundle_dirs: Sequence[str] | CloudConfig, **overrides: Any):
    """Return the bound Ray Serve application serving plan bundles.

    Args:
        bundle_dirs: bundle directories, or a full :class:`CloudConfig`.
        overrides: CloudConfig fields (e.g. ``num_replicas=2``, ``max_batch_size=16``).
    """
    if isinstance(bundle_dirs, CloudConfig):
        config = bundle_dirs
        for key, value in overrides.items():
            setattr(config, key, value)
    else:
        config = CloudConfig(bundles=[str(d) for d in bundle_dirs], **overrides)
    options: dict[str, Any] = {
        "max_ongoing_requests": config.max_ongoing_requests,
        "health_check_period_s": config.health_check_period_s,
        # Serve writes one access-log line per request on the replica's event loop.
        "logging_config": {"enable_access_log": bool(config.access_log)},
    }
    execution_providers(list(config.providers), available=[])  # unknown names fail here, on the driver
    if config.gpus_per_replica < 0:
        raise ConfigError(f"gpus_per_replica must be >= 0, not {config.gpus_per_replica}")
    if config.gpus_per_replica:
        options["ray_actor_options"] = {"num_cpus": 0, "num_gpus": float(config.gpus_per_replica)}
    if config.max_replicas_per_node:
        options["max_replicas_per_node"] = int(config.max_replicas_per_node)
    if config.max_queue > 0:
        # Serve's own bound on requests waiting in front of a replica (at a proxy
        # or handle, or for a direct-ingress slot): RESOURCE_EXHAUSTED with no
        # retry hint. A backstop only: Serve counts requests not yet assigned
        # to a replica, which on a loaded host includes some the replica would
        # admit, so it sits max_ongoing_requests behind the replica's own queue
        # (max_queue, priority, deadlines, hint), which refuses first.
        options["max_queued_requests"] = config.max_queue + config.max_ongoing_requests
    if config.autoscaling:
        options["autoscaling_config"] = dict(config.autoscaling)
    else:
        options["num_replicas"] = config.num_replicas
    return InferenceDeployment.options(**options).bind(
        [str(d) for d in config.bundles],
        config.intra_op_threads,
        config.max_batch_size,
        config.batch_wait_timeout_s,
        config.max_message_bytes,
        config.compute_threads,
        [token_digest(t) for t in config.auth_tokens] + list(config.auth_token_digests) or None,
        config.nan_policy,
        config.tls is None,  # behind a TLS front, the plaintext replica ports are not advertised
        config.batcher,
        # the keys themselves, read here: replicas on other nodes need no key files
        trusted_keys=TrustedKeys.from_paths(config.trust).pems,
        allow_unsigned=config.allow_unsigned,
        bundle_cache=config.bundle_cache,
        providers=list(config.providers),  # resolved on each replica: auto depends on its node
        admission=config.admission_policy(),
    )
