"""TLS, mutual TLS and token auth for every splitgate gRPC channel.

- :class:`TlsConfig` names PEM files; :func:`server_credentials` and
  :func:`channel_credentials` turn it into grpcio credentials (mutual TLS when
  the server sets ``require_client_cert`` and the client presents ``cert``/``key``).
- :func:`open_channel` is how splitgate clients connect: TLS when given,
  plaintext only to an address of this host or with an explicit
  ``insecure=True`` (anything else raises :class:`~splitgate.errors.ConfigError`);
  :func:`secure_server_port` is the same rule for servers (plaintext binds
  only on loopback).
- Tokens ride in the ``authorization: Bearer <token>`` metadata of every call.
  Servers keep only their sha256 (:class:`TokenCheck`), compare in constant
  time, and answer UNAUTHENTICATED (:class:`AuthInterceptor` for grpcio
  servers; the Ray Serve deployment calls :meth:`TokenCheck.check` itself).
- :class:`TlsFront` terminates TLS in front of a plaintext loopback gRPC port
  (Ray Serve's gRPC ingress has no TLS option).
- :func:`generate_dev_certs` writes a dev CA, a server and a client certificate
  (``splitgate certs``; needs ``cryptography``).
- :func:`add_inference_servicer` registers the inference service so that
  unparseable request bytes get INVALID_ARGUMENT (:func:`malformed_message`).
- :func:`raw_input_leaks` checks that no raw input crosses the network verbatim.
- Signed bundles: :func:`generate_signing_key` (``splitgate keys``),
  :func:`sign_bundle` (``splitgate sign``: a detached ed25519
  ``signature.json``), :class:`TrustedKeys` and :func:`verify_bundle` (raises
  :class:`~splitgate.errors.BundleSignatureError`).

One job per private module: ``_addresses`` (is this host?), ``_tls``,
``_tokens``, ``_front``, ``_certs``, ``_servicer``, ``_privacy``, ``_signing``.
"""

from __future__ import annotations

from splitgate.security._addresses import is_local_address, is_loopback
from splitgate.security._certs import generate_dev_certs
from splitgate.security._front import TlsFront
from splitgate.security._privacy import raw_input_leaks
from splitgate.security._servicer import add_inference_servicer, malformed_message
from splitgate.security._signing import TrustedKeys, generate_signing_key, key_id, sign_bundle, verify_bundle
from splitgate.security._tls import (
    TlsConfig,
    channel_credentials,
    open_channel,
    secure_server_port,
    server_credentials,
)
from splitgate.security._tokens import (
    AUTH_METADATA_KEY,
    AuthInterceptor,
    TokenCheck,
    auth_metadata,
    token_digest,
)

__all__ = [
    "AUTH_METADATA_KEY",
    "AuthInterceptor",
    "TlsConfig",
    "TlsFront",
    "TokenCheck",
    "TrustedKeys",
    "add_inference_servicer",
    "auth_metadata",
    "channel_credentials",
    "generate_dev_certs",
    "generate_signing_key",
    "is_local_address",
    "is_loopback",
    "key_id",
    "malformed_message",
    "open_channel",
    "raw_input_leaks",
    "secure_server_port",
    "server_credentials",
    "sign_bundle",
    "token_digest",
    "verify_bundle",
]
