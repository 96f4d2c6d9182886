"""The Ray Serve deployment that hosts :class:`SuffixService` behind gRPC ingress.

Ray Serve's gRPC proxy routes each ``inference.GRPCInferenceService`` method to
the deployment method of the same name. Typed splitgate errors become gRPC
statuses by setting them on the request's ``grpc_context`` (Ray carries the
code and details back through the proxy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from cloud._service import SuffixService
from splitgate.errors import SplitgateError
from splitgate.protocol import inference_pb2 as pb

__all__ = ["InferenceDeployment", "build_app", "SERVICER_FUNCTION"]

# What Ray Serve's gRPC proxy must import to expose the OIP service.
SERVICER_FUNCTION = "splitgate.protocol.inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"


def _answer(context: RayServegRPCContext, empty: Any, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except SplitgateError as exc:
        context.set_code(exc.code)
        context.set_details(str(exc))
        return empty
    except Exception as exc:  # noqa: BLE001 - a bug must still answer, never hang
        context.set_code(grpc.StatusCode.INTERNAL)
        context.set_details(f"internal error: {type(exc).__name__}: {exc}")
        return empty


@serve.deployment(name="splitgate-cloud", ray_actor_options={"num_cpus": 0})
class InferenceDeployment:
    """One replica serving every loaded bundle's suffixes over OIP."""

    def __init__(self, bundle_dirs: Sequence[str], intra_op_threads: int = 0) -> None:
        self._service = SuffixService(bundle_dirs, intra_op_threads=intra_op_threads)

    def ServerLive(self, request: pb.ServerLiveRequest, grpc_context: RayServegRPCContext):
        return _answer(grpc_context, pb.ServerLiveResponse(), self._service.server_live)

    def ServerReady(self, request: pb.ServerReadyRequest, grpc_context: RayServegRPCContext):
        return _answer(grpc_context, pb.ServerReadyResponse(), self._service.server_ready)

    def ServerMetadata(self, request: pb.ServerMetadataRequest, grpc_context: RayServegRPCContext):
        return _answer(grpc_context, pb.ServerMetadataResponse(), self._service.server_metadata)

    def ModelReady(self, request: pb.ModelReadyRequest, grpc_context: RayServegRPCContext):
        return _answer(grpc_context, pb.ModelReadyResponse(), lambda: self._service.model_ready(request))

    def ModelMetadata(self, request: pb.ModelMetadataRequest, grpc_context: RayServegRPCContext):
        return _answer(
            grpc_context, pb.ModelMetadataResponse(), lambda: self._service.model_metadata(request)
        )

    def ModelInfer(self, request: pb.ModelInferRequest, grpc_context: RayServegRPCContext):
        return _answer(grpc_context, pb.ModelInferResponse(), lambda: self._service.model_infer(request))


def build_app(bundle_dirs: Sequence[str], *, intra_op_threads: int = 0, num_replicas: int = 1):
    """Return a bound Ray Serve application serving ``bundle_dirs``."""
    dirs = [str(d) for d in bundle_dirs]
    return InferenceDeployment.options(num_replicas=num_replicas).bind(dirs, intra_op_threads)
