"""Admission control of the cloud tier (issue 18.1) and the edge's answer to a refusal.

Unit tests drive :class:`splitgate.cloud._admission.AdmissionQueue` with a fake
clock (bounded queue, priority order, deadline refusals, retry hints) and the
edge client's reading of a refusal status. Integration tests (marked
``integration``) start a real Ray Serve tier (``splitgate cloud serve`` in a
subprocess, its own Ray) and call it over real gRPC: a burst past
``max_queue`` is refused RESOURCE_EXHAUSTED with a retry hint before any
compute, a deadline that cannot be met is refused at once, a high-priority
request overtakes queued low-priority ones, and a real Gateway whose every
cloud call is refused answers every request locally with its breaker closed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import onnx
import pytest

from splitgate import codec, contract
from splitgate.cloud._admission import AdmissionPolicy, AdmissionQueue, ServiceTime, request_terms
from splitgate.errors import (
    DeadlineUnmeetable,
    InvalidArgument,
    QueueFull,
    ResourceExhausted,
    Unavailable,
    is_peer_failure,
)

SPLITGATE = [sys.executable, "-m", "splitgate"]
SIZE = 96  # input [batch, 3, SIZE, SIZE]: ~20 ms of conv per row on one thread here


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _queue(max_queue: int = 4, workers: int = 1, **policy) -> tuple[AdmissionQueue, FakeClock]:
    clock = FakeClock()
    return AdmissionQueue(AdmissionPolicy(max_queue=max_queue, **policy), workers=workers, clock=clock), clock


# -- unit: request terms --------------------------------------------------------------


def test_request_terms_defaults_levels_and_deadlines() -> None:
    policy = AdmissionPolicy(priority_levels=3, default_priority=2, default_deadline_ms=500)
    assert request_terms({}, policy) == (2, 500.0)
    assert request_terms({contract.PRIORITY: 0}, policy)[0] == 2  # Triton: 0 = the default level
    assert request_terms({contract.PRIORITY: 1}, policy)[0] == 1
    assert request_terms({contract.PRIORITY: 9}, policy)[0] == 3  # past the last level: served last
    assert request_terms({contract.DEADLINE_MS: 80}, policy)[1] == 80.0
    # the tighter of the parameter and the gRPC deadline
    assert request_terms({contract.DEADLINE_MS: 80.0}, policy, grpc_remaining_s=0.05)[1] == pytest.approx(50.0)
    assert request_terms({}, AdmissionPolicy())[1] is None


@pytest.mark.parametrize("params, name", [
    ({contract.PRIORITY: -1}, contract.PRIORITY),
    ({contract.PRIORITY: "high"}, contract.PRIORITY),
    ({contract.PRIORITY: True}, contract.PRIORITY),
    ({contract.DEADLINE_MS: 0}, contract.DEADLINE_MS),
    ({contract.DEADLINE_MS: "soon"}, contract.DEADLINE_MS),
    ({contract.DEADLINE_MS: float("nan")}, contract.DEADLINE_MS),
])
def test_request_terms_refuse_bad_values_by_name(params: dict, name: str) -> None:
    with pytest.raises(InvalidArgument, match=name.replace(".", r"\.")):
        request_terms(params, AdmissionPolicy())


@pytest.mark.parametrize("fields", [
    {"max_queue": -1}, {"priority_levels": 0}, {"default_priority": 4}, {"default_deadline_ms": 0},
])
def test_policy_refuses_bad_settings(fields: dict) -> None:
    with pytest.raises(ValueError):
        AdmissionPolicy(**fields)


# -- unit: the queue ------------------------------------------------------------------


def test_full_queue_refuses_with_queue_full_and_a_hint() -> None:
    queue, _ = _queue(max_queue=3)
    queue.timing.record(run_ms=20.0, rows=1)
    for i in range(3):
        queue.offer(i, priority=2)
    with pytest.raises(QueueFull, match="max_queue 3") as info:
        queue.offer(3, priority=2)
    err = info.value
    assert isinstance(err, ResourceExhausted) and err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # the hint: the queued work drained at the measured pace (20 ms run + 3 rows x 20 ms)
    assert err.retry_after_ms == pytest.approx(80.0)
    assert queue.depth == 3 and queue.refused_full == 1
    assert not is_peer_failure(err)  # a breaker must not count it


def test_unbounded_queue_never_refuses_by_size() -> None:
    queue, _ = _queue(max_queue=0)
    for i in range(200):
        queue.offer(i, priority=2)
    assert queue.depth == 200


def test_take_serves_priority_levels_in_order_fifo_within() -> None:
    queue, _ = _queue(max_queue=10)
    for name, level in [("low-a", 3), ("mid-a", 2), ("high", 1), ("low-b", 3), ("mid-b", 2)]:
        queue.offer(name, priority=level)
    order = []
    for _ in range(5):
        taken, refused = queue.take(max_rows=1)
        assert not refused
        order += [e.item for e in taken]
        queue.finished(1, 10.0)
    assert order == ["high", "mid-a", "mid-b", "low-a", "low-b"]


def test_take_batches_up_to_max_rows_in_priority_order() -> None:
    queue, _ = _queue(max_queue=10)
    queue.offer("low", priority=3, rows=2)
    queue.offer("high", priority=1, rows=2)
    queue.offer("mid", priority=2, rows=2)
    taken, _ = queue.take(max_rows=4)
    assert [e.item for e in taken] == ["high", "mid"]
    queue.finished(4, 8.0)
    assert queue.timing.row_ms == pytest.approx(2.0)


def test_deadline_that_the_queue_ahead_would_miss_is_refused_with_a_hint() -> None:
    queue, _ = _queue(max_queue=10, deadline_fraction=1.0)
    queue.offer("before any measurement", priority=2, deadline_ms=1.0)  # nothing measured: admitted
    queue.take(max_rows=1)
    queue.finished(1, 20.0)  # one run of one row: 20 ms
    queue.offer("a", priority=2)
    queue.offer("b", priority=2)
    # 2 rows ahead at 20 ms each plus its own 20 ms run: 60 ms expected
    queue.offer("fits", priority=2, deadline_ms=70.0)
    with pytest.raises(DeadlineUnmeetable, match="of the request's deadline of 50 ms") as info:
        queue.offer("misses", priority=2, deadline_ms=50.0)
    assert isinstance(info.value, Unavailable) and info.value.retry_after_ms >= 60.0
    # a high-priority request has nothing of its level ahead: it fits in 50 ms
    queue.offer("urgent", priority=1, deadline_ms=50.0)
    assert queue.refused_deadline == 1


def test_replica_plans_with_its_share_of_the_deadline() -> None:
    queue, clock = _queue(max_queue=10, deadline_fraction=0.5)
    queue.timing.record(run_ms=20.0, rows=1)
    queue.offer("ahead", priority=2)
    with pytest.raises(DeadlineUnmeetable, match=r"share \(35 ms\)"):
        queue.offer("x", priority=2, deadline_ms=70.0)  # 40 ms expected; its share is 50 % of 70 ms
    queue.offer("y", priority=2, deadline_ms=80.0)  # 40 ms fits in 40 ms
    clock.now += 0.025  # 15 ms of its share left: less than its own 20 ms run
    taken, _ = queue.take(max_rows=8)
    assert [e.item for e in taken] == ["ahead"]  # (y would make the batch outlast y's share)
    queue.finished(1, 20.0)
    taken, refused = queue.take(max_rows=8)
    assert not taken and [e.item for e, _ in refused] == ["y"]


def test_waiting_request_past_its_deadline_is_refused_not_run() -> None:
    queue, clock = _queue(max_queue=10)
    queue.timing.record(run_ms=20.0, rows=1)
    queue.offer("stale", priority=2, deadline_ms=100.0)
    queue.offer("fresh", priority=2, deadline_ms=1000.0)
    clock.now += 0.09  # 10 ms left: less than its own 20 ms run
    taken, refused = queue.take(max_rows=8)
    assert [e.item for e in taken] == ["fresh"]
    assert [e.item for e, _ in refused] == ["stale"]
    assert isinstance(refused[0][1], DeadlineUnmeetable) and refused[0][1].retry_after_ms is not None


def test_hint_is_clamped() -> None:
    queue, _ = _queue(max_queue=1)
    queue.offer("x", priority=2)
    with pytest.raises(QueueFull) as info:  # nothing measured: the shortest hint
        queue.offer("y", priority=2)
    assert info.value.retry_after_ms == 5.0
    queue.timing.record(run_ms=60_000.0, rows=1)
    with pytest.raises(QueueFull) as info:
        queue.offer("y", priority=2)
    assert info.value.retry_after_ms == 5000.0


def test_hint_stretches_while_more_are_refused_than_admitted() -> None:
    queue, _ = _queue(max_queue=2)
    queue.timing.record(run_ms=20.0, rows=1)
    queue.offer("a", priority=2)
    queue.offer("b", priority=2)
    hints = []
    for _ in range(6):
        with pytest.raises(QueueFull) as info:
            queue.offer("c", priority=2)
        hints.append(info.value.retry_after_ms)
    assert hints[0] == pytest.approx(60.0)  # the queue's drain time: 20 ms + 2 rows x 20 ms
    assert hints == sorted(hints) and hints[-1] == pytest.approx(60.0 * 5 / 2, rel=0.01)  # 5 refused : 2 admitted


def test_service_time_estimate_spreads_over_workers() -> None:
    timing = ServiceTime()
    assert timing.estimate_ms(100) == 0.0  # no sample: refuse nothing by deadline
    timing.record(run_ms=40.0, rows=4)  # 10 ms per row
    assert timing.estimate_ms(rows_ahead=8, rows=1, workers=1) == pytest.approx(10.0 + 80.0)
    assert timing.estimate_ms(rows_ahead=8, rows=2, workers=2) == pytest.approx(20.0 + 40.0)


def test_batch_never_outlasts_the_earliest_deadline_in_it() -> None:
    queue, _ = _queue(max_queue=10, deadline_fraction=1.0)
    queue.timing.record(run_ms=20.0, rows=1)  # 20 ms per row
    queue.offer("tight", priority=1, deadline_ms=70.0)  # room for a batch of 3 rows
    for i in range(5):
        queue.offer(f"loose-{i}", priority=2, deadline_ms=10_000.0)
    taken, refused = queue.take(max_rows=8)
    assert [e.item for e in taken] == ["tight", "loose-0", "loose-1"] and not refused
    queue.finished(3, 60.0)
    taken, _ = queue.take(max_rows=8)  # no tight deadline left: a full batch of the rest
    assert [e.item for e in taken] == [f"loose-{i}" for i in (2, 3, 4)]


def test_wait_turn_lets_the_higher_priority_thread_go_first() -> None:
    queue, _ = _queue(max_queue=10, workers=1)
    first = queue.offer("running", priority=2)
    queue.wait_turn(first)  # holds the only slot
    order: list[str] = []
    ready = threading.Barrier(3)

    def waiter(name: str, level: int) -> None:
        entry = queue.offer(name, priority=level)
        ready.wait()
        queue.wait_turn(entry)
        order.append(name)
        queue.finished(1, 1.0)

    threads = [threading.Thread(target=waiter, args=a) for a in (("low", 3), ("high", 1))]
    for t in threads:
        t.start()
    ready.wait()
    queue.finished(1, 1.0)  # the slot frees: the heap decides who runs next
    for t in threads:
        t.join(10)
    assert order == ["high", "low"]


def test_wait_turn_refuses_a_waiter_whose_deadline_passes() -> None:
    queue = AdmissionQueue(AdmissionPolicy(max_queue=4), workers=1)  # real clock: the wait times out
    queue.timing.record(run_ms=5.0, rows=1)
    holder = queue.offer("running", priority=1)
    queue.wait_turn(holder)
    entry = queue.offer("late", priority=2, deadline_ms=30.0)
    with pytest.raises(DeadlineUnmeetable, match="waited"):
        queue.wait_turn(entry)
    assert queue.depth == 0


# -- unit: the edge client reads a refusal ---------------------------------------------


class _Status(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple = ()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._trailing


def test_client_turns_hinted_statuses_into_refusals() -> None:
    from splitgate.edge._client import DEFAULT_RETRY_AFTER_MS, _typed

    full = _typed(_Status(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", ((contract.RETRY_AFTER_MS, "120"),)))
    assert isinstance(full, QueueFull) and full.retry_after_ms == 120.0
    late = _typed(_Status(grpc.StatusCode.UNAVAILABLE, "would miss", ((contract.RETRY_AFTER_MS, "40"),)))
    assert isinstance(late, DeadlineUnmeetable) and late.retry_after_ms == 40.0
    serve = _typed(_Status(grpc.StatusCode.RESOURCE_EXHAUSTED, "Request dropped due to backpressure"))
    assert isinstance(serve, QueueFull) and serve.retry_after_ms == DEFAULT_RETRY_AFTER_MS
    # no hint: an outage (UNAVAILABLE) or an oversize message (RESOURCE_EXHAUSTED), not a refusal
    down = _typed(_Status(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    assert type(down) is Unavailable and is_peer_failure(down)
    big = _typed(_Status(grpc.StatusCode.RESOURCE_EXHAUSTED, "message larger than max"))
    assert type(big) is ResourceExhausted


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory: pytest.TempPathFactory):
    from splitgate.planner import build_bundle

    root = tmp_path_factory.mktemp("admission-small")
    onnx.save(heavy_model(channels=4, size=8, layers=2), root / "small.onnx")
    return build_bundle(root / "small.onnx", root / "small.bundle")


def test_gateway_backs_off_the_cloud_for_the_hint_without_opening_the_breaker(small_bundle) -> None:
    from types import SimpleNamespace

    from splitgate.edge import Gateway
    from splitgate.errors import InternalError

    with Gateway([small_bundle.root], breaker_failures=1) as gateway:
        core = gateway._core
        call = SimpleNamespace(model=small_bundle.model_name, sent_at=time.monotonic())  # (a CloudCall's fields)
        before = time.monotonic()
        for _ in range(3):
            core._failed(call, QueueFull("queue full", retry_after_ms=300.0))
        until = core._cloud_refused[(small_bundle.model_name, None)]
        assert before + 0.3 <= until <= time.monotonic() + 0.3
        assert gateway.breaker_state == "closed"
        core._failed(call, DeadlineUnmeetable("late", retry_after_ms=50.0))  # a shorter hint keeps the longer
        assert core._cloud_refused[(small_bundle.model_name, None)] == until
        core._failed(call, InternalError("boom"))  # a real failure still counts
        assert gateway.breaker_state == "open"


class _Context:
    """What the deployment uses of Ray Serve's gRPC context (for an in-process replica)."""

    def __init__(self) -> None:
        self.code, self.details, self.trailing = None, "", []

    def invocation_metadata(self) -> list:
        return []

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, metadata: list) -> None:
        self.trailing = list(metadata)


@pytest.mark.parametrize("batcher", ["drain", "serve"])
def test_replica_refuses_with_status_and_hint_before_compute(small_bundle, batcher: str) -> None:
    """The Serve deployment class itself (no Ray running): both batchers refuse an
    unmeetable deadline UNAVAILABLE with the hint in trailing metadata, and a bad priority."""
    import asyncio

    pytest.importorskip("ray")
    from splitgate.cloud import CloudConfig
    from splitgate.cloud._app import build_app
    from splitgate.protocol import inference_pb2 as pb

    bound = build_app(CloudConfig(bundles=[str(small_bundle.root)], batcher=batcher))._bound_deployment
    replica = bound.func_or_class(*bound.init_args, **bound.init_kwargs)
    replica._timing.record(run_ms=50.0, rows=1)  # measured: 50 ms per row

    def request(**params) -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name=small_bundle.model_name)
        codec.set_params(req.parameters, {contract.PARTITION: "cloud", **params})
        codec.add_inputs(req, {"x": np.zeros((1, 3, 8, 8), np.float32)})
        return req

    async def call(req) -> _Context:
        context = _Context()
        await replica.ModelInfer(req, context)
        return context

    late = asyncio.run(call(request(**{contract.DEADLINE_MS: 10.0})))
    assert late.code == grpc.StatusCode.UNAVAILABLE and "before any compute" in late.details
    assert [k for k, _ in late.trailing] == [contract.RETRY_AFTER_MS] and float(late.trailing[0][1]) >= 5
    bad = asyncio.run(call(request(**{contract.PRIORITY: -2})))
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and contract.PRIORITY in bad.details
    ok = asyncio.run(call(request(**{contract.DEADLINE_MS: 10_000.0, contract.PRIORITY: 1})))
    assert ok.code is None


def test_client_sends_its_budget_and_priority_and_raises_refusals_unretried() -> None:
    from splitgate.edge import CloudClient
    from splitgate.protocol import inference_pb2 as pb

    sent: list[tuple[pb.ModelInferRequest, float]] = []

    class Stub:
        def __init__(self, refuse: bool) -> None:
            self.refuse = refuse

        def ModelInfer(self, request, timeout, metadata):  # noqa: N802 - the gRPC method's name
            sent.append((request, timeout))
            if self.refuse:
                raise _Status(grpc.StatusCode.UNAVAILABLE, "would miss", ((contract.RETRY_AFTER_MS, "75"),))
            return pb.ModelInferResponse(model_name=request.model_name)

    with CloudClient("127.0.0.1:1", timeout_s=2.0) as client:
        client._stub = Stub(refuse=False)
        client.infer("m", {"x": np.zeros((1, 2), np.float32)}, timeout_s=0.25, priority=1)
        params = codec.read_params(sent[-1][0].parameters)
        assert params[contract.DEADLINE_MS] == 250.0 and params[contract.PRIORITY] == 1
        client._stub = Stub(refuse=True)
        with pytest.raises(DeadlineUnmeetable) as info:
            client.infer("m", {"x": np.zeros((1, 2), np.float32)})
        assert info.value.retry_after_ms == 75.0
        assert codec.read_params(sent[-1][0].parameters)[contract.DEADLINE_MS] == 2000.0  # the client's default
    assert len(sent) == 2  # a refusal is not retried elsewhere


# -- integration: a real Ray Serve tier ------------------------------------------------


def heavy_model(channels: int = 64, size: int = SIZE, layers: int = 4, seed: int = 0) -> onnx.ModelProto:
    """Convs at full resolution on a dynamic batch: compute per row, no shortcut by batching
    (the overload run's model, :func:`splitgate.loadtests.overload.synthetic_conv_model`)."""
    from splitgate.loadtests.overload import synthetic_conv_model

    return synthetic_conv_model(channels=channels, size=size, layers=layers, seed=seed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def heavy_bundle(tmp_path_factory: pytest.TempPathFactory):
    from splitgate.planner import build_bundle

    root = tmp_path_factory.mktemp("admission")
    onnx.save(heavy_model(), root / "heavy.onnx")
    return build_bundle(root / "heavy.onnx", root / "heavy.bundle")


@pytest.fixture(scope="module")
def admitting_tier(heavy_bundle, tmp_path_factory: pytest.TempPathFactory):
    """``splitgate cloud serve`` (real Ray Serve, its own Ray) with a small queue, no batching."""
    pytest.importorskip("ray")
    config = tmp_path_factory.mktemp("admission-cfg") / "cloud.toml"
    config.write_text(
        "[cloud]\nmax_queue = 3\nmax_batch_size = 1\nintra_op_threads = 1\nmax_ongoing_requests = 32\n"
        "direct_ingress = false\n", encoding="utf-8",
    )
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [*SPLITGATE, "cloud", "serve", str(heavy_bundle.root), "--config", str(config), "--insecure",
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    try:
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "cloud tier serving" in line:
                break
        assert proc.poll() is None, "cloud serve exited:\n" + "".join(lines)
        address = f"127.0.0.1:{port}"
        with grpc.insecure_channel(address) as channel:
            stub = _stub(channel)
            for _ in range(3):  # warm: the replica measures its service time
                stub.ModelInfer(_request(heavy_bundle), timeout=30)
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _stub(channel: grpc.Channel):
    from splitgate.protocol import inference_pb2_grpc as pb_grpc

    return pb_grpc.GRPCInferenceServiceStub(channel)


def _request(bundle, rows: int = 1, **params):
    from splitgate.protocol import inference_pb2 as pb

    request = pb.ModelInferRequest(model_name=bundle.model_name)
    codec.set_params(request.parameters, {contract.PARTITION: "cloud", contract.PLAN_DIGEST: bundle.plan_digest,
                                          **params})
    codec.add_inputs(request, {"x": np.full((rows, 3, SIZE, SIZE), 0.5, np.float32)})
    return request


def _hint(exc: grpc.RpcError) -> float | None:
    return next((float(v) for k, v in exc.trailing_metadata() or () if k == contract.RETRY_AFTER_MS), None)


@pytest.mark.integration
def test_burst_past_max_queue_is_refused_at_once_with_a_retry_hint(admitting_tier, heavy_bundle) -> None:
    finished: dict[str, float] = {}

    def send(stub, name: str, request):
        call = stub.ModelInfer.future(request, timeout=30)
        call.add_done_callback(lambda _f: finished.__setitem__(name, time.perf_counter()))
        return call

    with grpc.insecure_channel(admitting_tier) as channel:
        stub = _stub(channel)
        blocker = send(stub, "blocker", _request(heavy_bundle, rows=8))  # 8 rows of compute, alone in its run
        time.sleep(0.05)
        calls = {f"burst-{i}": send(stub, f"burst-{i}", _request(heavy_bundle)) for i in range(16)}
        blocker_reply = blocker.result()
        ok, refused = [], []
        for name, call in calls.items():
            try:
                call.result()
                ok.append(name)
            except grpc.RpcError as exc:
                refused.append((name, exc))
        time.sleep(0.05)  # (done callbacks run on gRPC's threads)
    assert refused, "a burst of 16 against max_queue 3 and one compute thread was all admitted"
    assert len(ok) >= 3  # the queue's three places
    for _, exc in refused:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
        assert "queue is full" in exc.details() and "before any compute" in exc.details()
        assert _hint(exc) is not None and _hint(exc) >= 5
    # Refused before any compute: every refusal was answered while the replica was
    # still computing the blocker, ahead of everything admitted.
    assert codec.read_params(blocker_reply.parameters)[contract.BATCH_SIZE] == 8
    assert max(finished[name] for name, _ in refused) < finished["blocker"] < min(finished[n] for n in ok)


@pytest.mark.integration
def test_unmeetable_deadline_is_refused_fast(admitting_tier, heavy_bundle) -> None:
    with grpc.insecure_channel(admitting_tier) as channel:
        stub = _stub(channel)
        run_ms = codec.read_params(stub.ModelInfer(_request(heavy_bundle), timeout=30).parameters)[contract.CLOUD_MS]
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(_request(heavy_bundle, **{contract.DEADLINE_MS: 1.0}), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "deadline" in info.value.details() and _hint(info.value) is not None
        # a deadline the replica can meet is served
        stub.ModelInfer(_request(heavy_bundle, **{contract.DEADLINE_MS: 10_000.0}), timeout=30)
        with pytest.raises(grpc.RpcError) as bad:
            stub.ModelInfer(_request(heavy_bundle, **{contract.PRIORITY: "urgent"}), timeout=30)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and contract.PRIORITY in bad.value.details()
    assert run_ms > 1.0


@pytest.mark.integration
def test_high_priority_overtakes_queued_low_priority(admitting_tier, heavy_bundle) -> None:
    done: list[str] = []
    with grpc.insecure_channel(admitting_tier) as channel:
        stub = _stub(channel)
        blocker = stub.ModelInfer.future(_request(heavy_bundle, rows=8), timeout=30)  # ~8 rows of compute
        time.sleep(0.05)
        calls = [("low-1", stub.ModelInfer.future(_request(heavy_bundle, **{contract.PRIORITY: 3}), timeout=30)),
                 ("low-2", stub.ModelInfer.future(_request(heavy_bundle, **{contract.PRIORITY: 3}), timeout=30))]
        time.sleep(0.02)
        calls.append(("high", stub.ModelInfer.future(_request(heavy_bundle, **{contract.PRIORITY: 1}), timeout=30)))
        for name, call in calls:
            call.add_done_callback(lambda _f, name=name: done.append(name))
        blocker.result()
        for _, call in calls:
            call.result()
    assert done[0] == "high", done


@pytest.mark.integration
def test_gateway_finishes_refused_requests_locally_breaker_closed(admitting_tier, heavy_bundle) -> None:
    import onnxruntime as ort

    from splitgate.edge import Gateway

    feeds = {"x": np.random.default_rng(1).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)}
    expected = ort.InferenceSession(str(heavy_bundle.model_path), providers=["CPUExecutionProvider"]).run(
        None, feeds)[0]
    # Each request meets a replica busy with 8 rows (~160 ms) of other work; its
    # 100 ms budget travels as splitgate.deadline_ms, which the queue ahead cannot
    # meet: the tier refuses it at once and the edge finishes it locally.
    with Gateway([heavy_bundle.root], admitting_tier, breaker_failures=2, hedge=False) as gateway, \
            grpc.insecure_channel(admitting_tier) as channel:
        stub = _stub(channel)
        fallbacks = []
        for _ in range(8):
            busy = stub.ModelInfer.future(_request(heavy_bundle, rows=8), timeout=30)
            time.sleep(0.08)  # (the busy run has reached the replica, even on a loaded host)
            result = gateway.infer(heavy_bundle.model_name, feeds, partition="cloud", deadline_ms=100)
            np.testing.assert_allclose(result.outputs["y"], expected, rtol=1e-4, atol=1e-5)
            fallbacks.append(result.trace.fallback)
            busy.result()
        assert gateway.breaker_state == "closed"
        metrics = gateway.metrics.snapshot()
    # (a request that still met an idle replica, the busy run not there yet on a
    # loaded host, is simply answered by the cloud: None)
    assert set(fallbacks) <= {"cloud-overloaded", "cloud-refused", None}, fallbacks
    refusals = fallbacks.count("cloud-overloaded")
    assert refusals > 2, fallbacks  # more refusals than breaker_failures, breaker still closed
    counted = sum(v for k, v in metrics.items()
                  if k.startswith("splitgate_fallbacks_total") and "reason=cloud-overloaded" in k)
    assert counted == refusals


def test_cli_refuses_admission_settings_out_of_range_in_one_line(tmp_path, capsys) -> None:
    """``cloud serve --max-queue -1`` is a one-line error (exit 2) before Ray starts."""
    from splitgate.cli import main

    (tmp_path / "b").mkdir()
    assert main(["cloud", "serve", str(tmp_path / "b"), "--max-queue", "-1", "--insecure"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "max_queue must be >= 0, got -1" in err, err
