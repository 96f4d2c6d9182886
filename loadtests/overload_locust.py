"""Locustfile of the overload run (:mod:`splitgate.loadtests.overload`): open-loop load in steps.

Each user sends recorded requests at a fixed rate (``--rate`` per second,
open loop) with ``splitgate.deadline_ms`` = ``--deadline-ms``
(and that gRPC deadline), straight to the replicas' direct-ingress endpoints
(re-discovered every 2 s, so replicas added by autoscaling get load; the proxy
when none is advertised). By default these users do *not* back off when
refused: they stand for many distinct devices, the worst case for the tier;
with ``--back-off`` each acts as a splitgate edge does: after a refusal it
sends nothing for the hinted time (those requests count as ``local``). The shape
(``--steps "SECONDS:USERS,..."``) holds each user count for its time; every
answer is classified per step: ``ok`` (and whether within the deadline),
``refused`` (an admission refusal: RESOURCE_EXHAUSTED / UNAVAILABLE with a
``splitgate.retry_after_ms`` hint, or Serve's own backpressure) or ``failed``
(anything else). The per-step result goes to ``--overload-result`` as JSON.
"""

from __future__ import annotations

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import json  # noqa: E402
import random  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
from locust import LoadTestShape, User, events, task  # noqa: E402
from locust.env import Environment  # noqa: E402

from splitgate.loadtests._traffic import load_traffic  # noqa: E402
from splitgate.protocol import inference_pb2 as pb  # noqa: E402
from splitgate.protocol import inference_pb2_grpc as pb_grpc  # noqa: E402
from splitgate import codec, contract  # noqa: E402

__all__ = ["OverloadUser", "StepShape"]

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Part of each step left out of its figures (users spawning, queues and replicas settling).
WARMUP_FRACTION = 0.3
_BACKPRESSURE = "request dropped due to backpressure"


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    group = parser.add_argument_group("overload", "splitgate overload run")
    group.add_argument("--traffic", default="", help="recorded traffic file (.npz) from the driver")
    group.add_argument("--steps", default="10:1", help='"SECONDS:USERS,..." held in order')
    group.add_argument("--rate", type=float, default=5.0, help="requests per second per user")
    group.add_argument("--deadline-ms", type=float, default=300.0, help="per-request deadline (ms)")
    group.add_argument("--overload-result", default="", help="write the per-step result (JSON) here")
    group.add_argument("--ramp", type=int, default=0,
                       help="find the peak first: start at this many users, x1.5 per step (0 = use --steps)")
    group.add_argument("--ramp-steps", type=int, default=6, help="most ramp steps")
    group.add_argument("--overload", default="3,4,5", help="offered load per step after the ramp, x peak goodput")
    group.add_argument("--step-time", type=float, default=12.0, help="seconds per step (ramp and overload)")
    group.add_argument("--cooldown", type=float, default=20.0, help="seconds at one user at the end")
    group.add_argument("--back-off", action="store_true", default=False,
                       help="act as splitgate edges do: after a refusal send nothing for its retry hint "
                            "(those requests count as 'local': completed on the device)")


def _steps(text: str) -> list[tuple[float, int]]:
    out = []
    for item in text.split(","):
        seconds, users = item.split(":")
        out.append((float(seconds), int(users)))
    return out


class _Collector:
    """Per-step outcomes, by wall-clock time (steps from the shape's schedule)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.schedule: list[tuple[float, float, int]] = []  # (start, end, users), wall clock
        self.records: list[tuple[float, str, float]] = []  # (finished at, outcome, ms)
        self._lock = threading.Lock()

    def add(self, outcome: str, ms: float) -> None:
        with self._lock:
            self.records.append((time.time(), outcome, ms))

    def result(self, deadline_ms: float, rate: float) -> dict[str, Any]:
        steps = []
        for start, end, users in self.schedule:
            lo = start + WARMUP_FRACTION * (end - start)
            window = [(o, ms) for t, o, ms in self.records if lo <= t < end]
            span = max(end - lo, 1e-9)
            demand = len(window) / span
            local = sum(1 for o, _ in window if o == "local")
            window = [(o, ms) for o, ms in window if o != "local"]
            ok = sorted(ms for o, ms in window if o == "ok")
            good = sum(1 for ms in ok if ms <= deadline_ms)

            def pct(q: float, ok: list[float] = ok) -> float | None:
                return ok[min(int(q * len(ok)), len(ok) - 1)] if ok else None

            steps.append({
                "start": start, "end": end, "users": users, "offered_rps": users * rate,
                "demand_rps": demand, "sent_rps": len(window) / span, "ok_rps": len(ok) / span, "goodput_rps": good / span,
                "refused_rps": sum(1 for o, _ in window if o.startswith("refused")) / span,
                "local_rps": local / span,
                "refused_queue_full": sum(1 for o, _ in window if o == "refused-queue-full"),
                "refused_deadline": sum(1 for o, _ in window if o == "refused-deadline"),
                "refused_serve_backpressure": sum(1 for o, _ in window if o == "refused-backpressure"),
                "failed": sum(1 for o, _ in window if o == "failed"),
                "admitted_p50_ms": pct(0.50), "admitted_p99_ms": pct(0.99), "admitted_max_ms": ok[-1] if ok else None,
                "late": len(ok) - good,
            })
        total_failed = sum(1 for _, o, _ in self.records if o == "failed")
        return {"deadline_ms": deadline_ms, "rate_per_user": rate, "steps": steps, "failed_total": total_failed,
                "requests_total": len(self.records)}


_collector = _Collector()
_traffic: list = []
_endpoints: list[str] = []
_endpoints_at = [0.0]
_failures: list[str] = []


@events.init.add_listener
def _load(environment: Environment, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is not None and opts.traffic and not _traffic:
        _traffic.extend(load_traffic(opts.traffic))


def discover_endpoints(address: str, timeout_s: float = 2.0) -> list[str]:
    """The replicas' direct-ingress endpoints the tier advertises, on ``address``'s
    (loopback) host. (Not imported from ``locustfile``: that would register its
    options and listeners here too.)"""
    with grpc.insecure_channel(address) as channel:
        meta = pb_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(pb.ServerMetadataRequest(), timeout=timeout_s)
    host = address.rsplit(":", 1)[0]
    for ext in meta.extensions:
        if ext.startswith(contract.ENDPOINTS_EXTENSION):
            return [f"{host}:{e.rsplit(':', 1)[1]}" for e in ext[len(contract.ENDPOINTS_EXTENSION):].split(",") if e]
    return []


def _refresh_endpoints(host: str) -> list[str]:
    if time.monotonic() - _endpoints_at[0] > 2.0:
        _endpoints_at[0] = time.monotonic()
        try:
            found = discover_endpoints(host)
        except grpc.RpcError:
            found = []
        if found:
            _endpoints[:] = found
    return _endpoints


def classify(exc: grpc.RpcError) -> str:
    """``refused-queue-full`` / ``refused-deadline`` / ``refused-backpressure`` or ``failed``."""
    code = exc.code()
    hinted = any(k == contract.RETRY_AFTER_MS for k, _ in (exc.trailing_metadata() or ()))
    if hinted and code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "refused-queue-full"
    if hinted and code == grpc.StatusCode.UNAVAILABLE:
        return "refused-deadline"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _BACKPRESSURE in (exc.details() or "").lower():
        return "refused-backpressure"
    return "failed"


class OverloadUser(User):
    """One device sending at a fixed rate, never backing off."""

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        opts = environment.parsed_options
        self._period = 1.0 / float(opts.rate)
        self._started = time.monotonic()
        self._back_off = bool(opts.back_off)
        self._quiet_until = 0.0
        self._deadline_ms = float(opts.deadline_ms)
        self._rng = random.Random(id(self))
        self._messages: list[pb.ModelInferRequest] = []
        for t in _traffic:
            for raw in t.requests:
                request = pb.ModelInferRequest.FromString(raw)
                codec.set_params(request.parameters, {contract.DEADLINE_MS: self._deadline_ms})
                self._messages.append(request)
        self._stubs: dict[str, pb_grpc.GRPCInferenceServiceStub] = {}
        self._channels: list[grpc.Channel] = []

    def _stub(self) -> pb_grpc.GRPCInferenceServiceStub:
        host = (self.host or "").removeprefix("grpc://")
        live = _refresh_endpoints(host) or [host]
        target = self._rng.choice(live)
        stub = self._stubs.get(target)
        if stub is None:
            channel = grpc.insecure_channel(target, options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.use_local_subchannel_pool", 1),
            ])
            self._channels.append(channel)
            stub = self._stubs[target] = pb_grpc.GRPCInferenceServiceStub(channel)
        return stub

    def wait_time(self) -> float:
        """Open loop: the next request ``1/rate`` after the last one started
        (at once when the last took longer)."""
        return max(self._period - (time.monotonic() - self._started), 0.0)

    def on_stop(self) -> None:
        for channel in self._channels:
            channel.close()

    @task
    def infer(self) -> None:
        request = self._rng.choice(self._messages)
        self._started = time.monotonic()
        if self._started < self._quiet_until:
            _collector.add("local", 0.0)  # an edge backing off finishes it on the device
            return
        start = time.perf_counter()
        outcome, error = "ok", None
        try:
            self._stub().ModelInfer(request, timeout=self._deadline_ms / 1e3 * 4)
        except grpc.RpcError as exc:
            outcome = classify(exc)
            if self._back_off and outcome.startswith("refused"):
                hint = next((float(v) for k, v in (exc.trailing_metadata() or ()) if k == contract.RETRY_AFTER_MS),
                            200.0)
                self._quiet_until = time.monotonic() + hint / 1e3
            if outcome == "failed":
                error = Exception(f"{exc.code().name}: {exc.details()}")
                if len(_failures) < 20:
                    _failures.append(str(error))
        ms = (time.perf_counter() - start) * 1e3
        _collector.add(outcome, ms)
        self.environment.events.request.fire(
            request_type="grpc", name=outcome, response_time=ms, response_length=0, exception=error, context={},
        )


class StepShape(LoadTestShape):
    """The load schedule: fixed ``--steps``, or (with ``--ramp``) find the peak, then overload it.

    With ``--ramp U``: steps of ``--step-time`` s starting at U users, each 1.5x
    the last, while a step's goodput (answers within the deadline per second,
    measured after its warm-up) beats the best so far by 10 % (at most
    ``--ramp-steps``); the best is the peak. Then one step per ``--overload``
    factor F at F x peak offered (users = F x peak / rate); then ``--cooldown``
    s at one user. Autoscaling may add replicas while this runs: the report
    computes every step's overload factor against the best goodput of the
    whole run, not of the ramp.
    """

    def __init__(self) -> None:
        super().__init__()
        self._plan: list[int] = []
        self._best = 0.0
        self._ramping = True

    def _fixed(self, opts: Any, run_time: float) -> tuple[int, float] | None:
        steps = _steps(opts.steps)
        if not _collector.schedule:
            now, t = time.time() - run_time, 0.0
            for seconds, users in steps:
                _collector.schedule.append((now + t, now + t + seconds, users))
                t += seconds
        elapsed = 0.0
        for seconds, users in steps:
            elapsed += seconds
            if run_time < elapsed:
                return users, 1000.0
        return None

    def _goodput(self, start: float, end: float, deadline_ms: float) -> float:
        lo = start + WARMUP_FRACTION * (end - start)
        good = sum(1 for t, o, ms in list(_collector.records) if lo <= t < end and o == "ok" and ms <= deadline_ms)
        return good / max(end - lo, 1e-9)

    def _adaptive(self, opts: Any) -> tuple[int, float] | None:
        now = time.time()
        schedule = _collector.schedule
        if schedule and now < schedule[-1][1]:
            return schedule[-1][2], 1000.0
        if schedule and self._ramping:  # a ramp step just ended
            goodput = self._goodput(schedule[-1][0], schedule[-1][1], opts.deadline_ms)
            ramp_steps = len(schedule)
            if goodput > 1.1 * self._best and ramp_steps < opts.ramp_steps:
                self._best = max(self._best, goodput)
                users = max(int(round(schedule[-1][2] * 1.5)), schedule[-1][2] + 1)
            else:
                self._best = max(self._best, goodput)
                self._ramping = False
                factors = [float(f) for f in opts.overload.split(",") if f]
                self._plan = [max(int(round(f * self._best / opts.rate)), 1) for f in factors] + [1]
        if not schedule:
            users = opts.ramp
        elif not self._ramping:
            if not self._plan:
                return None
            users = self._plan.pop(0)
        seconds = opts.cooldown if not self._ramping and not self._plan else opts.step_time
        schedule.append((now, now + seconds, users))
        return users, 1000.0

    def tick(self) -> tuple[int, float] | None:
        opts = self.runner.environment.parsed_options  # type: ignore[union-attr]
        if opts.ramp:
            return self._adaptive(opts)
        return self._fixed(opts, self.get_run_time())


@events.test_stop.add_listener
def _write(environment: Environment, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is None or not opts.overload_result:
        return
    result = _collector.result(opts.deadline_ms, opts.rate)
    result["failure_samples"] = _failures
    with open(opts.overload_result, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
