"""Bearer tokens: the call metadata that carries one, the server-side check,
and a grpcio interceptor that answers UNAUTHENTICATED."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from splitgate.errors import ConfigError, Unauthenticated

__all__ = ["AUTH_METADATA_KEY", "AuthInterceptor", "TokenCheck", "auth_metadata", "token_digest"]

AUTH_METADATA_KEY = "authorization"
_BEARER = "bearer "


def token_digest(token: str) -> str:
    """sha256 hex of a token: what servers store and compare."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token`` (empty without one)."""
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),) if token else ()


def _presented_token(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The token in a call's ``authorization: Bearer <token>`` metadata.

    Raises:
        Unauthenticated: no ``authorization`` entry, or not a Bearer one.
    """
    presented = None
    for key, value in metadata or ():
        if key.lower() == AUTH_METADATA_KEY:
            presented = value.decode() if isinstance(value, bytes) else str(value)
            break
    if presented is None:
        raise Unauthenticated("missing credentials: send metadata 'authorization: Bearer <token>'")
    if not presented.lower().startswith(_BEARER):
        raise Unauthenticated("malformed credentials: expected 'authorization: Bearer <token>'")
    return presented[len(_BEARER):].strip()


class TokenCheck:
    """Accepts calls whose ``authorization: Bearer`` token is one of a set.

    Parameters:
        tokens: accepted tokens in the clear.
        digests: accepted tokens as sha256 hex (what configs and Serve args should carry).

    Raises:
        ConfigError: neither tokens nor digests given.
    """

    def __init__(self, tokens: Iterable[str] = (), digests: Iterable[str] = ()) -> None:
        self._digests = [d.lower() for d in digests] + [token_digest(t) for t in tokens if t]
        if not self._digests:
            raise ConfigError("token auth needs at least one token")

    @property
    def digests(self) -> list[str]:
        """The accepted tokens' sha256 hex digests."""
        return list(self._digests)

    def check(self, metadata: Iterable[tuple[str, Any]] | None) -> None:
        """Pass when ``metadata`` carries an accepted token.

        Raises:
            Unauthenticated: the token is missing, malformed or not accepted.
        """
        got = token_digest(_presented_token(metadata))
        ok = False
        for want in self._digests:  # constant time, and no early exit
            ok |= hmac.compare_digest(got, want)
        if not ok:
            raise Unauthenticated("bad credentials: the token is not accepted here")


class AuthInterceptor(grpc.ServerInterceptor):
    """A grpcio server interceptor answering UNAUTHENTICATED unless the token checks out."""

    def __init__(self, check: TokenCheck) -> None:
        self._check = check

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        """The method's handler for an authenticated call, else one that aborts UNAUTHENTICATED."""
        try:
            self._check.check(handler_call_details.invocation_metadata)
        except Unauthenticated as exc:
            return _deny_handler(str(exc))
        return continuation(handler_call_details)


def _deny_handler(message: str) -> grpc.RpcMethodHandler:
    """A unary handler that aborts every call with UNAUTHENTICATED ``message``."""

    def deny(request: object, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(deny, request_deserializer=lambda b: b)
