"""Typed errors shared by every part of splitgate.

Each error carries the gRPC status code it maps to on the wire, so a server can
turn it into a status with ``abort_with`` and a client can turn a status back
into the same Python type with :func:`from_rpc_error`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import grpc

__all__ = [
    "SplitgateError",
    "InvalidArgument",
    "ModelRunError",
    "NotFound",
    "FailedPrecondition",
    "Unauthenticated",
    "ResourceExhausted",
    "Unavailable",
    "DeadlineExceeded",
    "InternalError",
    "BundleError",
    "BundleSignatureError",
    "UpdateIndexError",
    "ConfigError",
    "Overloaded",
    "QueueFull",
    "DeadlineUnmeetable",
    "from_rpc_error",
    "error_for_code",
    "PEER_FAILURE_CODES",
    "is_peer_failure",
]


class SplitgateError(Exception):
    """Base class of every error splitgate raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(SplitgateError, ValueError):
    """A request is malformed: unknown tensor name, wrong dtype, shape or size."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelRunError(InvalidArgument):
    """The model itself failed on inputs that match its declared inputs.

    The inputs passed validation (names, dtypes, ranks, fixed dimensions), yet
    the graph cannot process them: e.g. a Reshape to a fixed element count fed
    a dynamic width it cannot take. It is the caller's data, so the wire status
    is INVALID_ARGUMENT; running the same partition elsewhere fails the same way.

    The message has one fixed form (a client rebuilds this type from it, see
    :func:`error_for_code`)::

        model 'crnn' partition 'cut-3' (suffix on the cloud) failed at node
        Reshape 'Reshape_82' on inputs x[1,1,64,7] FP32: <onnxruntime's reason>

    Attributes:
        model: the model name (None if unknown).
        partition: the partition id (None if unknown).
        part: ``"prefix"``, ``"suffix"`` or ``"full model"`` (None if unknown).
        tier: ``"device"`` or ``"cloud"``: where it ran (None if unknown).
        op_type: the failing node's operator, e.g. ``"Reshape"`` (None if
            onnxruntime did not name one).
        node: the failing node's name (innermost, for a node inside an If/Loop body).
        inputs: ``(name, shape, datatype)`` of each input the run was given.
        reason: onnxruntime's own reason, cleaned to one line.

    ``message`` (optional, first argument) overrides the text built from the
    attributes (used when rebuilding the error from a status).
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        model: str | None = None,
        partition: str | None = None,
        part: str | None = None,
        tier: str | None = None,
        op_type: str | None = None,
        node: str | None = None,
        inputs: Sequence[tuple[str, tuple[int, ...], str]] = (),
        reason: str = "",
    ) -> None:
        self.model, self.partition, self.part, self.tier = model, partition, part, tier
        self.op_type, self.node, self.reason = op_type, node, reason
        self.inputs = [(n, tuple(s), d) for n, s, d in inputs]
        super().__init__(message if message is not None else self._format())

    def __reduce__(self) -> tuple:
        # Pickles (e.g. across processes) with its attributes, not just the message.
        return (_rebuild_model_run_error, (str(self), dict(self.__dict__)))

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Input name -> the shape the failing run was given."""
        return {n: s for n, s, _ in self.inputs}

    def _format(self) -> str:
        where = _run_where(self.model, self.partition, self.part, self.tier)
        at = f" at node {self.op_type or '?'} '{self.node}'" if self.node is not None else ""
        given = ", ".join(f"{n}[{','.join(map(str, s))}] {d}" for n, s, d in self.inputs) or "(none)"
        return f"{where} failed{at} on inputs {given}: {self.reason or 'onnxruntime gave no reason'}"

    @classmethod
    def from_message(cls, message: str) -> ModelRunError | None:
        """Rebuild the error from its message (e.g. a status's details), or None
        if ``message`` does not hold one. Text before ``model '`` (a status
        code prefix) is dropped."""
        m = _RUN_ERROR_RE.search(message)
        if m is None:
            return None
        inputs = [
            (n, tuple(int(d) for d in dims.split(",") if d), dt)
            for n, dims, dt in _INPUT_RE.findall(m["inputs"])
        ]
        return cls(
            model=m["model"], partition=m["partition"], part=m["part"], tier=m["tier"],
            op_type=m["op"] if m["op"] != "?" else None, node=m["node"], inputs=inputs,
            reason=m["reason"], message=message[m.start():],
        )


def _rebuild_model_run_error(message: str, fields: dict) -> ModelRunError:
    error = ModelRunError(message)
    error.__dict__.update(fields)
    return error


def _run_where(model: str | None, partition: str | None, part: str | None, tier: str | None) -> str:
    """``model 'm' partition 'p' (suffix on the cloud)``, leaving out what is unknown."""
    words = []
    if model is not None:
        words.append(f"model '{model}'")
    if partition is not None:
        words.append(f"partition '{partition}'")
    if part is not None:
        words.append(f"({part} on the {tier})" if tier else f"({part})")
    return " ".join(words) or "model run"


_RUN_ERROR_RE = re.compile(
    r"model '(?P<model>[^']*)' partition '(?P<partition>[^']*)' "
    r"\((?P<part>prefix|suffix|full model)(?: on the (?P<tier>device|cloud))?\) failed"
    r"(?: at node (?P<op>\S+) '(?P<node>[^']*)')?.*? on inputs (?P<inputs>.*?): (?P<reason>.*)\Z",
    re.DOTALL,
)
_INPUT_RE = re.compile(r"(\S+)\[([0-9,]*)\] (\w+)")


class NotFound(SplitgateError, LookupError):
    """The named model or partition is not served here."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(SplitgateError):
    """The request targets a plan the server does not hold (stale plan digest)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(SplitgateError):
    """Missing or bad credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(SplitgateError):
    """A message or tensor is larger than the configured limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(SplitgateError, ConnectionError):
    """The peer cannot be reached right now; retrying later may succeed."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(SplitgateError, TimeoutError):
    """The call did not finish before its deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Overloaded(SplitgateError):
    """A busy server refused the request at admission, before any compute.

    Not a failure of the server (a circuit breaker does not count it): the
    caller should finish the work elsewhere now and send the server no new
    work for ``retry_after_ms`` (``splitgate.retry_after_ms`` in the
    status's trailing metadata; None when the server gave no hint).
    """

    def __init__(self, message: str = "", *, retry_after_ms: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms

    def __reduce__(self) -> tuple:
        return (_rebuild_overloaded, (type(self), str(self), self.retry_after_ms))


def _rebuild_overloaded(cls: type, message: str, retry_after_ms: float | None) -> Overloaded:
    return cls(message, retry_after_ms=retry_after_ms)


class QueueFull(Overloaded, ResourceExhausted):
    """Refused at admission: the server's queue is full (RESOURCE_EXHAUSTED)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineUnmeetable(Overloaded, Unavailable):
    """Refused at admission: the work queued ahead means the request would
    miss its deadline (UNAVAILABLE)."""

    code = grpc.StatusCode.UNAVAILABLE


class InternalError(SplitgateError):
    """A bug or an unexpected failure inside splitgate or the runtime."""

    code = grpc.StatusCode.INTERNAL


class BundleError(SplitgateError):
    """A plan bundle is missing, malformed, or fails its integrity check."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class BundleSignatureError(BundleError):
    """A plan bundle is not authentic for this trust set: unsigned (and unsigned
    bundles are not allowed), its signature does not verify (the bundle changed
    after signing), or it is signed by a key outside the trusted set. The
    message names the bundle, the problem and the fix. Never retried or loaded
    partially."""


class UpdateIndexError(BundleSignatureError):
    """An over-the-air update index is not trustworthy for this trust set:
    unsigned (and unsigned indexes are not allowed), its signature does not
    verify (changed after signing), signed by a key outside the set, expired
    (a frozen source), or older than an index already accepted (a replayed
    index: a rollback attack). The message names the index, the problem and
    the fix. The running version keeps serving."""


class ConfigError(SplitgateError, ValueError):
    """A setting is invalid: unreadable TLS files, a bad token, or plaintext to
    a remote host without an explicit ``insecure=True``. Raised at start-up,
    never on the wire."""

    code = grpc.StatusCode.INVALID_ARGUMENT


_BY_CODE: dict[grpc.StatusCode, type[SplitgateError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        Unauthenticated,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        InternalError,
    )
}


def error_for_code(code: grpc.StatusCode, message: str) -> SplitgateError:
    """Return the typed error for a gRPC status code (``InternalError`` if unmapped).

    An INVALID_ARGUMENT whose message is a :class:`ModelRunError`'s becomes
    that error again (attributes parsed back, the status prefix dropped)."""
    if code == grpc.StatusCode.INVALID_ARGUMENT and (run := ModelRunError.from_message(message)) is not None:
        return run
    err = _BY_CODE.get(code, SplitgateError)(message)
    if type(err) is SplitgateError:
        err.code = code
    return err


def from_rpc_error(exc: grpc.RpcError) -> SplitgateError:
    """Convert a ``grpc.RpcError`` raised by a stub into a typed splitgate error."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return error_for_code(code, f"{code.name}: {details}")


#: Status codes that say the peer failed, not the request: the peer is down,
#: draining, too slow, or hit a bug. A circuit breaker counts these (and
#: transport errors); any other status is an answer from a healthy peer that
#: refused this request or plan (bad input, unknown model or partition, stale
#: plan digest, oversize, a model that fails on the input, no credentials).
PEER_FAILURE_CODES: frozenset[grpc.StatusCode] = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
})


#: NOT_FOUND details of a tier that serves nothing: Ray Serve's proxy (and its
#: HAProxy front) when no application is deployed under the route, e.g. after
#: ``serve.delete`` -- an outage, unlike splitgate's own "model 'm' is not served".
_NO_APPLICATION = ("/ray.serve.RayServeAPIService/ListApplications", "Application metadata not set")


def is_peer_failure(exc: BaseException) -> bool:
    """True if a failed call counts against the peer's health (a circuit breaker
    failure): a status in :data:`PEER_FAILURE_CODES`, a NOT_FOUND for the whole
    application (Ray Serve's proxy with no app deployed), or anything that is not
    a :class:`SplitgateError` (a transport or client-side failure)."""
    if isinstance(exc, SplitgateError):
        if isinstance(exc, Overloaded):  # a healthy, busy peer answered at once
            return False
        if exc.code == grpc.StatusCode.NOT_FOUND:
            return any(marker in str(exc) for marker in _NO_APPLICATION)
        return exc.code in PEER_FAILURE_CODES
    return True
