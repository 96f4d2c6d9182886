"""TLS, mutual TLS and token auth on every gRPC server splitgate runs (plain
grpcio baseline, edge serve, the Ray Serve tier through its TLS front), over
real TCP with real certificates from ``splitgate certs``."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from splitgate.edge import CloudClient, Gateway
from splitgate.errors import ConfigError, Unauthenticated, Unavailable
from splitgate.protocol import inference_pb2 as pb
from splitgate.protocol import inference_pb2_grpc as pb_grpc
from splitgate.security import (
    TlsConfig,
    TlsFront,
    TokenCheck,
    auth_metadata,
    generate_dev_certs,
    is_loopback,
    open_channel,
    raw_input_leaks,
    secure_server_port,
    token_digest,
)

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {k: str(v) for k, v in generate_dev_certs(tmp_path_factory.mktemp("certs")).items()}


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(generate_dev_certs(tmp_path_factory.mktemp("other"))["ca.pem"])


def _server_tls(certs: dict[str, str], mutual: bool = False) -> TlsConfig:
    return TlsConfig(cert=certs["server.pem"], key=certs["server.key"], ca=certs["ca.pem"], require_client_cert=mutual)


def _client_tls(certs: dict[str, str], with_cert: bool = False, ca: str | None = None) -> TlsConfig:
    return TlsConfig(
        ca=ca or certs["ca.pem"],
        cert=certs["client.pem"] if with_cert else None,
        key=certs["client.key"] if with_cert else None,
    )


def _cut(bundle):
    part = next(p for p in bundle.partitions.values() if p.kind == "split")
    (spec,) = part.cut_tensors
    x = np.random.default_rng(0).standard_normal([1, *spec.shape[1:]]).astype(np.float32)
    return part.id, {spec.name: x}


def test_loopback_rule() -> None:
    assert is_loopback("127.0.0.1:9000") and is_loopback("localhost:1") and is_loopback("[::1]:80")
    assert not is_loopback("10.0.0.5:9000") and not is_loopback("[::]:9000") and not is_loopback("0.0.0.0:1")
    with pytest.raises(ConfigError, match="insecure"):
        open_channel("10.1.2.3:9000")
    open_channel("10.1.2.3:9000", insecure=True).close()
    server = grpc.server(None)  # never started
    with pytest.raises(ConfigError, match="plaintext"):
        secure_server_port(server, "0.0.0.0:0", tls=None)
    with pytest.raises(ConfigError, match="insecure"):
        CloudClient("203.0.113.7:9000")


# What `from splitgate.security import ...` offered before the module became a package.
PUBLIC_NAMES = {
    "TlsConfig", "TokenCheck", "AuthInterceptor", "TlsFront", "AUTH_METADATA_KEY", "auth_metadata",
    "token_digest", "server_credentials", "channel_credentials", "open_channel", "is_loopback",
    "is_local_address", "generate_dev_certs", "add_inference_servicer", "secure_server_port",
    "raw_input_leaks", "malformed_message",
}
# Added with signed bundles (tests/test_signing.py).
SIGNING_NAMES = {"TrustedKeys", "generate_signing_key", "key_id", "sign_bundle", "verify_bundle"}


def test_public_names_and_the_servicer_path_serve_deploy_uses(repo_root: Path) -> None:
    import importlib

    import yaml

    import splitgate.security as security

    assert set(security.__all__) == PUBLIC_NAMES | SIGNING_NAMES
    assert [n for n in sorted(PUBLIC_NAMES) if not hasattr(security, n)] == []
    homes = {getattr(security, n).__module__ for n in PUBLIC_NAMES if callable(getattr(security, n))}
    assert all(home.startswith("splitgate.security._") for home in homes), homes  # defined in private modules
    config = yaml.safe_load((repo_root / "cloud" / "serve_config.yaml").read_text())
    for dotted in config["grpc_options"]["grpc_servicer_functions"]:
        module, _, attr = dotted.rpartition(".")
        assert getattr(importlib.import_module(module), attr) is security.add_inference_servicer, dotted


def test_tokens_are_checked_by_digest_and_refused_with_a_reason() -> None:
    check = TokenCheck(tokens=[TOKEN], digests=[token_digest("other").upper()])
    check.check(auth_metadata(TOKEN))
    check.check([("Authorization", b"bearer other")])  # any case, bytes metadata
    assert TOKEN not in "".join(check.digests)
    for metadata, reason in (((), "missing"), ([("authorization", f"Basic {TOKEN}")], "malformed"),
                             (auth_metadata("wrong"), "bad credentials")):
        with pytest.raises(Unauthenticated, match=reason):
            check.check(metadata)
    with pytest.raises(ConfigError, match="at least one token"):
        TokenCheck()


def test_dev_certs_without_cryptography_name_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "cryptography", None)  # import cryptography -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'splitgate\[security\]'"):
        generate_dev_certs(tmp_path)
    assert not any(tmp_path.iterdir())


def test_raw_input_leaks_finds_verbatim_copies_only() -> None:
    x = np.arange(64, dtype=np.float32).reshape(1, 4, 4, 4)
    tiny = np.zeros(2, dtype=np.float32)  # 8 bytes: too short to mean anything
    cut = {"copy": x.reshape(1, -1), "inside": np.concatenate([x.ravel(), x.ravel() + 1]), "transposed": x.T,
           "other": x * 2, "zeros": np.zeros(8, dtype=np.float32)}
    assert raw_input_leaks({"x": x, "t": tiny}, cut) == ["copy", "inside"]


def test_baseline_tls_mutual_tls_and_tokens(zoo_bundle, certs, other_ca) -> None:
    from splitgate.cloud.baseline import start_baseline

    model = zoo_bundle.model_name
    partition, x = _cut(zoo_bundle)
    with start_baseline([str(zoo_bundle.root)], tls=_server_tls(certs), auth=TokenCheck([TOKEN])) as server:
        address = f"localhost:{server.address.rsplit(':', 1)[1]}"
        with CloudClient(address, tls=_client_tls(certs), token=TOKEN) as ok:
            assert ok.infer(model, x, partition=partition).outputs
        for token, needle in ((None, "missing credentials"), ("wrong", "bad credentials")):
            with CloudClient(address, tls=_client_tls(certs), token=token) as client:
                with pytest.raises(Unauthenticated, match=needle):
                    client.infer(model, x, partition=partition)
                with pytest.raises(Unauthenticated):
                    client.server_live()
        # A server the client's CA did not sign, and a plaintext client: no channel at all.
        with CloudClient(address, tls=_client_tls(certs, ca=other_ca), token=TOKEN, timeout_s=5) as client:
            with pytest.raises(Unavailable):
                client.server_live()
        with CloudClient(address, token=TOKEN, timeout_s=5) as client:
            with pytest.raises(Unavailable):
                client.server_live()
    # Mutual TLS: only clients with a certificate from the CA get in.
    with start_baseline([str(zoo_bundle.root)], tls=_server_tls(certs, mutual=True)) as server:
        with CloudClient(server.address, tls=_client_tls(certs, with_cert=True)) as client:
            assert client.infer(model, x, partition=partition).outputs
        with CloudClient(server.address, tls=_client_tls(certs), timeout_s=5) as client:
            with pytest.raises(Unavailable):
                client.server_live()


def test_edge_serve_tls_and_token(zoo_bundle, certs) -> None:
    from splitgate.edge._serve import serve_edge

    model = zoo_bundle.model_name
    (spec,) = zoo_bundle.inputs
    request = pb.ModelInferRequest(model_name=model)
    from splitgate import codec

    codec.add_inputs(request, {spec.name: np.zeros([1, *spec.shape[1:]], np.float32)})
    with Gateway([zoo_bundle]) as gw:
        server, port, _ = serve_edge(gw, port=0, tls=_server_tls(certs), auth=TokenCheck([TOKEN]))
        try:
            with open_channel(f"localhost:{port}", tls=_client_tls(certs)) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                reply = stub.ModelInfer(request, timeout=30, metadata=auth_metadata(TOKEN))
                assert reply.outputs[0].name == zoo_bundle.outputs[0].name
                for md in ((), auth_metadata("nope"), (("authorization", "Basic abc"),)):
                    with pytest.raises(grpc.RpcError) as info:
                        stub.ModelInfer(request, timeout=30, metadata=md)
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            server.stop(0).wait()


def test_cli_requires_tls_or_explicit_insecure(zoo_bundle, tmp_path: Path) -> None:
    from splitgate.cli import main

    assert main(["certs", "-o", str(tmp_path / "c"), "--host", "localhost"]) == 0
    assert {p.name for p in (tmp_path / "c").iterdir()} == {
        "ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key"
    }
    assert (tmp_path / "c" / "server.key").stat().st_mode & 0o077 == 0
    assert main(["edge", "serve", str(zoo_bundle.root), "--port", "0"]) == 2
    assert main(["cloud", "serve", str(zoo_bundle.root)]) == 2


@pytest.mark.integration
def test_ray_tier_token_auth_and_tls_front(cloud_tier, zoo_bundle, certs) -> None:
    """A second Serve app with token auth on the shared Serve instance, its
    replica's direct-ingress port behind a TLS front; removed afterwards."""
    from dataclasses import replace

    from ray import serve

    from splitgate.cloud import build_app
    from splitgate.cloud._discovery import direct_grpc_endpoints_sync
    from splitgate.cloud._local import _wait_ready

    config = replace(cloud_tier.config, app_name="splitgate-sec", auth_tokens=[TOKEN], tls={"cert": "x"})
    model = zoo_bundle.model_name
    partition, x = _cut(zoo_bundle)
    serve.run(build_app(config), name=config.app_name, route_prefix="/sec")
    try:
        import time

        deadline = time.monotonic() + 60
        while not (endpoints := direct_grpc_endpoints_sync(config.app_name)):
            assert time.monotonic() < deadline, "the auth app's replica never published a port"
            time.sleep(0.5)
        _wait_ready(endpoints[0], [model], 60, token=TOKEN)
        with TlsFront(endpoints[0], _server_tls(certs)) as front:
            address = f"localhost:{front.port}"
            with CloudClient(address, tls=_client_tls(certs), token=TOKEN) as client:
                reply = client.infer(model, x, partition=partition)
                assert reply.params["splitgate.partition"] == partition
                assert not client.refresh_endpoints(), "behind TLS the plaintext replica ports are not advertised"
            for token in (None, "wrong"):
                with CloudClient(address, tls=_client_tls(certs), token=token) as client:
                    with pytest.raises(Unauthenticated):
                        client.infer(model, x, partition=partition)
            with CloudClient(address, timeout_s=5, token=TOKEN) as plain:  # plaintext into the TLS port
                with pytest.raises(Unavailable):
                    plain.server_live()
        # Token auth holds on the plaintext replica port too.
        with grpc.insecure_channel(endpoints[0]) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        serve.delete(config.app_name)
