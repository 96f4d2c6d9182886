"""Bundle references (cloud/_fetch.py) and execution providers of cloud replicas.

Bundles are fetched from a real loopback HTTP server, a local archive, and
fsspec's in-memory filesystem; archives are made with the real ``tar`` as the
docs say (``tar czf b.tar.gz -C BUNDLE .``). No Ray here: the multi-node test
(tests/test_multinode.py) fetches through Ray Serve replicas.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _models import dynamic_batch_model, save
from splitgate.cloud import CloudConfig
from splitgate.cloud._fetch import (
    CACHE_ENV,
    default_cache_dir,
    is_uri,
    resolve_bundle,
    resolve_bundles,
)
from splitgate.cloud.config import execution_providers
from splitgate.planner import PlanBundle, build_bundle

from splitgate.errors import BundleError, BundleSignatureError, ConfigError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> PlanBundle:
    d = tmp_path_factory.mktemp("uri")
    model = save(dynamic_batch_model(), d / "dynconv.onnx")
    return build_bundle(model, d / "dyn.bundle", model_name="dyn", candidates="chain", profile=False)


def _tar(bundle_dir: Path, out: Path, *, top: bool = False) -> Path:
    """``tar czf out -C bundle_dir .`` (or, with ``top``, the directory itself)."""
    if top:
        subprocess.run(["tar", "czf", str(out), "-C", str(bundle_dir.parent), bundle_dir.name], check=True)
    else:
        subprocess.run(["tar", "czf", str(out), "-C", str(bundle_dir), "."], check=True)
    return out


class _Files(http.server.SimpleHTTPRequestHandler):
    hits: list[str]

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        super().do_GET()


@pytest.fixture()
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """A loopback HTTP server over a directory: (base URL, directory, paths requested)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = type("Handler", (_Files,), {"hits": []})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a, **k: handler(*a, directory=str(root), **k)
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root, handler.hits
    finally:
        server.shutdown()
        server.server_close()


def test_local_directory_is_used_in_place(bundle: PlanBundle, tmp_path: Path) -> None:
    assert resolve_bundle(bundle.root, cache_dir=tmp_path / "cache") == bundle.root.absolute()
    assert resolve_bundle(f"file://{bundle.root}", cache_dir=tmp_path / "cache") == bundle.root.absolute()
    assert not (tmp_path / "cache").exists(), "nothing to fetch, nothing cached"
    assert not is_uri(str(bundle.root)) and not is_uri("file:///x") and is_uri("https://h/b.tar.gz")


def test_http_archive_is_fetched_verified_and_reused(bundle: PlanBundle, tmp_path: Path, http_root) -> None:
    base, www, hits = http_root
    _tar(bundle.root, www / "dyn.tar.gz")
    cache = tmp_path / "cache"
    got = resolve_bundle(f"{base}/dyn.tar.gz", cache_dir=cache)
    assert got.parent == cache and PlanBundle.load(got).plan_digest == bundle.plan_digest
    assert hits == ["/dyn.tar.gz"]
    assert [p.name for p in cache.iterdir()] == [got.name], "no temporary left behind"
    # A restart reuses the verified copy without asking the server again ...
    (www / "dyn.tar.gz").unlink()
    assert resolve_bundle(f"{base}/dyn.tar.gz", cache_dir=cache) == got
    assert hits == ["/dyn.tar.gz"]
    # ... unless the copy was damaged: then it is fetched again (here: gone, so a clear error).
    suffix = next(got.glob("partitions/*/suffix.onnx"))
    suffix.write_bytes(suffix.read_bytes() + b"x")
    with pytest.raises(BundleError, match="HTTP 404"):
        resolve_bundle(f"{base}/dyn.tar.gz", cache_dir=cache)
    assert not got.exists(), "a damaged cached copy is dropped"


def test_archive_of_the_directory_itself_and_pinned_digest(bundle: PlanBundle, tmp_path: Path, http_root) -> None:
    base, www, _ = http_root
    archive = _tar(bundle.root, www / "top.tgz", top=True)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    got = resolve_bundle(f"{base}/top.tgz#sha256={digest}", cache_dir=tmp_path / "c1")
    assert PlanBundle.load(got).plan_digest == bundle.plan_digest
    with pytest.raises(BundleError, match="differs from the pinned"):
        resolve_bundle(f"{base}/top.tgz#sha256={'0' * 64}", cache_dir=tmp_path / "c2")
    with pytest.raises(BundleError, match="sha256=<64 hex>"):
        resolve_bundle(f"{base}/top.tgz#md5=abc", cache_dir=tmp_path / "c3")
    assert [p.name for p in (tmp_path / "c2").iterdir()] == []


def test_local_archive_file(bundle: PlanBundle, tmp_path: Path) -> None:
    archive = _tar(bundle.root, tmp_path / "dyn.tar.gz")
    got = resolve_bundle(archive, cache_dir=tmp_path / "cache")
    assert got.parent == tmp_path / "cache" and PlanBundle.load(got).model_name == "dyn"


def test_tampered_archive_is_refused_and_not_cached(bundle: PlanBundle, tmp_path: Path, http_root) -> None:
    base, www, _ = http_root
    copy = tmp_path / "copy"
    shutil.copytree(bundle.root, copy)
    suffix = next(copy.glob("partitions/*/suffix.onnx"))
    suffix.write_bytes(suffix.read_bytes()[:-8] + b"\0" * 8)
    _tar(copy, www / "bad.tar.gz")
    cache = tmp_path / "cache"
    with pytest.raises(BundleError, match="sha256 mismatch") as info:
        resolve_bundle(f"{base}/bad.tar.gz", cache_dir=cache)
    assert f"{base}/bad.tar.gz" in str(info.value)
    assert list(cache.iterdir()) == []


def test_unsafe_or_wrong_archives_are_refused(bundle: PlanBundle, tmp_path: Path, http_root) -> None:
    base, www, _ = http_root
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        tar.add(bundle.root / "manifest.json", arcname="manifest.json")
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    (www / "evil.tar.gz").write_bytes(evil.getvalue())
    (www / "plain.tar.gz").write_bytes(b"not a tarball")
    empty = io.BytesIO()
    with tarfile.open(fileobj=empty, mode="w:gz") as tar:
        info = tarfile.TarInfo("readme.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    (www / "empty.tar.gz").write_bytes(empty.getvalue())
    cache = tmp_path / "cache"
    with pytest.raises(BundleError, match="escapes the bundle directory"):
        resolve_bundle(f"{base}/evil.tar.gz", cache_dir=cache)
    assert not (tmp_path / "escaped.txt").exists() and not (cache / "escaped.txt").exists()
    with pytest.raises(BundleError, match="tar czf b.tar.gz -C BUNDLE"):
        resolve_bundle(f"{base}/plain.tar.gz", cache_dir=cache)
    with pytest.raises(BundleError, match="no manifest.json"):
        resolve_bundle(f"{base}/empty.tar.gz", cache_dir=cache)
    with pytest.raises(BundleError, match="HTTP 404"):
        resolve_bundle(f"{base}/missing.tar.gz", cache_dir=cache)
    with pytest.raises(BundleError, match="cannot fetch"):
        resolve_bundle("http://127.0.0.1:9/b.tar.gz", cache_dir=cache, timeout_s=5)
    assert list(cache.iterdir()) == []


def test_fsspec_directory_and_archive(bundle: PlanBundle, tmp_path: Path) -> None:
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    fs.put(str(bundle.root), "/store/dyn.bundle", recursive=True)
    fs.pipe("/store/dyn.tar.gz", _tar(bundle.root, tmp_path / "dyn.tar.gz").read_bytes())
    try:
        dirs = resolve_bundles(["memory://store/dyn.bundle", "memory://store/dyn.tar.gz"], cache_dir=tmp_path / "c")
        assert len(set(dirs)) == 2
        assert {PlanBundle.load(d).plan_digest for d in dirs} == {bundle.plan_digest}
        with pytest.raises(BundleError, match="neither a bundle directory"):
            resolve_bundle("memory://store/nothing-here", cache_dir=tmp_path / "c")
    finally:
        fs.rm("/store", recursive=True)
    with pytest.raises(ConfigError, match="nosuchproto"):
        resolve_bundle("nosuchproto://bucket/b.tar.gz", cache_dir=tmp_path / "c")


def test_fsspec_missing_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fsspec", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="pip install fsspec"):
        resolve_bundle("s3://bucket/b.tar.gz", cache_dir=tmp_path / "c")


def test_signature_checked_before_caching(bundle: PlanBundle, tmp_path: Path, http_root) -> None:
    pytest.importorskip("cryptography")
    from splitgate.security import TrustedKeys, generate_signing_key, sign_bundle

    base, www, _ = http_root
    _, pub = generate_signing_key(tmp_path / "keys")
    trusted = TrustedKeys.from_paths([pub])
    _tar(bundle.root, www / "unsigned.tar.gz")
    with pytest.raises(BundleSignatureError, match="unsigned"):
        resolve_bundle(f"{base}/unsigned.tar.gz", cache_dir=tmp_path / "c", trusted=trusted)
    assert list((tmp_path / "c").iterdir()) == []
    assert resolve_bundle(
        f"{base}/unsigned.tar.gz", cache_dir=tmp_path / "c", trusted=trusted, allow_unsigned=True
    ).is_dir()
    signed = tmp_path / "signed"
    shutil.copytree(bundle.root, signed)
    sign_bundle(signed, tmp_path / "keys" / "signing.key")
    _tar(signed, www / "signed.tar.gz")
    got = resolve_bundle(f"{base}/signed.tar.gz", cache_dir=tmp_path / "c", trusted=trusted)
    assert (got / "signature.json").is_file()


def test_default_cache_dir_follows_the_node_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "node-cache"))
    assert default_cache_dir() == tmp_path / "node-cache"
    monkeypatch.delenv(CACHE_ENV)
    assert default_cache_dir() == Path.home() / ".cache" / "splitgate" / "bundles"


# -- execution providers --------------------------------------------------------


def test_providers_auto_resolve_to_what_the_node_has() -> None:
    import onnxruntime as ort

    here = execution_providers([])
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert here == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        assert here == ["CPUExecutionProvider"]
    assert execution_providers(["auto"], ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"
    ]
    assert execution_providers([], ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert execution_providers(["cuda"], ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"
    ]
    assert execution_providers(["CPU"]) == ["CPUExecutionProvider"]


def test_unknown_or_absent_provider_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown onnxruntime execution provider 'CUDAProvider'"):
        execution_providers(["CUDAProvider"])
    with pytest.raises(ConfigError, match="not available in this node's onnxruntime"):
        execution_providers(["TensorrtExecutionProvider"], ["CPUExecutionProvider"])
    # names only (the driver, deploying to other nodes): a known provider passes
    assert execution_providers(["tensorrt"], []) == ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    config = CloudConfig.from_dict({"providers": "cuda, cpu", "gpus_per_replica": 0.5})
    assert config.providers == ["cuda", "cpu"] and config.gpus_per_replica == 0.5


def test_suffix_sessions_run_on_the_resolved_providers(bundle: PlanBundle) -> None:
    from splitgate.cloud import SuffixService

    service = SuffixService([bundle.root], providers=execution_providers([]))
    assert service.providers_used == []
    part = next(p for p in bundle.partitions.values() if p.suffix_path is not None and p.kind == "split")
    (spec,) = part.cut_tensors
    feeds = {spec.name: np.zeros([1, *spec.shape[1:]], dtype=np.float32)}
    (out,) = service.run((bundle.model_name, part.id, bundle.plan_digest), ("y",), feeds)
    assert out.shape == (1, 5)
    assert service.providers_used[0] == execution_providers([])[0] == "CPUExecutionProvider"


@pytest.mark.integration  # imports Ray Serve (no cluster started)
def test_deployment_options_and_cli_refuse_unknown_providers(bundle: PlanBundle, capsys) -> None:
    pytest.importorskip("ray")
    from splitgate.cloud import build_app

    from splitgate.cli import main

    deployment = build_app(CloudConfig(
        bundles=["https://h/b.tar.gz"], gpus_per_replica=0.5, max_replicas_per_node=1, providers=["cuda"],
        bundle_cache="/var/cache/sg",
    ))._bound_deployment
    assert deployment.ray_actor_options == {"num_cpus": 0, "num_gpus": 0.5}
    assert deployment._replica_config.max_replicas_per_node == 1
    # URIs and the requested providers reach the replicas as given: each resolves them on its node.
    assert deployment.init_args[0] == ["https://h/b.tar.gz"]
    assert deployment.init_kwargs["providers"] == ["cuda"] and deployment.init_kwargs["bundle_cache"] == "/var/cache/sg"
    with pytest.raises(ConfigError, match="unknown onnxruntime execution provider 'nope'"):
        build_app(CloudConfig(bundles=[str(bundle.root)], providers=["nope"]))
    with pytest.raises(ConfigError, match="gpus_per_replica"):
        build_app(CloudConfig(bundles=[str(bundle.root)], gpus_per_replica=-1))
    assert main(["cloud", "serve", str(bundle.root), "--providers", "cpu,nope", "--insecure"]) == 2
    assert "unknown onnxruntime execution provider 'nope'" in capsys.readouterr().err
