"""Locust load test of the splitgate cloud tier over OIP gRPC.

Each simulated user is one edge device with its own gRPC connection, replaying
recorded split traffic (real prefix outputs, see :mod:`splitgate.loadtests._traffic`)
to ``GRPCInferenceService/ModelInfer``. A client interceptor times every call
and fires locust's ``request`` event with ``request_type="grpc"`` and
``name="MODEL/PARTITION"``, so the statistics show each partition.

Run it through ``splitgate loadtest`` / ``python -m splitgate.loadtests`` (which start a
tier, record traffic and write the reports), or directly::

    locust -f loadtests/locustfile.py --headless -u 8 -r 4 -t 60s \\
        --host 127.0.0.1:9000 --bundles mobilenet.bundle --mix "cut-3:3,cloud:1"

Options (also as environment variables ``SPLITGATE_LT_<NAME>``): ``--bundles``
(comma-separated bundle dirs) and ``--mix``, or ``--traffic`` (a file written
by the runner); ``--batch``, ``--samples``, ``--seed``, ``--wait-ms`` (think
time between a user's requests; 0 = closed loop), ``--call-timeout``,
``--direct`` (spread users over the replicas' direct-ingress endpoints).
"""

from __future__ import annotations

# grpc's sync client blocks the whole process under gevent unless grpc is told
# to cooperate; this must run before any channel is created.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import ipaddress  # noqa: E402
import itertools  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
from locust import User, events, task  # noqa: E402
from locust.env import Environment  # noqa: E402

from splitgate.loadtests._traffic import Traffic, load_traffic, parse_mix, record_traffic  # noqa: E402
from splitgate.protocol import inference_pb2 as pb  # noqa: E402
from splitgate.protocol import inference_pb2_grpc as pb_grpc  # noqa: E402
from splitgate import contract  # noqa: E402

__all__ = ["SplitTrafficUser", "LocustInterceptor", "GrpcStatusError"]

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_ENV = "SPLITGATE_LT_"


class GrpcStatusError(Exception):
    """A failed call, as locust reports it: ``STATUS: details`` (groups well in the error table)."""


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Time each unary call and fire locust's ``request`` event for it.

    The request name is ``MODEL/PARTITION`` for ``ModelInfer`` (read from the
    request itself) and the method name for the other RPCs.
    """

    def __init__(self, environment: Environment) -> None:
        self.env = environment

    @staticmethod
    def request_name(method: str, request: Any) -> str:
        if isinstance(request, pb.ModelInferRequest):
            param = request.parameters.get(contract.PARTITION)
            partition = param.string_param if param is not None else "cloud"
            return f"{request.model_name}/{partition}"
        return method.rsplit("/", 1)[-1]

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        name = self.request_name(client_call_details.method, request)
        exception: Exception | None = None
        length = 0
        start = time.perf_counter()
        call = continuation(client_call_details, request)
        try:
            response = call.result()
            length = response.ByteSize()
            if isinstance(response, pb.ModelInferResponse) and (
                not response.outputs or len(response.raw_output_contents) != len(response.outputs)
            ):
                exception = GrpcStatusError("OK but malformed: response has no (raw) outputs")
        except grpc.RpcError as exc:
            code = exc.code()
            exception = GrpcStatusError(f"{code.name if code else 'UNKNOWN'}: {exc.details()}")
        elapsed_ms = (time.perf_counter() - start) * 1e3
        self.env.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=elapsed_ms,
            response_length=length,
            exception=exception,
            context={},
        )
        return call


# -- options ---------------------------------------------------------------


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    group = parser.add_argument_group("splitgate", "split traffic for the cloud tier")
    group.add_argument("--bundles", default="", env_var=_ENV + "BUNDLES",
                       help="comma-separated plan bundle directories to record traffic from")
    group.add_argument("--mix", default="", env_var=_ENV + "MIX",
                       help='partition weights, e.g. "cut-3:3,cloud:1" (default: cloud + first/middle/last cut)')
    group.add_argument("--traffic", default="", env_var=_ENV + "TRAFFIC",
                       help="recorded traffic file (.npz) from the runner; overrides --bundles/--mix")
    group.add_argument("--batch", type=int, default=1, env_var=_ENV + "BATCH", help="samples per request")
    group.add_argument("--samples", type=int, default=4, env_var=_ENV + "SAMPLES",
                       help="distinct recorded requests per partition")
    group.add_argument("--seed", type=int, default=0, env_var=_ENV + "SEED", help="seed of inputs and task choice")
    group.add_argument("--wait-ms", type=float, default=0.0, env_var=_ENV + "WAIT_MS",
                       help="think time between a user's requests (0 = closed loop)")
    group.add_argument("--call-timeout", type=float, default=10.0, env_var=_ENV + "CALL_TIMEOUT",
                       help="per-call gRPC deadline in seconds")
    group.add_argument("--direct", action="store_true", default=False, env_var=_ENV + "DIRECT",
                       help="call the replicas' direct-ingress endpoints (discovered from ServerMetadata "
                            "extension splitgate.endpoints=...), user i pinned to endpoint i mod n; "
                            "default: every call goes through --host (the Serve proxy)")
    # Step-load shape (loadtests/stepload.py); harmless for a plain run.
    group.add_argument("--step-users", type=int, default=1, env_var=_ENV + "STEP_USERS", help="users added per step")
    group.add_argument("--step-time", type=float, default=10.0, env_var=_ENV + "STEP_TIME", help="seconds per step")
    group.add_argument("--step-max-users", type=int, default=32, env_var=_ENV + "STEP_MAX_USERS",
                       help="stop stepping at this many users")
    group.add_argument("--p99-target-ms", type=float, default=100.0, env_var=_ENV + "P99_TARGET_MS",
                       help="stop once a step's p99 exceeds this")
    group.add_argument("--step-result", default="", env_var=_ENV + "STEP_RESULT",
                       help="write the step-load result (JSON) here")


_traffic: list[Traffic] = []
_endpoints: list[str] = []
ENDPOINTS_EXTENSION = contract.ENDPOINTS_EXTENSION


def discover_endpoints(address: str, timeout_s: float = 5.0) -> list[str]:
    """The replicas' direct gRPC endpoints a tier advertises (empty if none).

    When ``address`` is a loopback address the tier is local, and the
    endpoints' hosts (Ray's node IP) are replaced by it: load stays on loopback.
    """
    with grpc.insecure_channel(address) as channel:
        meta = pb_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(pb.ServerMetadataRequest(), timeout=timeout_s)
    found: list[str] = []
    for ext in meta.extensions:
        if ext.startswith(ENDPOINTS_EXTENSION):
            found = [e for e in ext[len(ENDPOINTS_EXTENSION):].split(",") if e]
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        found = [f"{address.rsplit(':', 1)[0]}:{e.rsplit(':', 1)[1]}" for e in found]
    return found


@events.test_start.add_listener
def _discover(environment: Environment, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is not None and opts.direct and environment.host and not _endpoints:
        _endpoints.extend(discover_endpoints(_target(environment.host)))
        logging.getLogger("splitgate.locust").warning(
            "direct ingress: %s", ", ".join(_endpoints) or "no endpoints advertised; using the proxy"
        )


def _target(host: str) -> str:
    return host.removeprefix("grpc://").removeprefix("http://")


@events.init.add_listener
def _load_traffic(environment: Environment, **_: Any) -> None:
    """Load or record the traffic once per locust process, before users start."""
    opts = environment.parsed_options
    if opts is None or _traffic:
        return
    if opts.traffic:
        _traffic.extend(load_traffic(opts.traffic))
    elif opts.bundles:
        bundles = [b.strip() for b in opts.bundles.split(",") if b.strip()]
        mix = parse_mix(opts.mix) if opts.mix else None
        _traffic.extend(record_traffic(bundles, mix, batch=opts.batch, samples=opts.samples, seed=opts.seed))
    else:
        raise SystemExit("splitgate locustfile: pass --bundles (and optionally --mix) or --traffic")


# -- the user ----------------------------------------------------------------

_user_ids = itertools.count()


class SplitTrafficUser(User):
    """One edge device: its own gRPC channel, replaying the weighted traffic mix."""

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        opts = environment.parsed_options
        self._wait_s = (opts.wait_ms if opts else 0.0) / 1e3
        self._timeout_s = opts.call_timeout if opts else 10.0
        self._index = next(_user_ids)
        self._rng = random.Random((opts.seed if opts else 0) * 100_003 + self._index)
        self._groups = [(t.name, itertools.cycle(t.messages())) for t in _traffic]
        self._weights = [t.weight for t in _traffic]
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.GRPCInferenceServiceStub | None = None

    def wait_time(self) -> float:
        return self._wait_s

    def on_start(self) -> None:
        if not self.host:
            raise SystemExit("splitgate locustfile: pass --host HOST:PORT of the cloud tier's gRPC ingress")
        target = _endpoints[self._index % len(_endpoints)] if _endpoints else _target(self.host)
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # One TCP connection per user, like separate devices (not one shared subchannel).
            ("grpc.use_local_subchannel_pool", 1),
        ]
        self._channel = grpc.insecure_channel(target, options=options)
        channel = grpc.intercept_channel(self._channel, LocustInterceptor(self.environment))
        self._stub = pb_grpc.GRPCInferenceServiceStub(channel)

    def on_stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    @task
    def infer(self) -> None:
        """Send the next recorded request of a partition drawn by weight."""
        assert self._stub is not None
        _, requests = self._rng.choices(self._groups, weights=self._weights)[0]
        try:
            self._stub.ModelInfer(next(requests), timeout=self._timeout_s)
        except grpc.RpcError:
            pass  # already reported by the interceptor
