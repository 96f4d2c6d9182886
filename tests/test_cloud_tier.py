"""The Ray Serve cloud tier over real gRPC: documented status codes on both
ingress paths (proxy and a replica's direct-ingress port), dynamic batching
under concurrent load, queue depth, endpoint discovery and client fallback, and
a replica killed under load (replaced; in-flight calls get UNAVAILABLE, no hang).

Uses the session ``cloud_tier`` (one replica of the mobilenet bundle)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from conftest import CLOUD_MAX_MESSAGE_BYTES

from splitgate.edge import CloudClient
from splitgate.edge._client import _typed
from splitgate import codec
from splitgate.errors import (
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from splitgate.protocol import inference_pb2 as pb
from splitgate.protocol import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cut(zoo_bundle):
    """A middle split: its cut tensor, a reference suffix session, and an input maker."""
    cuts = [p for p in zoo_bundle.partitions.values() if p.kind == "split"]
    part = cuts[len(cuts) // 2]
    (spec,) = part.cut_tensors
    assert spec.shape[0] < 0, "zoo cut tensors keep the dynamic batch dim"
    session = ort.InferenceSession(str(part.suffix_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)

    def make(rows: int = 1) -> np.ndarray:
        return rng.standard_normal([rows, *spec.shape[1:]]).astype(np.float32)

    return part, spec, session, make


def _request(model: str, arrays: dict, **params) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    codec.set_params(request.parameters, {f"splitgate.{k}": v for k, v in params.items()})
    codec.add_inputs(request, arrays)
    return request


def _ingresses(cloud_tier) -> list[str]:
    endpoints = cloud_tier.endpoints
    assert endpoints, "the tier runs with direct ingress: replicas publish endpoints"
    return [cloud_tier.address, endpoints[0]]


def test_status_codes_on_proxy_and_direct_ingress(cloud_tier, zoo_bundle, cut) -> None:
    part, spec, _, make = cut
    model = zoo_bundle.model_name
    x = make()
    stale = "0" * 64
    # Just over the limit: refused by Serve's gRPC server before any replica work.
    big = np.zeros(CLOUD_MAX_MESSAGE_BYTES // 4 + 1024, dtype=np.float32)
    cases = [
        (_request("no-such-model", {spec.name: x}, partition=part.id), grpc.StatusCode.NOT_FOUND, "no-such-model"),
        (_request(model, {spec.name: x}, partition="cut-9999"), grpc.StatusCode.NOT_FOUND, "cut-9999"),
        (
            _request(model, {spec.name: x}, partition=part.id, plan_digest=stale),
            grpc.StatusCode.FAILED_PRECONDITION,
            "plan digest",
        ),
        (_request(model, {spec.name: big}, partition=part.id), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    ]
    for address in _ingresses(cloud_tier):
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for request, code, needle in cases:
                with pytest.raises(grpc.RpcError) as info:
                    stub.ModelInfer(request, timeout=30)
                assert info.value.code() == code, (address, info.value.details())
                assert needle in (info.value.details() or ""), info.value.details()
            ok = stub.ModelInfer(
                _request(model, {spec.name: x}, partition=part.id, plan_digest=zoo_bundle.plan_digest), timeout=30
            )
            assert codec.read_params(ok.parameters)["splitgate.partition"] == part.id
    # ... and the typed errors the Python client raises for them.
    with CloudClient(cloud_tier.address, discover=True) as client:
        with pytest.raises(NotFound):
            client.infer(model, {spec.name: x}, partition="cut-9999")
        with pytest.raises(FailedPrecondition, match="reload the bundle"):
            client.infer(model, {spec.name: x}, partition=part.id, plan_digest=stale)
        with pytest.raises(ResourceExhausted):
            client.infer(model, {spec.name: big}, partition=part.id)


def test_concurrent_requests_are_batched_and_answered_exactly(cloud_tier, zoo_bundle, cut) -> None:
    part, spec, session, make = cut
    model = zoo_bundle.model_name
    inputs = [make(rows=1 + i % 2) for i in range(48)]
    with CloudClient(cloud_tier.address, discover=True) as client:
        assert client.endpoints, "discovery found the replica's direct endpoint"

        def call(x: np.ndarray):
            return x, client.infer(model, {spec.name: x}, partition=part.id)

        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(call, inputs))
    batch_sizes = []
    depths = []
    for x, reply in replies:
        (want,) = session.run(None, {spec.name: x})
        (got,) = reply.outputs.values()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert reply.cloud_ms > 0
        batch_sizes.append(reply.params["splitgate.batch_size"])
        depths.append(reply.params["splitgate.queue_depth"])
    assert max(batch_sizes) > max(x.shape[0] for x in inputs), f"no request shared a run: {batch_sizes}"
    assert max(depths) > 1, f"queue depth never showed concurrent work: {depths}"
    assert all(d >= 1 for d in depths)


def test_burst_after_a_quiet_spell_is_still_batched(cloud_tier, zoo_bundle, cut) -> None:
    """Sequential calls run alone (nothing to wait for); a burst that follows them
    queues and shares runs. (An earlier idle fast path ran lone calls on the event
    loop, which hid such bursts; this test caught it on a loaded CI box.)"""
    part, spec, session, make = cut
    model = zoo_bundle.model_name
    with CloudClient(cloud_tier.address, discover=True) as client:
        for _ in range(80):  # sequential: the replica sees no concurrency
            x = make()
            reply = client.infer(model, {spec.name: x}, partition=part.id)
            assert reply.params["splitgate.batch_size"] == 1
            assert reply.params["splitgate.queue_depth"] == 1
            np.testing.assert_allclose(
                next(iter(reply.outputs.values())), session.run(None, {spec.name: x})[0], rtol=1e-4, atol=1e-5
            )
        inputs = [make(rows=1 + i % 2) for i in range(48)]
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda x: (x, client.infer(model, {spec.name: x}, partition=part.id)), inputs))
    batch_sizes = []
    for x, reply in replies:
        np.testing.assert_allclose(
            next(iter(reply.outputs.values())), session.run(None, {spec.name: x})[0], rtol=1e-4, atol=1e-5
        )
        batch_sizes.append(reply.params["splitgate.batch_size"])
    assert max(batch_sizes) > 2, f"the burst after a quiet spell never shared a run: {batch_sizes}"


def test_client_falls_back_to_proxy_when_an_endpoint_is_gone(cloud_tier, zoo_bundle, cut) -> None:
    part, spec, session, make = cut
    x = make()
    # A port nothing listens on, standing for a replica that just went away.
    with CloudClient(cloud_tier.address, endpoints=["127.0.0.1:1"]) as client:
        reply = client.infer(zoo_bundle.model_name, {spec.name: x}, partition=part.id)
        np.testing.assert_allclose(
            next(iter(reply.outputs.values())), session.run(None, {spec.name: x})[0], rtol=1e-4, atol=1e-5
        )


def _replica_actor_names() -> list[str]:
    import ray

    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and "splitgate-cloud" in a["name"]
    )


def test_killed_replica_is_replaced_and_in_flight_calls_fail_retryably(cloud_tier, zoo_bundle, cut) -> None:
    import ray

    part, spec, _, make = cut
    model = zoo_bundle.model_name
    (victim,) = _replica_actor_names()
    direct = cloud_tier.endpoints[0]
    request = _request(model, {spec.name: make(rows=4)}, partition=part.id)
    stop = threading.Event()
    outcomes: list[tuple[str, str, float]] = []  # (path, status, seconds)

    def load(path: str, address: str) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    stub.ModelInfer(request, timeout=60)
                    status = "OK"
                except grpc.RpcError as exc:
                    status = exc.code().name
                    if status == "INTERNAL":  # the proxy's answer; CloudClient maps it
                        gone = isinstance(_typed(exc), Unavailable)
                        status = "INTERNAL-replica-gone" if gone else f"INTERNAL: {exc.details()}"
                outcomes.append((path, status, time.monotonic() - t0))

    threads = [threading.Thread(target=load, args=(p, a)) for p, a in
               [("direct", direct), ("direct", direct), ("proxy", cloud_tier.address)]]
    for t in threads:
        t.start()
    time.sleep(1.0)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a call hung after the replica was killed"
    failed = [o for o in outcomes if o[1] != "OK"]
    assert failed, "killing the only replica under load failed no call"
    direct_codes = {s for p, s, _ in failed if p == "direct"}
    assert direct_codes <= {"UNAVAILABLE"}, f"direct-ingress calls got {direct_codes}"
    proxy_codes = {s for p, s, _ in failed if p == "proxy"}
    assert proxy_codes <= {"UNAVAILABLE", "INTERNAL-replica-gone"}, f"proxy calls got {proxy_codes}"
    assert max(secs for _, _, secs in failed) < 30, "a failed call waited for its deadline"

    # The controller replaces the replica; the tier answers again, direct and via the proxy.
    deadline = time.monotonic() + 90
    reply = None
    with CloudClient(cloud_tier.address, discover=True, refresh_s=0.5) as client:
        while reply is None:
            names = _replica_actor_names()
            if names and victim not in names and client.refresh_endpoints():
                try:
                    reply = client.infer(model, {spec.name: make()}, partition=part.id, timeout_s=10)
                except Unavailable:
                    pass
            if reply is None and time.monotonic() > deadline:
                pytest.fail(f"no replacement replica serving after 90 s (replicas: {names})")
            time.sleep(0.5)
        assert reply.params["splitgate.partition"] == part.id
        assert client.server_ready()
