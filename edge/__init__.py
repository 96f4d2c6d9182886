"""splitgate's device side: the Gateway apps call, and what it is made of.

Public API:
    Gateway        -- load plan bundles, ``infer(model, inputs)``; picks the partition,
                      falls back to the device, caches, counts.
    AsyncGateway   -- its asyncio twin (same core).
    GatewayConfig  -- deadlines, breaker, hedging, cache, privacy, ... (file or code).
    Result, Trace  -- outputs, and where a request ran and what it cost.
    CloudClient    -- a numpy-in, numpy-out OIP gRPC client for the cloud tier.
    Policy, LinkMonitor, LinkEstimate, LinkCalibration, hedge_delay_ms, rtt_first,
    rtt_probe_timeout_s, calibrated -- the decision and link-estimation parts, for experiments
                      that drive them directly.
    DeviceCosts    -- the device's measured speed against the plan (online device costs).
    DecisionCore   -- every decision rule of the Gateway with no I/O and an injected clock
                      (probe triggers, the choice, hedge timing, what each outcome teaches);
                      the Gateway and the analytic experiment engine both drive it. Its
                      decisions: ProbePlan, Decision, ProbeSpec, CloudCall, NetworkChange.
    DEFAULT_UPLINK_MBPS, DEFAULT_RTT_MS -- what the link is assumed to be before it is measured.
    RolloutRule    -- when a staged candidate version is promoted or rolled back
                      (``Gateway.stage_candidate``); Rollout, judge, Judgement, RolloutStats,
                      VersionStats -- the I/O-free rollout core (sticky A/B split, statistics, verdict).
    UpdateOutcome  -- what one over-the-air update check did for a model (``Gateway.check_updates``).
    publish        -- write bundle archives and an update index (``splitgate publish``).

The edge needs only onnxruntime, numpy, grpcio, protobuf (and prometheus_client
for metrics); never Ray or torch.
"""

from __future__ import annotations

from splitgate.edge._client import CloudClient, CloudReply
from splitgate.edge._decide import (
    DEFAULT_RTT_MS,
    DEFAULT_UPLINK_MBPS,
    CloudCall,
    Decision,
    DecisionCore,
    NetworkChange,
    ProbePlan,
    ProbeSpec,
)
from splitgate.edge._device import DeviceCosts
from splitgate.edge._drift import DriftReport
from splitgate.edge._gateway import AsyncGateway, Gateway, Result, Trace
from splitgate.edge._monitor import LinkCalibration, LinkEstimate, LinkMonitor
from splitgate.edge._policy import Policy, calibrated, hedge_delay_ms, rtt_first, rtt_probe_timeout_s
from splitgate.edge._rollout import Judgement, Rollout, RolloutRule, RolloutStats, VersionStats, judge
from splitgate.edge._updates import UpdateOutcome, publish
from splitgate.edge.config import GatewayConfig

__all__ = [
    "Gateway",
    "AsyncGateway",
    "GatewayConfig",
    "Result",
    "Trace",
    "CloudClient",
    "CloudReply",
    "Policy",
    "hedge_delay_ms",
    "rtt_first",
    "rtt_probe_timeout_s",
    "calibrated",
    "LinkCalibration",
    "LinkMonitor",
    "LinkEstimate",
    "DeviceCosts",
    "DecisionCore",
    "ProbePlan",
    "Decision",
    "ProbeSpec",
    "CloudCall",
    "NetworkChange",
    "DEFAULT_UPLINK_MBPS",
    "DEFAULT_RTT_MS",
    "RolloutRule",
    "Rollout",
    "RolloutStats",
    "VersionStats",
    "Judgement",
    "judge",
    "UpdateOutcome",
    "publish",
    "DriftReport",
]
