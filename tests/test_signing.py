"""Signed plan bundles: ed25519 keys, ``splitgate sign``, and edge and cloud
refusing unsigned, tampered and foreign-signed bundles.

The attacker in these tests can write a bundle: they change a partition's
weights, then recompute every file's sha256 and the ``plan_digest`` with the
project's own functions, so the integrity checks pass (asserted: the positive
control). Only the signature tells the bundle apart. Real onnxruntime, real
Gateway and SuffixService; the integration test starts a real ``splitgate
cloud serve`` (Ray Serve) subprocess.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from splitgate.cli import main as cli_main
from splitgate.cloud._service import SuffixService
from splitgate.edge import Gateway
from splitgate.errors import BundleError, BundleSignatureError, ConfigError
from splitgate.planner import PlanBundle, build_bundle, measure_device, refit_bundle
from splitgate.planner._bundle import MANIFEST, plan_digest, sha256_file
from splitgate.security import TrustedKeys, _signing, generate_signing_key, key_id, sign_bundle, verify_bundle

from _models import save
from test_device_profile import conv_chain_model

SPLITGATE = [sys.executable, "-m", "splitgate"]


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small profiled conv-chain bundle (unsigned) and this machine's device profile of it."""
    d = tmp_path_factory.mktemp("signing")
    model = save(conv_chain_model(channels=8, size=16, depth=3), d / "conv.onnx")
    bundle = build_bundle(model, d / "conv.bundle", encodings=("raw",), repeats=3, warmup=1)
    device = measure_device(bundle.root, repeats=3, warmup=1).save(d / "device.json")
    return {"model": model, "bundle": bundle.root, "device": Path(device)}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Two key pairs: ``trusted`` (the publisher) and ``other`` (someone else)."""
    root = tmp_path_factory.mktemp("keys")
    return {name: generate_signing_key(root / name) for name in ("trusted", "other")}


def _copy(source: dict[str, Path], dest: Path) -> Path:
    shutil.copytree(source["bundle"], dest)
    return dest


@pytest.fixture()
def signed(source: dict[str, Path], keys, tmp_path: Path) -> Path:
    """A copy of the bundle signed by the trusted key."""
    path = _copy(source, tmp_path / "signed.bundle")
    sign_bundle(path, keys["trusted"][0])
    return path


def _trusted(keys) -> TrustedKeys:
    return TrustedKeys.from_paths([keys["trusted"][1]])


def tamper(bundle_dir: Path) -> str:
    """Change weights as an attacker who can write the bundle would, and hide it:
    the first split partition's prefix and suffix (what the edge and the cloud
    run) get different weights; every file sha256 and the plan digest are
    recomputed with the project's own functions. Returns the partition id."""
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    part = next(p for p in manifest["partitions"] if p["kind"] == "split")
    for rel in (part["prefix"], part["suffix"]):
        path = bundle_dir / rel
        model = onnx.load(str(path))
        init = model.graph.initializer[0]
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * -1.0, init.name))
        path.write_bytes(model.SerializeToString())
    manifest["files"] = {rel: sha256_file(bundle_dir / rel) for rel in manifest["files"]}
    manifest["plan_digest"] = plan_digest(manifest)
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return str(part["id"])


@pytest.fixture()
def tampered(signed: Path) -> Path:
    """The signed bundle after :func:`tamper`: integrity intact, signature stale."""
    tamper(signed)
    return signed


# -- unit: keys, sign, verify ---------------------------------------------------------


def test_keys_sign_and_verify(source, keys, tmp_path: Path) -> None:
    private, public = keys["trusted"]
    assert (private.name, public.name) == ("signing.key", "signing.pub")
    assert private.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_signing_key(private.parent)

    bundle = _copy(source, tmp_path / "b")
    manifest_before = (bundle / MANIFEST).read_bytes()
    path = sign_bundle(bundle, private)
    assert path == bundle / "signature.json"
    assert (bundle / MANIFEST).read_bytes() == manifest_before  # detached: the manifest is unchanged
    loaded = PlanBundle.load(bundle)  # signature.json is not a manifest file: the bundle still loads
    assert "signature.json" not in loaded.manifest["files"]

    doc = json.loads(path.read_text())
    trusted = _trusted(keys)
    kid = trusted.ids[0]
    raw = trusted.get(kid).public_bytes_raw()
    assert kid == key_id(trusted.get(kid)) == hashlib.sha256(raw).hexdigest()[:16]
    assert doc["algorithm"] == "ed25519" and doc["key_id"] == kid
    assert doc["plan_digest"] == loaded.plan_digest and doc["model_name"] == loaded.model_name
    assert len(base64.b64decode(doc["signature"])) == 64
    assert verify_bundle(bundle, trusted) == kid
    assert verify_bundle(loaded, trusted) == kid

    # a key set: either key verifies its own signatures; PEMs round-trip (what replicas get)
    both = TrustedKeys.from_paths([keys["trusted"][1], keys["other"][1]])
    assert len(both) == 2 and TrustedKeys.from_pems(both.pems).ids == both.ids
    sign_bundle(bundle, keys["other"][0])  # replaces the signature
    assert verify_bundle(bundle, both) == TrustedKeys.from_paths([keys["other"][1]]).ids[0]


def test_tampered_bundle_passes_integrity_but_not_the_signature(tampered: Path, keys) -> None:
    PlanBundle.load(tampered)  # positive control: every sha256 and the plan digest check out
    with pytest.raises(BundleSignatureError) as err:
        verify_bundle(tampered, _trusted(keys))
    message = str(err.value)
    assert str(tampered) in message and "does not verify" in message and "changed after it was signed" in message
    assert isinstance(err.value, BundleError)


def test_signature_file_problems_are_refused(signed: Path, keys) -> None:
    trusted = _trusted(keys)
    path = signed / "signature.json"
    good = json.loads(path.read_text())
    cases = {
        "unreadable": "{not json",
        "malformed": json.dumps({"algorithm": "ed25519"}),
        "not supported": json.dumps({**good, "algorithm": "rsa"}),
        "does not verify": json.dumps({**good, "signature": "!!not base64!!"}),
    }
    for problem, text in cases.items():
        path.write_text(text)
        with pytest.raises(BundleSignatureError, match=problem):
            verify_bundle(signed, trusted, allow_unsigned=True)  # a bad signature is never "unsigned"


def test_trusted_key_files_are_checked(keys, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        TrustedKeys.from_paths([tmp_path / "missing.pub"])
    with pytest.raises(ConfigError, match="is a private key"):
        TrustedKeys.from_paths([keys["trusted"][0]])
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        TrustedKeys.from_paths([tmp_path / "junk.pub"])
    with pytest.raises(ConfigError, match="that is a public key"):
        sign_bundle(tmp_path, keys["trusted"][1])


# -- the edge: Gateway ---------------------------------------------------------------


def _feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}


def test_gateway_refuses_a_tampered_bundle(tampered: Path, keys) -> None:
    trust = [str(keys["trusted"][1])]
    with pytest.raises(BundleSignatureError, match="does not verify"):
        Gateway([tampered], trust=trust)
    # without trust the attack works: this is what the signature adds
    with Gateway([tampered]) as open_gateway:
        assert "conv" in open_gateway.models and not open_gateway.refused_partitions("conv")


def test_gateway_signature_failure_skips_the_corrupt_partition_fallback(tampered: Path, keys) -> None:
    """A bundle that also fails a file sha256 takes add_bundle's corrupt-partition
    path (load without verify, refuse those partitions); a bad signature must still
    refuse the whole bundle there."""
    manifest = json.loads((tampered / MANIFEST).read_text())
    victim = next(p for p in manifest["partitions"] if p["kind"] == "split" and p["suffix"])
    (tampered / victim["suffix"]).write_bytes(b"corrupt")
    with pytest.raises(BundleError, match="sha256"):
        PlanBundle.load(tampered)
    with pytest.raises(BundleSignatureError, match="does not verify"):
        Gateway([tampered], trust=[str(keys["trusted"][1])])


def test_gateway_update_refuses_a_tampered_version_and_keeps_serving(source, signed: Path, keys,
                                                                      tmp_path: Path) -> None:
    bad = _copy({"bundle": signed}, tmp_path / "v2.bundle")
    tamper(bad)
    with Gateway([signed], trust=[str(keys["trusted"][1])]) as gateway:
        before = gateway.bundle("conv")
        expected = gateway.infer("conv", _feeds(), partition="device").outputs
        with pytest.raises(BundleSignatureError, match="does not verify"):
            gateway.update_bundle(bad)
        with pytest.raises(BundleSignatureError, match="does not verify"):
            gateway.add_bundle(bad)
        assert gateway.bundle("conv") is before
        after = gateway.infer("conv", _feeds(), partition="device").outputs
        np.testing.assert_array_equal(after["y"], expected["y"])
        good = _copy({"bundle": signed}, tmp_path / "v3.bundle")
        assert gateway.update_bundle(good).root == good  # a signed version takes over


def test_unsigned_refused_when_trust_is_set_unless_allowed(source, keys, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    unsigned = _copy(source, tmp_path / "unsigned.bundle")
    trust = [str(keys["trusted"][1])]
    with pytest.raises(BundleSignatureError, match="unsigned") as err:
        Gateway([unsigned], trust=trust)
    assert "splitgate sign" in str(err.value) and str(unsigned) in str(err.value)
    with caplog.at_level(logging.WARNING, logger="splitgate.security"), \
            Gateway([unsigned], trust=trust, allow_unsigned=True) as gateway:
        assert gateway.models == ["conv"]
    assert any("UNSIGNED bundle 'conv'" in r.getMessage() for r in caplog.records)
    # no trust configured: loaded, with one warning per process that nothing is authenticated
    caplog.clear()
    _signing._warned_unchecked.clear()
    with caplog.at_level(logging.WARNING, logger="splitgate.security"):
        for _ in range(2):
            Gateway([unsigned]).close()
    assert sum("not authenticated" in r.getMessage() for r in caplog.records) == 1


def test_wrong_key_refused_even_with_allow_unsigned(source, keys, tmp_path: Path) -> None:
    bundle = _copy(source, tmp_path / "foreign.bundle")
    sign_bundle(bundle, keys["other"][0])
    other_id = TrustedKeys.from_paths([keys["other"][1]]).ids[0]
    with pytest.raises(BundleSignatureError, match=f"signed by key {other_id}, which is not in the trusted set"):
        Gateway([bundle], trust=[str(keys["trusted"][1])], allow_unsigned=True)
    with Gateway([bundle], trust=[str(keys["trusted"][1]), str(keys["other"][1])]) as gateway:
        assert gateway.models == ["conv"]


def test_refit_keeps_the_signature_valid(source, signed: Path, keys) -> None:
    before = PlanBundle.load(signed)
    table = (signed / "decision_table.json").read_bytes()
    after = refit_bundle(signed, source["device"])
    assert after.plan_digest == before.plan_digest
    assert after.manifest["device"]["refit_at"]  # the decision data did change
    assert (signed / "decision_table.json").read_bytes() != table or after.profile != before.profile
    assert verify_bundle(signed, _trusted(keys)) == _trusted(keys).ids[0]
    with Gateway([signed], trust=[str(keys["trusted"][1])]) as gateway:
        assert gateway.infer("conv", _feeds()).outputs["y"].shape == (1, 8)


# -- the cloud: SuffixService and its Ray Serve replica --------------------------------


def test_suffix_service_refuses_a_tampered_bundle(signed: Path, keys, tmp_path: Path) -> None:
    trusted = _trusted(keys)
    bad = _copy({"bundle": signed}, tmp_path / "bad.bundle")
    tamper(bad)
    with pytest.raises(BundleSignatureError, match="does not verify"):
        SuffixService([bad], trusted=trusted)
    service = SuffixService([signed], trusted=trusted)
    digest = service.current("conv")
    with pytest.raises(BundleSignatureError, match="does not verify"):
        service.add_bundle(bad)
    assert service.versions("conv") == [digest]  # nothing changed
    unsigned = _copy({"bundle": signed}, tmp_path / "unsigned.bundle")
    (unsigned / "signature.json").unlink()
    with pytest.raises(BundleSignatureError, match="unsigned"):
        service.add_bundle(unsigned)
    SuffixService([unsigned], trusted=trusted, allow_unsigned=True)
    SuffixService([bad])  # no trust: not checked (the attack the signature stops)


# -- CLI -------------------------------------------------------------------------------


@pytest.fixture()
def no_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """``edge serve`` stops right after it starts (a command that should have
    refused to start then returns 0 instead of serving forever)."""
    import splitgate._signals

    monkeypatch.setattr(splitgate._signals, "wait_for_stop", lambda: None)


def test_cli_keys_sign_and_one_line_errors(source, tmp_path: Path, no_wait,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["keys", "-o", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out
    assert "signing.key" in out and "--trust" in out
    assert cli_main(["keys", "-o", str(tmp_path / "k")]) == 2
    assert capsys.readouterr().err.count("\n") == 1

    bundle = _copy(source, tmp_path / "b.bundle")
    assert cli_main(["sign", str(bundle), "--key", str(tmp_path / "k" / "signing.key")]) == 0
    assert "signed 'conv'" in capsys.readouterr().out
    pub = str(tmp_path / "k" / "signing.pub")
    assert verify_bundle(bundle, TrustedKeys.from_paths([pub]))

    tamper(bundle)
    for argv, problem in (
        (["edge", "serve", str(bundle), "--port", "0", "--insecure", "--trust", pub], "does not verify"),
        (["edge", "serve", str(bundle), "--port", "0", "--insecure", "--trust", str(tmp_path / "no.pub")],
         "cannot read"),
        (["sign", str(tmp_path / "nothing"), "--key", str(tmp_path / "k" / "signing.key")], "not a plan bundle"),
    ):
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("splitgate: error: ") and err.count("\n") == 1 and problem in err, err


def test_cli_allow_unsigned_says_so_loudly(source, keys, tmp_path: Path, no_wait,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """``edge serve --allow-unsigned`` loads an unsigned bundle and prints one
    WARNING line on stderr (the server itself is stopped right away)."""
    unsigned = _copy(source, tmp_path / "unsigned.bundle")
    argv = ["edge", "serve", str(unsigned), "--port", "0", "--insecure", "--trust", str(keys["trusted"][1])]
    assert cli_main(argv) == 2
    assert "unsigned" in capsys.readouterr().err
    assert cli_main([*argv, "--allow-unsigned"]) == 0
    captured = capsys.readouterr()
    assert "edge gateway serving ['conv']" in captured.out
    warnings = [line for line in captured.err.splitlines() if "--allow-unsigned" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "development only" in warnings[0]


# -- integration: the Ray Serve tier -----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_cloud_tier_refuses_tampered_and_serves_signed(source, signed: Path, keys, tmp_path: Path) -> None:
    """Ray Serve: the replica constructor, given the exact arguments the ``serve
    deploy`` builder binds from its ``args`` (``trust`` as in a serve config),
    refuses a tampered bundle; a real ``splitgate cloud serve`` refuses it with
    one line and exit 2, and serves the signed bundle with the same ``--trust``
    (the positive control)."""
    pytest.importorskip("ray")
    from splitgate.cloud.app import build
    from splitgate.edge import CloudClient

    pub = str(keys["trusted"][1])
    bad = _copy({"bundle": signed}, tmp_path / "bad.bundle")
    pid = tamper(bad)

    def replica(bundle: Path):
        deployment = build({"bundles": [str(bundle)], "trust": pub})._bound_deployment
        assert "PUBLIC KEY" in deployment.init_kwargs["trusted_keys"][0]  # the key itself, not its path
        return deployment.func_or_class(*deployment.init_args, **deployment.init_kwargs)

    with pytest.raises(BundleSignatureError, match="does not verify"):
        replica(bad)
    assert replica(signed)._service.models == ["conv"]

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    refused = subprocess.run([*SPLITGATE, "cloud", "serve", str(bad), "--insecure", "--trust", pub,
                              "--port", str(_free_port())], check=False, capture_output=True, text=True,
                             timeout=120, env=env)
    assert refused.returncode == 2, refused.stderr
    lines = [line for line in refused.stderr.splitlines() if line.startswith("splitgate: error:")]
    assert len(lines) == 1 and "does not verify" in lines[0] and str(bad) in lines[0], refused.stderr

    port = _free_port()
    proc = subprocess.Popen([*SPLITGATE, "cloud", "serve", str(signed), "--insecure", "--trust", pub,
                             "--port", str(port), "--no-direct-ingress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        for line in proc.stdout:  # type: ignore[union-attr]
            if "cloud tier serving" in line or time.monotonic() > deadline:
                break
        assert proc.poll() is None, "cloud serve exited"
        bundle = PlanBundle.load(signed)
        feeds = _feeds()
        with CloudClient(f"127.0.0.1:{port}", timeout_s=30) as client:
            reply = client.infer("conv", feeds, partition="cloud", plan_digest=bundle.plan_digest)
        import onnxruntime as ort

        expected = ort.InferenceSession(str(source["model"]), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        np.testing.assert_allclose(reply.outputs["y"], expected, rtol=1e-4, atol=1e-5)
        assert pid  # (the tampered partition existed)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
