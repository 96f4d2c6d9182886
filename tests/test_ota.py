"""Over-the-air updates (issue 17 item 2): a real HTTP server on 127.0.0.1 serves an
update index and archives, and can cut a transfer mid-body, serve wrong bytes, or
honour / ignore Range. The Gateway answers requests from a thread the whole time."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from splitgate.edge import Gateway, UpdateOutcome, publish
from splitgate.edge._update_fetch import unpack_archive
from splitgate.edge._update_index import INDEX_NAME, read_index, sign_index, write_archive
from splitgate.edge._updates import Updater
from splitgate.errors import BundleError, ConfigError

MODEL = "mobilenet"


# -- a static server with faults --------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ArchiveServer

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        srv = self.server
        path = (srv.root / self.path.lstrip("/")).resolve()
        if srv.root.resolve() not in path.parents or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        archive = path.suffix == ".gz"
        wanted = self.headers.get("Range")
        start = 0
        if archive and wanted and srv.honour_range:
            start = int(wanted.removeprefix("bytes=").split("-")[0])
        body = data[start:]
        mode = srv.mode if archive else "ok"
        if mode == "corrupt":
            body = bytes(b ^ 0x5A for b in body)
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        sent = body[: srv.cut_after] if mode == "cut" else body
        self.wfile.write(sent)
        self.wfile.flush()
        if archive:
            srv.requests.append({"path": self.path, "range": wanted, "status": 206 if start else 200,
                                 "sent": len(sent)})
        if mode == "cut":
            self.close_connection = True  # the rest never comes


class ArchiveServer(ThreadingHTTPServer):
    """Serves ``root``; ``mode``: "ok", "cut" (stop after ``cut_after`` body bytes and
    close) or "corrupt" (every byte flipped); ``honour_range``: answer Range with 206."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.mode = "ok"
        self.cut_after = 0
        self.honour_range = True
        self.requests: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


@pytest.fixture
def server(tmp_path: Path):
    site = tmp_path / "site"
    site.mkdir()
    srv = ArchiveServer(site)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


# -- two versions of one model, signed ----------------------------------------------------


@pytest.fixture(scope="module")
def versions(zoo_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """(keys dir, v1 bundle, v2 bundle): the seeded mobilenet and a re-seeded one
    (other weights: other outputs and plan digest), both signed."""
    from splitgate.planner import build_bundle
    from splitgate.planner.zoo import export_zoo_model
    from splitgate.security import generate_signing_key, sign_bundle

    root = tmp_path_factory.mktemp("ota")
    other = export_zoo_model("mobilenet", root / "mobilenet_seed1.onnx", seed=1)
    v1 = build_bundle(zoo_model, root / "v1", model_name=MODEL, profile=False)
    v2 = build_bundle(other, root / "v2", model_name=MODEL, profile=False)
    assert v1.plan_digest != v2.plan_digest
    private, public = generate_signing_key(root / "keys")
    for b in (v1, v2):
        sign_bundle(b.root, private)
    return public, v1, v2


def _expected(bundle) -> tuple[dict, np.ndarray]:
    import onnxruntime as ort

    feeds = {"input": np.random.default_rng(7).random((1, 3, 64, 64), dtype=np.float32)}
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    return feeds, session.run(None, feeds)[0]


class Load:
    """Requests from a thread the whole time; each answer is sorted by the version it matches."""

    def __init__(self, gw: Gateway, v1, v2) -> None:
        self.gw = gw
        self.feeds, self.want1 = _expected(v1)
        _, self.want2 = _expected(v2)
        assert not np.allclose(self.want1, self.want2, atol=1e-4)
        self.answers: list[str] = []
        self.versions: list[str] = []  # Trace.version of each answer: the plan digest that answered, 12 hex
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                result = self.gw.infer(MODEL, self.feeds)
            except BaseException as exc:  # noqa: BLE001 - counted, asserted on
                self.failures.append(exc)
                continue
            out = next(iter(result.outputs.values()))
            self.versions.append(result.trace.version)
            if np.allclose(out, self.want1, rtol=1e-4, atol=1e-5):
                self.answers.append("v1")
            elif np.allclose(out, self.want2, rtol=1e-4, atol=1e-5):
                self.answers.append("v2")
            else:
                self.answers.append("wrong")

    def start(self) -> Load:
        self._thread.start()
        return self

    def wait_answers(self, n: int, timeout_s: float = 30.0) -> None:
        """Wait until ``n`` more answers arrived (the load ran across the step)."""
        goal, end = len(self.answers) + n, time.monotonic() + timeout_s
        while len(self.answers) < goal and time.monotonic() < end:
            time.sleep(0.01)
        assert len(self.answers) >= goal, "the load thread stalled"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def _tamper(bundle_root: Path, dest: Path) -> Path:
    """A copy with one weight changed, its file digest and plan_digest recomputed
    with the project's own functions (what an attacker with write access can do);
    the signature file is left as it was."""
    from splitgate.planner._bundle import plan_digest

    shutil.copytree(bundle_root, dest)
    model = onnx.load(str(dest / "model.onnx"))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    array = numpy_helper.to_array(init).copy()
    array.flat[0] += 1.0
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, str(dest / "model.onnx"))
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = hashlib.sha256((dest / "model.onnx").read_bytes()).hexdigest()
    manifest["plan_digest"] = plan_digest(manifest)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def _append(site: Path, bundle_root: Path, version: str, key: Path | None = None) -> dict:
    """Publish a bundle as a careless (or hostile) publisher would: archive and index
    entry written by hand, no verification (the index re-signed with ``key``, if given)."""
    manifest = json.loads((bundle_root / "manifest.json").read_text())
    rel = f"{MODEL}/{MODEL}-{version}.tar.gz"
    sha, size = write_archive(bundle_root, site / rel)
    doc = json.loads((site / INDEX_NAME).read_text())
    entry = {"version": version, "plan_digest": manifest["plan_digest"], "archive": rel, "sha256": sha, "size": size}
    doc["models"][MODEL].append(entry)
    (site / INDEX_NAME).write_text(json.dumps(doc))
    if key is not None:
        sign_index(site, key)
    return entry


def _counts(gw: Gateway) -> dict[str, float]:
    return {
        k.split("outcome=")[1].rstrip("}"): v for k, v in gw.metrics.snapshot().items()
        if k.startswith("splitgate_updates_total{") and f"model={MODEL}" in k
    }


# -- the sequence ----------------------------------------------------------------------


def test_interrupted_corrupt_tampered_then_good_update_with_no_failed_request(
    versions, server: ArchiveServer, tmp_path: Path,
) -> None:
    public, v1, v2 = versions
    site, stage, key = server.root, tmp_path / "stage", public.with_name("signing.key")
    [published] = publish([v2.root], site, version="v2", key=key)
    size = published.size
    seen: list[UpdateOutcome] = []
    gw = Gateway([v1.root], trust=[str(public)], update_source=server.url, update_dir=str(stage),
                 update_interval_s=0)  # checks on demand only: the test drives them
    gw.on_update(seen.append)
    load = Load(gw, v1, v2).start()
    try:
        load.wait_answers(3)

        # 1. the transfer is cut a third of the way: the partial file stays for a resume
        server.mode, server.cut_after = "cut", size // 3
        [out] = gw.check_updates()
        assert out.outcome == "interrupted", out
        part = stage / "downloads" / f"{published.sha256}.part"
        kept = part.stat().st_size
        assert 0 < kept <= size // 3 and out.fetched_bytes == kept and out.resumed_from == 0
        load.wait_answers(3)

        # 2. the rest arrives with wrong bytes: resumed from where it stopped, refused by sha256, dropped
        server.mode = "corrupt"
        [out] = gw.check_updates()
        assert out.outcome == "corrupt" and "sha256" in out.detail, out
        assert server.requests[-1]["range"] == f"bytes={kept}-" and server.requests[-1]["status"] == 206
        assert server.requests[-1]["sent"] == size - kept and out.resumed_from == kept
        assert not part.exists()
        load.wait_answers(3)

        # 3. a tampered bundle (changed weight, file digests and plan digest recomputed)
        #    arrives whole and intact: refused by its signature; not fetched again
        server.mode = "ok"
        _append(site, _tamper(v2.root, tmp_path / "tampered"), "v3-tampered", key)
        [out] = gw.check_updates()
        assert out.outcome == "refused" and "signature" in out.detail, out
        fetched = len(server.requests)
        [out] = gw.check_updates()
        assert out.outcome == "skipped" and len(server.requests) == fetched, out
        assert gw.bundle(MODEL).plan_digest == v1.plan_digest
        assert not [p for p in (stage / MODEL).iterdir()], "a refused version is not kept"
        load.wait_answers(3)
        assert set(load.answers) == {"v1"} and not load.failures

        # 4. the good version again (republished: newest), cut once more, then resumed: only the rest is fetched
        publish([v2.root], site, version="v2", key=key)
        server.mode = "cut"
        [out] = gw.check_updates()
        assert out.outcome == "interrupted"
        kept = part.stat().st_size
        server.mode = "ok"
        [out] = gw.check_updates()
        assert out.outcome == "updated", out
        assert server.requests[-1]["range"] == f"bytes={kept}-" and server.requests[-1]["status"] == 206
        assert server.requests[-1]["sent"] == size - kept
        assert (out.resumed_from, out.fetched_bytes) == (kept, size - kept)
        assert gw.bundle(MODEL).plan_digest == v2.plan_digest
        load.wait_answers(5)
        [out] = gw.check_updates()
        assert out.outcome == "current"
    finally:
        load.stop()
        gw.close()

    assert not load.failures, load.failures[:3]
    assert "wrong" not in load.answers
    first_new = load.answers.index("v2")
    assert set(load.answers[:first_new]) == {"v1"} and set(load.answers[first_new:]) == {"v2"}
    assert set(load.versions[:first_new]) == {v1.plan_digest[:12]}  # the responses name the plan that answered
    assert set(load.versions[first_new:]) == {v2.plan_digest[:12]}
    assert len(load.answers) - first_new >= 5, "the new version answered"
    assert [o.outcome for o in seen] == [
        "interrupted", "corrupt", "refused", "skipped", "interrupted", "updated", "current",
    ]
    assert _counts(gw) == {"interrupted": 2, "corrupt": 1, "refused": 1, "skipped": 1, "updated": 1, "current": 1}
    # only the serving version is staged (the previous one is the app's own directory); no partial file left
    assert [p.name for p in (stage / MODEL).iterdir()] == [f"v2-{v2.plan_digest[:12]}"]
    assert list((stage / "downloads").iterdir()) == []


def test_unsigned_or_unpromised_bundle_refused_and_app_rollback_is_respected(
    versions, server: ArchiveServer, tmp_path: Path,
) -> None:
    public, v1, v2 = versions
    site, key = server.root, public.with_name("signing.key")
    unsigned = shutil.copytree(v2.root, tmp_path / "unsigned")
    (unsigned / "signature.json").unlink()
    publish([unsigned], site, version="v2-unsigned", key=key)
    with Gateway([v1.root], trust=[str(public)], update_source=server.url, update_dir=str(tmp_path / "stage"),
                 update_interval_s=0) as gw:
        [out] = gw.check_updates()
        assert out.outcome == "refused" and "unsigned" in out.detail.lower(), out
        # an index entry whose archive holds another plan than it names
        doc = json.loads((site / INDEX_NAME).read_text())
        doc["models"][MODEL].append({**doc["models"][MODEL][-1], "version": "liar", "plan_digest": "ab" * 32})
        (site / INDEX_NAME).write_text(json.dumps(doc))
        sign_index(site, key)
        [out] = gw.check_updates()
        assert out.outcome == "skipped", out  # same archive (sha256) as the refused one
        # the signed version installs; the app rolls it back; the next check does not reinstall it
        publish([v2.root], site, version="v2", key=key)
        assert [o.outcome for o in gw.check_updates()] == ["updated"]
        gw.rollback_bundle(MODEL)
        [out] = gw.check_updates()
        assert out.outcome == "declined" and gw.bundle(MODEL).plan_digest == v1.plan_digest, out
        assert gw.infer(MODEL, _expected(v1)[0]).outputs


def test_archive_holding_another_plan_than_the_index_names_is_refused(versions, tmp_path: Path) -> None:
    _, v1, v2 = versions
    site = tmp_path / "site"
    publish([v2.root], site, version="v2")
    doc = json.loads((site / INDEX_NAME).read_text())
    doc["models"][MODEL][-1]["plan_digest"] = "ab" * 32
    (site / INDEX_NAME).write_text(json.dumps(doc))
    with Gateway([v1.root], update_source=str(site), update_dir=str(tmp_path / "stage"), update_interval_s=0) as gw:
        [out] = gw.check_updates()
        assert out.outcome == "refused" and "the index promised" in out.detail, out
        assert gw.bundle(MODEL).plan_digest == v1.plan_digest


def test_server_ignoring_range_restarts_the_download(versions, server: ArchiveServer, tmp_path: Path) -> None:
    _, v1, v2 = versions
    [published] = publish([v2.root], server.root, version="v2")
    with Gateway([v1.root], update_source=server.url.rstrip("/") + "/" + INDEX_NAME,
                 update_dir=str(tmp_path / "stage"), update_interval_s=0) as gw:
        server.mode, server.cut_after = "cut", published.size // 2
        assert gw.check_updates()[0].outcome == "interrupted"
        server.mode, server.honour_range = "ok", False
        [out] = gw.check_updates()
        assert out.outcome == "updated" and out.resumed_from == 0 and out.fetched_bytes == published.size, out
        assert server.requests[-1]["status"] == 200 and server.requests[-1]["sent"] == published.size


def test_poller_installs_from_a_directory_source_and_keeps_current_and_previous(versions, tmp_path: Path) -> None:
    _, v1, v2 = versions
    site, stage = tmp_path / "site", tmp_path / "stage"
    publish([v2.root], site, version="v2")
    with Gateway([v1.root], update_source=str(site), update_dir=str(stage), update_interval_s=0.1) as gw:
        _wait(lambda: gw.bundle(MODEL).plan_digest == v2.plan_digest)
        publish([v1.root], site, version="v1")  # the publisher sends the fleet back: a version the edge never staged
        _wait(lambda: gw.bundle(MODEL).plan_digest == v1.plan_digest)
        staged_v1 = gw.bundle(MODEL).root
        assert staged_v1.parent == stage / MODEL
        publish([v2.root], site, version="v2")
        _wait(lambda: gw.bundle(MODEL).plan_digest == v2.plan_digest)
        # staged: the serving v2 and the previous v1; the first v2 directory is gone
        _wait(lambda: sorted(p.name for p in (stage / MODEL).iterdir()) == sorted(
            [gw.bundle(MODEL).root.name, staged_v1.name]))
        assert gw.bundle(MODEL).root.name != f"v2-{v2.plan_digest[:12]}"  # (a path is never reused)
        assert _counts(gw)["updated"] == 3


def _wait(condition, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


# -- the parts on their own -------------------------------------------------------------------------


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize("members, problem", [
    ([_file("manifest.json"), _link("model.onnx", "/etc/passwd")], "is a link"),
    ([_file("manifest.json"), _link("model.onnx", "manifest.json")], "is a link"),
    ([_file("manifest.json"), _link("model.onnx", "manifest.json", tarfile.LNKTYPE)], "is a link"),
    ([_file("../escape.txt")], "escapes the bundle"),
    ([_file("/abs/escape.txt")], "escapes the bundle"),
    ([_file("a/../../escape.txt")], "escapes the bundle"),
    ([_file("manifest.json", b"x" * 5000)], "over the 1000 byte limit"),
])
def test_unpack_refuses_links_traversal_and_oversize(tmp_path: Path, members, problem: str) -> None:
    archive = _tar(tmp_path / "a.tar.gz", members)
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(BundleError, match=problem):
        unpack_archive(archive, dest, max_bytes=1000)
    assert not (tmp_path / "escape.txt").exists() and not Path("/abs/escape.txt").exists()


def test_unpack_refuses_garbage_and_accepts_tar_made_archives(tmp_path: Path, versions) -> None:
    garbage = tmp_path / "g.tar.gz"
    garbage.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(BundleError, match="not a readable .tar.gz"):
        unpack_archive(garbage, tmp_path, max_bytes=10)
    # `tar czf b.tar.gz -C BUNDLE .` (members "./manifest.json", ...) and a bundle folder inside
    _, v1, _ = versions
    for arcname in (".", "mobilenet.bundle"):
        archive = tmp_path / f"{arcname.strip('.') or 'dot'}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(v1.root, arcname=arcname)
        dest = tmp_path / f"out-{archive.stem}"
        dest.mkdir()
        root = unpack_archive(archive, dest, max_bytes=1 << 30)
        from splitgate.planner import PlanBundle

        assert PlanBundle.load(root).plan_digest == v1.plan_digest


def test_publish_writes_a_reproducible_index_and_refuses_a_reused_label(versions, tmp_path: Path) -> None:
    _, v1, v2 = versions
    site = tmp_path / "site"
    [a] = publish([v1.root], site, version="1.0")
    [again] = publish([v1.root], site, version="1.0")
    assert again == a and hashlib.sha256((site / a.archive).read_bytes()).hexdigest() == a.sha256
    index = read_index((site / INDEX_NAME).read_bytes())
    assert [e.version for e in index[MODEL]] == ["1.0"]
    with pytest.raises(ConfigError, match="already published"):
        publish([v2.root], site, version="1.0")
    [b] = publish([v2.root], site)
    assert b.version == v2.plan_digest[:12]
    assert [e.plan_digest for e in read_index((site / INDEX_NAME).read_bytes())[MODEL]] == [
        v1.plan_digest, v2.plan_digest]
    broken = shutil.copytree(v1.root, tmp_path / "broken")
    (broken / "model.onnx").write_bytes(b"changed")
    with pytest.raises(BundleError, match="sha256"):
        publish([broken], site)


@pytest.mark.parametrize("doc, problem", [
    (b"not json", "not a JSON update index"),
    (b'{"format": "other"}', "is not 'splitgate-updates/1'"),
    (json.dumps({"format": "splitgate-updates/1", "models": {"m": [{"version": "1"}]}}).encode(), "missing"),
    (json.dumps({"format": "splitgate-updates/1", "models": {"m": [
        {"version": "1", "plan_digest": "a" * 64, "archive": "../x.tar.gz", "sha256": "b" * 64, "size": 3}]}}).encode(),
     "relative path"),
    (json.dumps({"format": "splitgate-updates/1", "models": {"m": [
        {"version": "1", "plan_digest": "a" * 64, "archive": "http://evil/x", "sha256": "b" * 64, "size": 3}]}}).encode(),
     "relative path"),
    (json.dumps({"format": "splitgate-updates/1", "models": {"m": [
        {"version": "1", "plan_digest": "a" * 64, "archive": "x", "sha256": "b" * 64, "size": -1}]}}).encode(),
     "positive integer"),
])
def test_read_index_names_the_problem(doc: bytes, problem: str) -> None:
    with pytest.raises(BundleError, match=problem):
        read_index(doc)


def test_unreachable_or_invalid_source_is_an_outcome_not_an_exception(versions, tmp_path: Path) -> None:
    _, v1, _ = versions
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Gateway([v1.root], update_source=f"http://127.0.0.1:{port}/", update_dir=str(tmp_path / "s"),
                 update_interval_s=0) as gw:
        [out] = gw.check_updates()
        assert (out.model, out.outcome) == ("", "unavailable") and f"127.0.0.1:{port}" in out.detail
        assert gw.metrics.snapshot()["splitgate_updates_total{model=,outcome=unavailable}"] == 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / INDEX_NAME).write_text("{}")
    with Gateway([v1.root], update_source=str(tmp_path / "bad"), update_dir=str(tmp_path / "s"),
                 update_interval_s=0) as gw:
        assert gw.check_updates()[0].outcome == "invalid-index"


def test_bad_update_settings_are_config_errors(versions, tmp_path: Path) -> None:
    _, v1, _ = versions
    with pytest.raises(ConfigError, match="ftp://"):
        Gateway([v1.root], update_source="ftp://example.org/updates")
    with pytest.raises(ConfigError, match="update_interval_s"):
        Gateway([v1.root], update_source=str(tmp_path), update_interval_s=-1)
    with Gateway([v1.root]) as gw, pytest.raises(ConfigError, match="no update source"):
        gw.check_updates()


class _FakeGateway:
    """Just what an Updater calls (unit tests of the updater alone)."""

    models = [MODEL]

    def __init__(self, current) -> None:
        self.current = current

    def bundle(self, model):
        return self.current

    def update_bundle(self, source, *, smoke=True):
        from splitgate.planner import PlanBundle

        self.current = PlanBundle.load(source)
        return self.current


def test_closing_interrupts_a_download_and_it_resumes_after(versions, tmp_path: Path) -> None:
    _, v1, v2 = versions
    site = tmp_path / "site"
    [entry] = publish([v2.root], site)
    gateway = _FakeGateway(v1)
    updater = Updater(gateway, str(site), update_dir=tmp_path / "stage", interval_s=0)
    part = tmp_path / "stage" / "downloads" / f"{entry.sha256}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes((site / entry.archive).read_bytes()[:1000])
    updater.stop()  # (what Gateway.close does)
    [out] = updater.check()
    assert out.outcome == "interrupted" and "closing" in out.detail and part.stat().st_size == 1000, out
    updater.start()
    [out] = updater.check()
    assert out.outcome == "updated" and (out.resumed_from, out.fetched_bytes) == (1000, entry.size - 1000), out
    assert gateway.current.plan_digest == v2.plan_digest


def test_updater_serialises_checks(versions, tmp_path: Path) -> None:
    """The poller and an on-demand check never run at once (one download per file)."""
    _, v1, v2 = versions
    site = tmp_path / "site"
    publish([v2.root], site)

    class Slow:
        models = [MODEL]
        active = 0
        most = 0

        def bundle(self, model):
            return v1

        def update_bundle(self, source, *, smoke=True):
            Slow.active += 1
            Slow.most = max(Slow.most, Slow.active)
            time.sleep(0.2)
            Slow.active -= 1
            from splitgate.planner import PlanBundle

            return PlanBundle.load(source)

    updater = Updater(Slow(), str(site), update_dir=tmp_path / "stage", interval_s=0)
    threads = [threading.Thread(target=updater.check) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert Slow.most == 1


def test_cli_publish_then_edge_serve_flags(versions, tmp_path: Path, capsys) -> None:
    from splitgate.cli import build_parser, main

    _, v1, v2 = versions
    assert main(["publish", str(v1.root), str(v2.root), "--to", str(tmp_path / "site"), "--version", "2026.11"]) == 2
    assert "already published" in capsys.readouterr().err  # one label, two plans of one model
    assert main(["publish", str(v2.root), "--to", str(tmp_path / "site"), "--version", "2026.11"]) == 0
    out = capsys.readouterr().out
    assert "mobilenet" in out and "2026.11" in out and v2.plan_digest[:12] in out
    index = read_index((tmp_path / "site" / INDEX_NAME).read_bytes())
    assert index[MODEL][-1].plan_digest == v2.plan_digest
    args = build_parser().parse_args(["edge", "serve", str(v1.root), "--insecure", "--update-source",
                                      str(tmp_path / "site"), "--update-interval", "30", "--update-dir", "x"])
    assert (args.update_source, args.update_interval, args.update_dir) == (str(tmp_path / "site"), 30.0, "x")
