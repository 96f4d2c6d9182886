"""A plain grpcio + onnxruntime OIP server (no Ray): the benchmarks' baseline.

It hosts the same :class:`~splitgate.cloud._service.SuffixService` as the Ray Serve
deployment, in a ``grpc.server`` thread pool, so a benchmark compares only the
hosting (proxy, replica hop, batching), never the suffix compute. Not for
production: no batching, no replicas, no autoscaling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self

import grpc

from splitgate.cloud._admission import AdmissionPolicy, AdmissionQueue
from splitgate.cloud._service import SuffixService, infer_span
from splitgate.errors import Overloaded, SplitgateError
from splitgate.protocol import inference_pb2_grpc as pb_grpc
from splitgate.security import (
    AuthInterceptor,
    TlsConfig,
    TokenCheck,
    add_inference_servicer,
    secure_server_port,
)
from splitgate.validate import Limits
from splitgate import contract

__all__ = ["BaselineServer", "start_baseline"]


class _Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: SuffixService, admission: AdmissionQueue | None = None) -> None:
        self._service = service
        self._admission = admission

    def _answer(self, context: grpc.ServicerContext, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except SplitgateError as exc:
            if isinstance(exc, Overloaded) and exc.retry_after_ms is not None:
                context.set_trailing_metadata(((contract.RETRY_AFTER_MS, str(int(exc.retry_after_ms + 0.999))),))
            context.abort(exc.code, str(exc))
        except Exception as exc:  # noqa: BLE001
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    def ServerLive(self, request, context):
        return self._answer(context, self._service.server_live)

    def ServerReady(self, request, context):
        return self._answer(context, self._service.server_ready)

    def ServerMetadata(self, request, context):
        return self._answer(context, self._service.server_metadata)

    def ModelReady(self, request, context):
        return self._answer(context, lambda: self._service.model_ready(request))

    def ModelMetadata(self, request, context):
        return self._answer(context, lambda: self._service.model_metadata(request))

    def ModelInfer(self, request, context):
        with infer_span(context.invocation_metadata(), request):  # OpenTelemetry, where installed
            return self._model_infer(request, context)

    def _model_infer(self, request, context):
        if self._admission is None:
            return self._answer(context, lambda: self._service.model_infer(request))
        remaining = context.time_remaining()  # None or huge without a client deadline
        remaining = remaining if remaining is not None and remaining < 1e6 else None
        return self._answer(context, lambda: self._service.model_infer(
            request, admission=self._admission, grpc_remaining_s=remaining))


class BaselineServer:
    """A running baseline server; ``address`` is ``127.0.0.1:PORT``. Call :meth:`stop`."""

    def __init__(self, server: grpc.Server, port: int) -> None:
        self._server = server
        self.address = f"127.0.0.1:{port}"

    def stop(self, grace_s: float = 1.0) -> None:
        self._server.stop(grace_s).wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_baseline(
    bundle_dirs: Sequence[str],
    *,
    port: int = 0,
    workers: int = 8,
    intra_op_threads: int = 0,
    max_message_bytes: int = 64 * 1024 * 1024,
    tls: TlsConfig | None = None,
    auth: TokenCheck | None = None,
    limits: Limits | None = None,
    admission: AdmissionPolicy | None = None,
    compute_slots: int = 2,
) -> BaselineServer:
    """Serve ``bundle_dirs`` over OIP gRPC on 127.0.0.1 with a plain grpcio server.

    ``tls`` serves TLS (mutual with ``tls.require_client_cert``); ``auth``
    answers UNAUTHENTICATED to calls without an accepted token; ``limits`` are
    the size limits and NaN policy of :class:`~splitgate.validate.Limits`.
    ``admission`` turns on admission control (off by default: the benchmarks'
    baseline stays a plain server): at most ``compute_slots`` ModelInfer calls
    run at once, up to ``admission.max_queue`` wait by priority, and the rest,
    or those that would miss their deadline (``splitgate.deadline_ms`` or the
    gRPC deadline), are refused at once with a retry hint
    (:mod:`splitgate.cloud._admission`); the thread pool grows to hold them all.
    """
    service = SuffixService(bundle_dirs, intra_op_threads=intra_op_threads, limits=limits)
    queue = AdmissionQueue(admission, workers=compute_slots) if admission is not None else None
    if queue is not None:
        workers = max(workers, compute_slots + (admission.max_queue or 64) + 2)  # type: ignore[union-attr]
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers),
        interceptors=[AuthInterceptor(auth)] if auth is not None else None,
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ],
    )
    add_inference_servicer(_Servicer(service, queue), server)
    bound = secure_server_port(server, f"127.0.0.1:{port}", tls=tls)
    server.start()
    return BaselineServer(server, bound)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m splitgate.cloud.baseline BUNDLE... [--port P]``: serve until SIGTERM/Ctrl-C.

    Prints ``listening on HOST:PORT`` once ready (benchmarks read that line).
    """
    import argparse

    from splitgate._signals import wait_for_stop

    parser = argparse.ArgumentParser(prog="python -m splitgate.cloud.baseline", description=__doc__)
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads")
    args = parser.parse_args(argv)
    server = start_baseline(args.bundles, port=args.port, workers=args.workers, intra_op_threads=args.threads)
    print(f"listening on {server.address}", flush=True)
    try:
        wait_for_stop()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
