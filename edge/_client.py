"""A thin OIP gRPC client for the cloud tier: numpy in, numpy out, typed errors."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
import numpy as np

from splitgate import codec
from splitgate.errors import from_rpc_error
from splitgate.protocol import inference_pb2 as pb
from splitgate.protocol import inference_pb2_grpc as pb_grpc

__all__ = ["CloudClient", "CloudReply"]

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class CloudReply:
    """One suffix call: outputs plus where the time and bytes went."""

    outputs: dict[str, np.ndarray]
    round_trip_ms: float
    cloud_ms: float
    bytes_sent: int
    bytes_received: int
    params: dict[str, bool | int | float | str]

    @property
    def network_ms(self) -> float:
        """Round trip minus the cloud's own compute time (transfer, queueing, proxy)."""
        return max(self.round_trip_ms - self.cloud_ms, 0.0)


class CloudClient:
    """Calls ``inference.GRPCInferenceService`` on a cloud tier.

    Parameters:
        address: ``host:port`` of the tier's gRPC ingress.
        timeout_s: default per-call deadline.
        max_message_bytes: largest message sent or received.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: object, timeout_s: float | None) -> object:
        try:
            return getattr(self._stub, method)(request, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def server_live(self, timeout_s: float | None = None) -> bool:
        return self._call("ServerLive", pb.ServerLiveRequest(), timeout_s).live

    def server_ready(self, timeout_s: float | None = None) -> bool:
        return self._call("ServerReady", pb.ServerReadyRequest(), timeout_s).ready

    def model_ready(self, model: str, timeout_s: float | None = None) -> bool:
        return self._call("ModelReady", pb.ModelReadyRequest(name=model), timeout_s).ready

    def model_metadata(self, model: str, version: str = "", timeout_s: float | None = None):
        return self._call("ModelMetadata", pb.ModelMetadataRequest(name=model, version=version), timeout_s)

    def infer(
        self,
        model: str,
        tensors: Mapping[str, np.ndarray],
        *,
        partition: str | None = None,
        plan_digest: str | None = None,
        timeout_s: float | None = None,
    ) -> CloudReply:
        """Send tensors for (model, partition); return the suffix outputs.

        Raises:
            splitgate.errors.SplitgateError subclasses mapped from the gRPC status.
        """
        request = pb.ModelInferRequest(model_name=model)
        params: dict[str, str] = {}
        if partition:
            params["splitgate.partition"] = partition
        if plan_digest:
            params["splitgate.plan_digest"] = plan_digest
        codec.set_params(request.parameters, params)
        sent = codec.add_inputs(request, tensors)
        start = time.perf_counter()
        response = self._call("ModelInfer", request, timeout_s)
        round_trip_ms = (time.perf_counter() - start) * 1e3
        params_out = codec.read_params(response.parameters)
        return CloudReply(
            outputs=codec.read_outputs(response),
            round_trip_ms=round_trip_ms,
            cloud_ms=float(params_out.get("splitgate.cloud_ms", 0.0)),
            bytes_sent=sent,
            bytes_received=sum(len(b) for b in response.raw_output_contents),
            params=params_out,
        )
