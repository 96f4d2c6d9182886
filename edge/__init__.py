"""splitgate's device side: the Gateway apps call, and the cloud client it uses.

Public API:
    Gateway      -- load plan bundles, ``infer(model, inputs, partition=...)``.
    Result       -- outputs plus a Trace (partition, device/network/cloud ms, bytes).
    Trace        -- where a request ran and what it cost.
    CloudClient  -- a numpy-in, numpy-out OIP gRPC client for the cloud tier.

The edge needs only onnxruntime, numpy, grpcio and protobuf (never Ray or torch).
"""

from __future__ import annotations

from edge._client import CloudClient, CloudReply
from edge._gateway import Gateway, Result, Trace

__all__ = ["Gateway", "Result", "Trace", "CloudClient", "CloudReply"]
