"""Hardened grpcio registration of the inference service: request bytes that
do not parse are answered INVALID_ARGUMENT, not grpcio's INTERNAL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

__all__ = ["add_inference_servicer", "malformed_message"]


class _Malformed:
    """Stands in for a request whose bytes are not a valid protobuf message."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.message = f"malformed {type_name}: the request bytes are not a valid protobuf message ({error})"


def malformed_message(request: object) -> str | None:
    """The INVALID_ARGUMENT message for a request that did not parse, else None.

    Args:
        request: what a lenient deserializer handed to the servicer.
    """
    return request.message if isinstance(request, _Malformed) else None


def _lenient(message_cls: Any) -> Callable[[bytes], Any]:
    """A deserializer that returns a :class:`_Malformed` instead of raising."""

    def parse(data: bytes) -> Any:
        try:
            return message_cls.FromString(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, RecursionError on deep nesting, ...
            return _Malformed(message_cls.DESCRIPTOR.name, exc)

    return parse


def _guarded(method: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
    """``method``, except that a :class:`_Malformed` request aborts INVALID_ARGUMENT."""

    def call(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return method(request, context)

    return call


def add_inference_servicer(servicer: Any, server: grpc.Server) -> None:
    """Register an ``inference.GRPCInferenceService`` servicer like the
    generated ``add_..._to_server``, except that a request whose bytes do not
    parse is answered INVALID_ARGUMENT (grpcio's default is INTERNAL
    "Exception deserializing request!", which reads as a server bug).

    Args:
        servicer: an object with one method per RPC (ServerLive, ..., ModelInfer).
        server: the grpcio server (also Ray Serve's gRPC proxy, which calls this
            by its dotted path ``splitgate.security.add_inference_servicer``).
    """
    from splitgate.protocol import inference_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _guarded(getattr(servicer, method.name)),
            request_deserializer=_lenient(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
