"""Typed errors shared by every part of splitgate.

Each error carries the gRPC status code it maps to on the wire, so a server can
turn it into a status with ``abort_with`` and a client can turn a status back
into the same Python type with :func:`from_rpc_error`.
"""

from __future__ import annotations

import grpc

__all__ = [
    "SplitgateError",
    "InvalidArgument",
    "NotFound",
    "FailedPrecondition",
    "Unauthenticated",
    "ResourceExhausted",
    "Unavailable",
    "DeadlineExceeded",
    "InternalError",
    "BundleError",
    "ConfigError",
    "from_rpc_error",
    "error_for_code",
]


class SplitgateError(Exception):
    """Base class of every error splitgate raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(SplitgateError, ValueError):
    """A request is malformed: unknown tensor name, wrong dtype, shape or size."""

    code = grpc.StatusCode.INVALID_ARGUMENT


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


class InternalError(SplitgateError):
    """A bug or an unexpected failure inside splitgate or the runtime."""

    code = grpc.StatusCode.INTERNAL


class BundleError(SplitgateError):
    """A plan bundle is missing, malformed, or fails its integrity check."""

    code = grpc.StatusCode.FAILED_PRECONDITION


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
    """Return the typed error for a gRPC status code (``InternalError`` if unmapped)."""
    err = _BY_CODE.get(code, SplitgateError)(message)
    if type(err) is SplitgateError:
        err.code = code
    return err


def from_rpc_error(exc: grpc.RpcError) -> SplitgateError:
    """Convert a ``grpc.RpcError`` raised by a stub into a typed splitgate error."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return error_for_code(code, f"{code.name}: {details}")
