"""``splitgate edge serve``: the Gateway as a local OIP gRPC server, so apps in
any language (tritonclient included) call the same API, plus Prometheus metrics."""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from splitgate.edge._gateway import Gateway
from splitgate import __version__, codec
from splitgate._ort_errors import is_onnxruntime_error, run_error
from splitgate.errors import InvalidArgument, SplitgateError
from splitgate.protocol import inference_pb2 as pb
from splitgate.protocol import inference_pb2_grpc as pb_grpc
from splitgate.security import AuthInterceptor, TlsConfig, TokenCheck, add_inference_servicer, secure_server_port
from splitgate.validate import check_deadline_ms, validate_outputs
from splitgate import contract

__all__ = ["EdgeServicer", "serve_edge"]

# Request parameters an app may set.
PARAM_PARTITION = contract.PARTITION
PARAM_DEADLINE_MS = contract.DEADLINE_MS
PARAM_PRIVATE = contract.PRIVATE
PARAM_CALLER = contract.CALLER


def _caller_key(params: dict, context: grpc.ServicerContext) -> str | None:
    """The request's caller key: parameter ``splitgate.caller``, else gRPC metadata
    ``x-splitgate-caller``, else None (a staged rollout then draws per request).

    Raises:
        InvalidArgument: the parameter is not a non-empty string.
    """
    if PARAM_CALLER in params:
        caller = params[PARAM_CALLER]
        if not isinstance(caller, str) or not caller:
            raise InvalidArgument(f"parameter {PARAM_CALLER} must be a non-empty string, got {caller!r}")
        return caller
    for key, value in context.invocation_metadata() or ():
        if key == contract.CALLER_METADATA and value:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


class EdgeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """OIP over a :class:`Gateway`: inputs are the model's own inputs; the
    response says where it ran (``splitgate.partition``, ``*_ms``, ``fallback``)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    @staticmethod
    def _answer(context: grpc.ServicerContext, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except SplitgateError as exc:  # a model failing on the input: ModelRunError, INVALID_ARGUMENT
            context.abort(exc.code, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug still gets a status, never a hang
            if is_onnxruntime_error(exc):  # (every run goes through SessionCache, which types these)
                error = run_error(exc, None, {})
                context.abort(error.code, str(error))
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=bool(self.gateway.models))

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="splitgate-edge", version=__version__, extensions=["splitgate"])

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name in self.gateway.models)

    def ModelMetadata(self, request, context):
        def run() -> pb.ModelMetadataResponse:
            bundle = self.gateway.bundle(request.name)
            versions = [bundle.plan_digest[:12]]
            rollout = self.gateway.rollout_status(request.name)
            if rollout["state"] == "staged":  # a staged candidate answers some requests too
                versions.append(rollout["candidate"]["version"])
            response = pb.ModelMetadataResponse(
                name=bundle.model_name, versions=versions, platform="onnxruntime_onnx"
            )
            for spec in bundle.inputs:
                response.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
            for spec in bundle.outputs:
                response.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
            return response

        return self._answer(context, run)

    def ModelInfer(self, request, context):
        def run() -> pb.ModelInferResponse:
            params = codec.read_params(request.parameters)
            deadline = check_deadline_ms(params.get(PARAM_DEADLINE_MS), name=f"parameter {PARAM_DEADLINE_MS}")
            private = params.get(PARAM_PRIVATE, False)
            if not isinstance(private, bool):
                raise InvalidArgument(f"parameter {PARAM_PRIVATE} must be a bool, got {private!r}")
            bundle = self.gateway.bundle(request.model_name)
            wanted = validate_outputs(
                [o.name for o in request.outputs], [o.name for o in bundle.outputs],
                where=f"model '{request.model_name}'",
            )
            result = self.gateway.infer(
                request.model_name,
                codec.read_inputs(request),
                partition=str(params[PARAM_PARTITION]) if PARAM_PARTITION in params else None,
                deadline_ms=deadline,
                private=private,
                caller=_caller_key(params, context),
            )
            response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
            codec.add_outputs(response, {n: result.outputs[n] for n in wanted})
            t = result.trace
            codec.set_params(
                response.parameters,
                {
                    contract.PARTITION: t.partition,
                    contract.DEVICE_MS: t.device_ms,
                    contract.NETWORK_MS: t.network_ms,
                    contract.CLOUD_MS: t.cloud_ms,
                    contract.TOTAL_MS: t.total_ms,
                    contract.BYTES_SENT: t.bytes_sent,
                    contract.FALLBACK: t.fallback or "",
                    contract.DEVICE_FACTOR: t.device_factor,
                    contract.VERSION: t.version,
                    contract.CASCADE: t.cascade or "",
                },
            )
            return response

        return self._answer(context, run)


def serve_edge(
    gateway: Gateway,
    *,
    port: int = 8001,
    host: str = "127.0.0.1",
    metrics_port: int | None = None,
    max_workers: int = 8,
    max_message_bytes: int = 64 * 1024 * 1024,
    tls: TlsConfig | None = None,
    auth: TokenCheck | None = None,
    insecure: bool = False,
) -> tuple[grpc.Server, int, Any]:
    """Start the edge OIP server (and a Prometheus endpoint if ``metrics_port`` is set).

    ``tls`` serves TLS (mutual with ``tls.require_client_cert``); ``auth``
    answers UNAUTHENTICATED to calls without an accepted bearer token.
    Plaintext is served on a loopback ``host`` only, unless ``insecure=True``.
    Requests whose bytes do not parse get INVALID_ARGUMENT.

    Returns:
        (server, bound port, metrics HTTP server or None; its ``server_port`` is
        the bound port). Stop with ``server.stop(grace)`` and ``metrics.shutdown()``.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[AuthInterceptor(auth)] if auth is not None else None,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    add_inference_servicer(EdgeServicer(gateway), server)
    bound = secure_server_port(server, f"{host}:{port}", tls=tls, insecure=insecure)
    server.start()
    metrics_server = None
    if metrics_port is not None:
        from prometheus_client import start_http_server

        metrics_server, _ = start_http_server(metrics_port, addr=host, registry=gateway.metrics.registry)
    return server, bound, metrics_server
