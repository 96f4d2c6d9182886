"""The cloud tier on a real two-node Ray cluster on this host, bundles by URI.

Two ``ray start`` nodes (head at 127.0.0.1, worker at 127.0.0.2: two loopback
addresses, so each node's replica advertises its own endpoint), joined with
Ray's token auth as docs/cloud.md says, each with its own bundle cache.
``splitgate cloud serve --ray-address`` deploys two replicas (one per node)
of a bundle given only as an HTTP URL of its ``.tar.gz`` (served by a loopback
http.server; the bundle directory is deleted before the cluster starts), so
every node fetches it itself. A real edge Gateway sends split requests to the
replicas' direct endpoints while the worker node is killed (its whole process
group: raylet, workers, the replica): no app request fails; requests caught by
the kill fall back to the device and are counted.

Every Ray process runs under its own ``--temp-dir`` and ports chosen free, so
nothing here is found by, or finds, another Ray on the host.
"""

from __future__ import annotations

import http.server
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from _models import dynamic_batch_model, save

from splitgate.protocol import inference_pb2 as pb
from splitgate.protocol import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

HEAD_IP, WORKER_IP = "127.0.0.3", "127.0.0.2"  # (Ray rewrites 127.0.0.1 to the host address)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


class _Node:
    """One ``ray start --block`` process (its own session: killed as a group)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [_ray_bin(), "start", "--block", "--disable-usage-stats", *args],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL the node at once, as if its machine died: the ``ray start``
        process group (GCS, raylet, agents) and every process below it (Ray
        starts workers, the replica among them, in sessions of their own)."""
        victims = _descendants(self.proc.pid)
        self.names = [_name(pid) for pid in victims]
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self.victims = victims


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _wait_nodes(address: str, count: int, env: dict[str, str], nodes: list[_Node], timeout_s: float = 60) -> None:
    """Wait until ``ray status`` shows ``count`` alive nodes."""
    deadline = time.monotonic() + timeout_s
    out = ""
    while time.monotonic() < deadline:
        for node in nodes:
            if node.proc.poll() is not None:
                raise AssertionError(f"ray start exited: {node.log.read_text()[-3000:]}")
        result = subprocess.run([_ray_bin(), "status", f"--address={address}"], env=env, check=False,
                                capture_output=True, text=True, timeout=60)
        out = result.stdout + result.stderr
        if out.count(" node_") >= count:
            return
        time.sleep(1.0)
    raise AssertionError(f"cluster did not reach {count} nodes: {out[-2000:]}")


@pytest.fixture()
def bundle_url(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """(URL of the bundle's .tar.gz on a loopback HTTP server, paths requested)."""
    from splitgate.planner import build_bundle

    model = save(dynamic_batch_model(), tmp_path / "dynconv.onnx")
    bundle = build_bundle(model, tmp_path / "dyn.bundle", model_name="dyn", candidates="chain", profile=False)
    www = tmp_path / "www"
    www.mkdir()
    subprocess.run(["tar", "czf", str(www / "dyn.tar.gz"), "-C", str(bundle.root), "."], check=True)
    shutil.rmtree(bundle.root)  # from here on the bundle exists only behind the URL
    hits: list[str] = []

    class Files(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            hits.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a, **k: Files(*a, directory=str(www), **k))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dyn.tar.gz", hits
    finally:
        server.shutdown()
        server.server_close()


def _metadata(address: str) -> pb.ServerMetadataResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(pb.ServerMetadataRequest(), timeout=10)


def _extension(meta: pb.ServerMetadataResponse, prefix: str) -> list[str]:
    for e in meta.extensions:
        if e.startswith(prefix):
            return [v for v in e[len(prefix):].split(",") if v]
    return []


def test_two_node_cluster_serves_a_bundle_by_url_and_survives_losing_a_node(
    tmp_path: Path, bundle_url: tuple[str, list[str]]
) -> None:
    from splitgate.cloud import CloudConfig
    from splitgate.cloud._app import PROVIDERS_EXTENSION
    from splitgate.cloud._local import _free_port_block, ray_env

    from splitgate.contract import ENDPOINTS_EXTENSION

    url, hits = bundle_url
    grpc_port = _free_port()
    config = CloudConfig(
        bundles=[url], grpc_port=grpc_port, num_replicas=2, max_replicas_per_node=1,
        direct_ingress_port=_free_port_block(), max_batch_size=4,
    )
    # Token auth as on a real cluster: RAY_AUTH_MODE=token and the same token on every node.
    token = tmp_path / "ray_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(ray_env(config), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    # On one host both replicas' direct-ingress servers share one port (SO_REUSEPORT:
    # the kernel picks a replica per connection), so the proxy must spread the load
    # for the worker's replica to be sure to get some: no preference for the proxy's node.
    base["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] = "0"
    # Access-log lines reach the file at once (not 1000 at a time): the killed node's count them.
    base["RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE"] = "1"
    caches = {"head": tmp_path / "cache-head", "worker": tmp_path / "cache-worker", "driver": tmp_path / "cache-driver"}
    gcs = f"{HEAD_IP}:{_free_port()}"
    common = ["--num-cpus=1", "--object-store-memory=80000000"]
    nodes: list[_Node] = []
    cli = None
    # Ray's unix sockets live under --temp-dir: pytest's tmp_path is too long for them (107 bytes).
    short = Path(tempfile.mkdtemp(prefix="sgray-", dir="/tmp"))
    try:
        nodes.append(_Node(
            ["--head", f"--port={gcs.split(':')[1]}", f"--node-ip-address={HEAD_IP}", *common, "--include-dashboard=false",
             f"--temp-dir={short / 'h'}", f"--ray-client-server-port={_free_port()}",
             f"--dashboard-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}"],
            {**base, "SPLITGATE_BUNDLE_CACHE": str(caches["head"])}, tmp_path / "head.log",
        ))
        _wait_nodes(gcs, 1, base, nodes)
        nodes.append(_Node(
            [f"--address={gcs}", f"--node-ip-address={WORKER_IP}", *common,
             f"--temp-dir={short / 'w'}", f"--dashboard-agent-listen-port={_free_port()}"],
            {**base, "SPLITGATE_BUNDLE_CACHE": str(caches["worker"])}, tmp_path / "worker.log",
        ))
        _wait_nodes(gcs, 2, base, nodes)

        (tmp_path / "cloud.toml").write_text(
            # access_log: each replica logs its requests, so the worker's log shows it served some
            "[cloud]\nnum_replicas = 2\nmax_replicas_per_node = 1\nmax_batch_size = 4\naccess_log = true\n"
            f"direct_ingress_port = {config.direct_ingress_port}\n"
        )
        with open(tmp_path / "cli.log", "wb") as out:
            cli = subprocess.Popen(
                [sys.executable, "-m", "splitgate", "cloud", "serve", url, "--ray-address", gcs,
                 "--port", str(grpc_port), "--insecure", "--config", str(tmp_path / "cloud.toml")],
                env={**base, "SPLITGATE_BUNDLE_CACHE": str(caches["driver"])},
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        proxy = f"127.0.0.1:{grpc_port}"
        deadline = time.monotonic() + 120
        endpoints: list[str] = []
        while time.monotonic() < deadline and len(endpoints) < 2:
            assert cli.poll() is None, (tmp_path / "cli.log").read_text()[-3000:]
            try:
                meta = _metadata(proxy)
                endpoints = _extension(meta, ENDPOINTS_EXTENSION)
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        # One replica per node, each advertising its own direct endpoint.
        assert sorted(e.rsplit(":", 1)[0] for e in endpoints) == sorted([HEAD_IP, WORKER_IP]), (
            endpoints, (tmp_path / "cli.log").read_text()[-3000:])
        for endpoint in endpoints:
            assert _extension(_metadata(endpoint), PROVIDERS_EXTENSION)[0] == "CPUExecutionProvider"
        # Every node fetched the bundle itself from the URL, into its own cache.
        for where in ("head", "worker", "driver"):
            (entry,) = [p for p in caches[where].iterdir() if not p.name.startswith(".")]
            assert (entry / "manifest.json").is_file(), where
        assert len(hits) >= 3, hits
        # Each replica says, once, which execution provider its sessions run on and what it fetched.
        for temp in (short / "h", short / "w"):
            lines = {line for path in temp.glob("session_latest/logs/serve/replica_*.log")
                     for line in path.read_text(errors="replace").splitlines() if "splitgate replica:" in line}
            assert len(lines) == 1, lines
            assert "run on ['CPUExecutionProvider'] (requested auto)" in lines.pop()

        _load_and_kill_worker(caches["driver"], proxy, nodes[1], short / "w")
    finally:
        if cli is not None:
            try:
                os.killpg(cli.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            cli.wait(timeout=30)
        for node in reversed(nodes):
            node.kill()
        shutil.rmtree(short, ignore_errors=True)


def _replica_requests(temp_dir: Path) -> int:
    """Requests answered by the replicas under one node's temp dir (distinct
    request ids in Serve's access-log lines, "... <request id> -- CALL splitgate OK 1.4ms")."""
    ids = set()
    for path in temp_dir.glob("session_latest/logs/serve/replica_*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if " -- CALL " in line and " OK " in line:
                ids.add(line.split(" -- CALL ", 1)[0].rsplit(" ", 1)[-1])
    return len(ids)


def _load_and_kill_worker(driver_cache: Path, proxy: str, worker: _Node, worker_temp: Path) -> None:
    """Edge load (one Gateway on the replicas' direct endpoints, one through the
    proxy) while the worker node is killed: no app request may fail."""
    from splitgate.edge import Gateway
    from splitgate.planner import PlanBundle

    (entry,) = [p for p in driver_cache.iterdir() if not p.name.startswith(".")]
    bundle = PlanBundle.load(entry)
    split = next(p.id for p in bundle.partitions.values() if p.kind == "split")
    results: list[tuple[float, object]] = []
    errors: list[str] = []
    stop = threading.Event()

    def load(gw: Gateway, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            x = rng.standard_normal((1, 2, 8, 8)).astype(np.float32)
            try:
                results.append((time.monotonic(), gw.infer("dyn", {"x": x}, partition=split)))
            except Exception as exc:  # noqa: BLE001 - counted, the assert says what failed
                errors.append(f"{type(exc).__name__}: {exc}")

    settings = {"breaker_failures": 5, "breaker_reset_s": 1.0}
    with Gateway([bundle], cloud=proxy, cloud_discover=True, **settings) as direct, \
            Gateway([bundle], cloud=proxy, cloud_discover=False, **settings) as proxied:
        threads = [threading.Thread(target=load, args=(gw, i)) for i, gw in enumerate([direct, proxied])]
        for t in threads:
            t.start()
        time.sleep(4.0)
        killed_at = time.monotonic()
        worker.kill()
        time.sleep(6.0)
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "an app request hung after the node was killed"
    assert not errors, f"{len(errors)} app requests failed: {errors[:3]}"
    alive = [pid for pid in worker.victims if Path(f"/proc/{pid}").exists()
             and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive and any("ServeReplica" in n for n in worker.names), "the worker node is not gone"
    served_by_worker = _replica_requests(worker_temp)  # all of them before the kill: it is dead since
    assert served_by_worker > 0, "the worker node's replica served nothing before it was killed"
    before = [r for t, r in results if t < killed_at]
    after = [r for t, r in results if t >= killed_at]
    cloud_after = [r for r in after if r.trace.fallback is None]
    fallbacks = [r.trace.fallback for r in after if r.trace.fallback is not None]
    print(f"\nbefore the kill: {len(before)} requests (worker replica served {served_by_worker}); after: "
          f"{len(after)}, {len(cloud_after)} answered by the cloud, {len(fallbacks)} fell back {sorted(set(fallbacks))}")
    assert len(before) > 10 and cloud_after, "the surviving node's replica answered nothing after the kill"
    assert all(r.trace.partition == split for r in cloud_after)
