"""Fault injection against the real stack (short runs of
``benchmarks/bench_faults.py``), bundle integrity and model updates, and the
privacy floor checked on the bytes that cross the link.

Faults on the shared ``cloud_tier`` are undone before each test returns:
a killed replica is waited for until Serve has replaced it and it serves,
a deleted app is redeployed and answers again."""

from __future__ import annotations

import json
import re
import shutil
import socket
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from splitgate.edge import Gateway
from splitgate.errors import BundleError, FailedPrecondition

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_faults  # noqa: E402

N = 24  # requests per scenario here; the benchmark runs hundreds


@pytest.fixture(scope="module")
def stale_bundle(zoo_model, tmp_path_factory):
    """Another plan of the same model (same name, other partitions: a different plan digest;
    a profile alone would not differ, the digest leaves out the decision data)."""
    from splitgate.planner import build_bundle

    return build_bundle(zoo_model, tmp_path_factory.mktemp("stale") / "mobilenet.bundle", profile=False,
                        candidates="chain")


@pytest.fixture(scope="module")
def work(zoo_bundle):
    return bench_faults.Workload(zoo_bundle)


def _check(tally: bench_faults.Tally) -> None:
    assert tally.sent == N, tally
    assert tally.wrong == 0 and tally.lost == 0, tally
    assert tally.failed == 0 and tally.answered == N, tally


# -- integrity and model updates (no Ray) -------------------------------------------


def _copy(bundle, dest: Path) -> Path:
    shutil.copytree(bundle.root, dest)
    return dest


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampered_or_truncated_bundle_refused_with_clear_error(zoo_bundle, tmp_path: Path) -> None:
    from splitgate.cloud._service import SuffixService
    from splitgate.planner import PlanBundle

    part = next(p for p in zoo_bundle.partitions.values() if p.kind == "split")
    rel = part.suffix_path.relative_to(zoo_bundle.root)
    tampered = _copy(zoo_bundle, tmp_path / "tampered")
    _flip(tampered / rel)
    truncated = _copy(zoo_bundle, tmp_path / "truncated")
    (truncated / rel).write_bytes((truncated / rel).read_bytes()[:100])
    for root in (tampered, truncated):
        with pytest.raises(BundleError, match=str(rel).replace("/", ".")):
            PlanBundle.load(root)
        with pytest.raises(BundleError, match="sha256"):
            SuffixService([root])
    # A file changed on disk *after* loading is refused when its session is built, never run.
    later = _copy(zoo_bundle, tmp_path / "later")
    service = SuffixService([later])
    _flip(later / rel)
    from splitgate import codec
    from splitgate.protocol import inference_pb2 as pb

    (spec,) = part.cut_tensors
    request = pb.ModelInferRequest(model_name=zoo_bundle.model_name)
    codec.set_params(request.parameters, {"splitgate.partition": part.id})
    codec.add_inputs(request, {spec.name: np.zeros([1, *spec.shape[1:]], np.float32)})
    with pytest.raises(BundleError, match="changed on disk") as info:
        service.model_infer(request)
    assert info.value.code.name == "FAILED_PRECONDITION"


def _resign(root: Path, rel: str) -> None:
    """Update the manifest for a changed file, so integrity passes (a bad build, not tampering)."""
    import hashlib

    from splitgate.planner._bundle import plan_digest

    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"][rel] = hashlib.sha256((root / rel).read_bytes()).hexdigest()
    manifest["plan_digest"] = plan_digest(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_cloud_serves_versions_by_digest_switches_and_rolls_back(zoo_bundle, stale_bundle, tmp_path: Path) -> None:
    from splitgate.cloud._service import SuffixService

    service = SuffixService([zoo_bundle.root])
    v1, v2 = zoo_bundle.plan_digest, stale_bundle.plan_digest
    service.add_bundle(stale_bundle.root)  # smoke-tested, then current
    assert service.versions(zoo_bundle.model_name) == [v1, v2] and service.current("mobilenet") == v2
    assert service.bundle("mobilenet", v1) is not service.bundle("mobilenet", v2)
    with pytest.raises(FailedPrecondition, match="differs from the served plan"):
        service.bundle("mobilenet", "0" * 64)
    service.activate("mobilenet", v1)  # roll back
    assert service.current("mobilenet") == v1
    # A version that is whole (sha256 fine) but does not run is refused; v1 stays current.
    broken = _copy(zoo_bundle, tmp_path / "broken")
    (broken / "model.onnx").write_bytes(b"not an onnx model")
    _resign(broken, "model.onnx")
    with pytest.raises(BundleError, match="version not activated.*cannot load model.onnx"):
        service.add_bundle(broken)
    assert service.current("mobilenet") == v1 and len(service.versions("mobilenet")) == 2


def test_gateway_update_bundle_is_atomic_and_rolls_back(zoo_bundle, stale_bundle, tmp_path: Path, work) -> None:
    with Gateway([zoo_bundle]) as gw:
        gw.update_bundle(stale_bundle.root)
        assert gw.bundle("mobilenet").plan_digest == stale_bundle.plan_digest
        assert work.correct(0, gw.infer("mobilenet", work.inputs[0]).outputs)
        gw.rollback_bundle("mobilenet")
        assert gw.bundle("mobilenet").plan_digest == zoo_bundle.plan_digest
        broken = _copy(zoo_bundle, tmp_path / "broken")
        (broken / "model.onnx").write_bytes(b"not an onnx model")
        _resign(broken, "model.onnx")
        stop = threading.Event()
        answers: list[bool] = []

        def load() -> None:
            while not stop.is_set():
                answers.append(work.correct(1, gw.infer("mobilenet", work.inputs[1]).outputs))

        t = threading.Thread(target=load)
        t.start()
        try:
            with pytest.raises(BundleError, match="smoke inference"):
                gw.update_bundle(broken)
            tampered = _copy(zoo_bundle, tmp_path / "tampered")
            _flip(tampered / "model.onnx")
            with pytest.raises(BundleError, match="sha256"):
                gw.update_bundle(tampered)
        finally:
            stop.set()
            t.join(30)
        assert gw.bundle("mobilenet").plan_digest == zoo_bundle.plan_digest
        assert answers and all(answers), "requests during refused updates were answered by the old version"


# -- faults on the real stack ---------------------------------------------------------



@pytest.mark.integration
def test_stale_plan_falls_back_locally_never_wrong(cloud_tier, zoo_bundle, stale_bundle, work) -> None:
    tally = bench_faults.stale_plan(cloud_tier, zoo_bundle, work, N, stale_bundle)
    _check(tally)
    assert tally.by_cloud == 0
    assert set(tally.fallbacks) <= {"failed_precondition", "cloud-refused"}, tally.fallbacks
    # a refusal backs this model off the cloud: not a round trip per request
    assert tally.fallbacks.get("cloud-refused", 0) > tally.fallbacks.get("failed_precondition", 0), tally.fallbacks


@pytest.mark.integration
@pytest.mark.parametrize("scenario", ["link_drop", "link_stall", "slow_cloud"])
def test_link_faults_lose_nothing(cloud_tier, zoo_bundle, work, scenario) -> None:
    tally = getattr(bench_faults, scenario)(cloud_tier, zoo_bundle, work, N)
    _check(tally)
    assert tally.fallbacks, f"{scenario}: the fault changed nothing: {tally}"


@pytest.mark.integration
def test_bundle_corrupt_on_disk_loses_nothing(cloud_tier, zoo_bundle, work, tmp_path) -> None:
    tally = bench_faults.bundle_corrupt(cloud_tier, zoo_bundle, work, N, tmp_path)
    _check(tally)
    assert "refused: True" in tally.note and "bundle-corrupt" in tally.fallbacks, tally


@pytest.mark.integration
def test_replica_killed_under_load_loses_nothing(cloud_tier, zoo_bundle, work) -> None:
    tally = bench_faults.replica_kill(cloud_tier, zoo_bundle, work, N)  # waits for the replacement
    _check(tally)


@pytest.mark.integration
def test_cloud_restart_loses_nothing(cloud_tier, zoo_bundle, work) -> None:
    tally = bench_faults.cloud_restart(cloud_tier, zoo_bundle, work, N)  # redeploys and waits
    _check(tally)
    # After the redeploy the edge goes back to the cloud (the breaker closes again);
    # the first of the 8 later requests may still find it half-open.
    later = re.search(r"(\d+)/8 later requests answered by the cloud", tally.note)
    assert later is not None, tally.note
    assert int(later.group(1)) >= 1, f"no request after the restart reached the cloud: {tally.note}"


# -- privacy: what crosses the link ---------------------------------------------------


class _Recorder:
    """A TCP relay that keeps every byte sent upstream (edge -> cloud)."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.up = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._upstream)
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    with self._lock:
                        self.up += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def saw(self, raw: bytes, window: int = 512) -> bool:
        """True when any window of ``raw`` crossed (frames may split the whole)."""
        with self._lock:
            data = bytes(self.up)
        return any(raw[i : i + window] in data for i in range(0, len(raw) - window, window))

    def close(self) -> None:
        self._listener.close()


@pytest.mark.integration
def test_private_requests_never_send_raw_inputs(cloud_tier, zoo_bundle, work) -> None:
    (name,) = zoo_bundle.inputs[0].name,
    x = work.inputs[3]
    raw = x[name].tobytes()
    rec = _Recorder(cloud_tier.address)
    try:
        with Gateway([zoo_bundle], cloud=rec.address, private_models=["mobilenet"]) as gw:
            for _ in range(5):  # the policy's choice, and a forced split: cut tensors only
                assert work.correct(3, gw.infer("mobilenet", x).outputs)
                r = gw.infer("mobilenet", x, partition=work.cut)
                assert work.correct(3, r.outputs) and r.trace.bytes_sent > 0
            with pytest.raises(Exception, match="private"):
                gw.infer("mobilenet", x, partition="cloud")
        assert len(rec.up) > 0 and not rec.saw(raw), "raw input bytes crossed the link for a private model"
        # Positive control: the same detector sees a non-private cloud request's input.
        with Gateway([zoo_bundle], cloud=rec.address) as gw:
            gw.infer("mobilenet", x, partition="cloud")
        assert rec.saw(raw)
    finally:
        rec.close()


def test_private_cut_that_copies_the_input_stays_on_device() -> None:
    from splitgate.security import raw_input_leaks

    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert raw_input_leaks({"x": x}, {"flat": x.reshape(1, -1)}) == ["flat"]
    assert raw_input_leaks({"x": x}, {"h": np.tanh(x)}) == []


def test_a_candidate_the_cloud_does_not_serve_leaves_the_stable_version_on_the_cloud(zoo_bundle, stale_bundle) -> None:
    """A rollout's candidate whose plan the tier does not serve is refused (FAILED_PRECONDITION)
    and finishes locally; the refusal backs off that plan alone, so the stable version's
    requests keep reaching the cloud."""
    import numpy as np

    from splitgate.cloud.baseline import start_baseline
    from splitgate.edge import Gateway

    (spec,) = zoo_bundle.inputs
    x = {spec.name: np.random.default_rng(3).standard_normal([d if d >= 0 else 1 for d in spec.shape]).astype(
        np.float32)}
    with start_baseline([str(zoo_bundle.root)]) as server, Gateway([zoo_bundle], cloud=server.address) as gw:
        gw.stage_candidate("mobilenet", stale_bundle.root, share=0.5)
        traces = [gw.infer("mobilenet", x, partition="cloud", caller=f"user-{i}").trace for i in range(40)]
    stable = [t for t in traces if t.version == zoo_bundle.plan_digest[:12]]
    candidate = [t for t in traces if t.version == stale_bundle.plan_digest[:12]]
    assert stable and candidate, [t.version for t in traces]
    assert all(t.fallback is None and t.cloud_ms > 0 for t in stable), [t.fallback for t in stable]
    assert all(t.fallback in ("failed_precondition", "cloud-refused") for t in candidate), [
        t.fallback for t in candidate]
