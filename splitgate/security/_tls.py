"""TLS settings, grpcio credentials, and the "TLS or stay local" rule for
client channels and server ports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import grpc

from splitgate.errors import ConfigError
from splitgate.security._addresses import is_local_address, is_loopback

__all__ = [
    "TlsConfig",
    "channel_credentials",
    "open_channel",
    "secure_server_port",
    "server_credentials",
]


@dataclass(frozen=True)
class TlsConfig:
    """PEM files for one side of a TLS connection.

    Attributes:
        cert: this side's certificate chain (server: required; client: for mutual TLS).
        key: this side's private key (with ``cert``).
        ca: CA bundle that verifies the peer (client: the server's CA, None =
            system roots; server: the CA of client certificates, for mutual TLS).
        require_client_cert: server only: refuse clients without a certificate
            signed by ``ca`` (mutual TLS).
        server_name: client only: the name to check the server certificate
            against when it differs from the address (e.g. ``localhost``).
    """

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    require_client_cert: bool = False
    server_name: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TlsConfig | None:
        """From a config mapping (TOML/YAML ``tls`` table); None stays None.

        Raises:
            ConfigError: a key that is not a TLS setting.
        """
        if data is None:
            return None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown TLS settings {unknown}; known: {sorted(known)}")
        return cls(**data)

    def read(self, attr: str) -> bytes | None:
        """The bytes of one of the files (None when not set).

        Args:
            attr: ``"cert"``, ``"key"`` or ``"ca"``.

        Raises:
            ConfigError: the file is set but cannot be read.
        """
        path = getattr(self, attr)
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"TLS {attr} file {path}: {exc.strerror or exc}") from None


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """grpcio server credentials; mutual TLS with ``require_client_cert``.

    Raises:
        ConfigError: cert or key missing, mutual TLS without ``ca``, unreadable files.
    """
    cert, key = tls.read("cert"), tls.read("key")
    if cert is None or key is None:
        raise ConfigError("a TLS server needs both cert and key")
    ca = tls.read("ca")
    if tls.require_client_cert and ca is None:
        raise ConfigError("mutual TLS (require_client_cert) needs ca: the CA that signs client certificates")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=tls.require_client_cert
    )


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    """grpcio channel credentials: verify the server with ``ca``; present ``cert`` for mutual TLS.

    Raises:
        ConfigError: only one of cert and key, or unreadable files.
    """
    if (tls.cert is None) != (tls.key is None):
        raise ConfigError("a TLS client certificate needs both cert and key")
    return grpc.ssl_channel_credentials(
        root_certificates=tls.read("ca"), private_key=tls.read("key"), certificate_chain=tls.read("cert")
    )


def open_channel(
    address: str,
    *,
    tls: TlsConfig | None = None,
    insecure: bool = False,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A grpcio channel to ``address``: TLS with ``tls``, else plaintext.

    Plaintext is allowed to addresses of this host (loopback, or the node IP
    Ray advertises for local replicas: embedded, single-host use) or when
    ``insecure=True`` is passed explicitly.

    Raises:
        ConfigError: plaintext to a non-loopback address without ``insecure``,
            or unreadable TLS files.
    """
    opts = list(options)
    if tls is not None:
        if tls.server_name:
            opts.append(("grpc.ssl_target_name_override", tls.server_name))
        return grpc.secure_channel(address, channel_credentials(tls), options=opts)
    if not insecure and not is_local_address(address):
        raise ConfigError(
            f"refusing a plaintext gRPC channel to {address}: pass TLS settings, or insecure=True "
            "(--insecure) to send unencrypted traffic off this host"
        )
    return grpc.insecure_channel(address, options=opts)


def secure_server_port(server: grpc.Server, address: str, *, tls: TlsConfig | None, insecure: bool = False) -> int:
    """Bind ``address`` with TLS, or plaintext when it is loopback or ``insecure``.

    Returns:
        The bound port (grpcio's ``add_*_port``).

    Raises:
        ConfigError: plaintext on a non-loopback address without ``insecure``.
    """
    if tls is not None:
        return server.add_secure_port(address, server_credentials(tls))
    if not insecure and not is_loopback(address):
        raise ConfigError(
            f"refusing to serve plaintext gRPC on {address}: pass TLS settings, or insecure=True "
            "(--insecure) to accept unencrypted traffic from other hosts"
        )
    return server.add_insecure_port(address)
