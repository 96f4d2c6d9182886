"""``splitgate edge serve``: the Gateway as a local OIP gRPC server, so apps in
any language (tritonclient included) call the same API, plus Prometheus metrics."""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from edge._gateway import Gateway
from splitgate import __version__, codec
from splitgate.errors import InvalidArgument, SplitgateError
from splitgate.protocol import inference_pb2 as pb
from splitgate.protocol import inference_pb2_grpc as pb_grpc

__all__ = ["EdgeServicer", "serve_edge"]

# Request parameters an app may set.
PARAM_PARTITION = "splitgate.partition"
PARAM_DEADLINE_MS = "splitgate.deadline_ms"
PARAM_PRIVATE = "splitgate.private"


class EdgeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """OIP over a :class:`Gateway`: inputs are the model's own inputs; the
    response says where it ran (``splitgate.partition``, ``*_ms``, ``fallback``)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    @staticmethod
    def _answer(context: grpc.ServicerContext, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except SplitgateError as exc:
            context.abort(exc.code, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug still gets a status, never a hang
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
            response = pb.ModelMetadataResponse(
                name=bundle.model_name, versions=[bundle.plan_digest[:12]], platform="onnxruntime_onnx"
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
            deadline = params.get(PARAM_DEADLINE_MS)
            if deadline is not None and not isinstance(deadline, (int, float)):
                raise InvalidArgument(f"parameter {PARAM_DEADLINE_MS} must be a number, got {deadline!r}")
            result = self.gateway.infer(
                request.model_name,
                codec.read_inputs(request),
                partition=str(params[PARAM_PARTITION]) if PARAM_PARTITION in params else None,
                deadline_ms=float(deadline) if deadline is not None else None,
                private=bool(params.get(PARAM_PRIVATE, False)),
            )
            wanted = [o.name for o in request.outputs] or list(result.outputs)
            missing = [n for n in wanted if n not in result.outputs]
            if missing:
                raise InvalidArgument(
                    f"model '{request.model_name}': unknown requested output {missing[0]!r}; "
                    f"outputs are {list(result.outputs)}"
                )
            response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
            codec.add_outputs(response, {n: result.outputs[n] for n in wanted})
            t = result.trace
            codec.set_params(
                response.parameters,
                {
                    "splitgate.partition": t.partition,
                    "splitgate.device_ms": t.device_ms,
                    "splitgate.network_ms": t.network_ms,
                    "splitgate.cloud_ms": t.cloud_ms,
                    "splitgate.total_ms": t.total_ms,
                    "splitgate.bytes_sent": t.bytes_sent,
                    "splitgate.fallback": t.fallback or "",
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
) -> tuple[grpc.Server, int, Any]:
    """Start the edge OIP server (and a Prometheus endpoint if ``metrics_port`` is set).

    Returns:
        (server, bound port, metrics HTTP server or None; its ``server_port`` is
        the bound port). Stop with ``server.stop(grace)`` and ``metrics.shutdown()``.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(EdgeServicer(gateway), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    metrics_server = None
    if metrics_port is not None:
        from prometheus_client import start_http_server

        metrics_server, _ = start_http_server(metrics_port, addr=host, registry=gateway.metrics.registry)
    return server, bound, metrics_server
