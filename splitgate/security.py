"""TLS, mutual TLS and token auth for every splitgate gRPC channel.

- :class:`TlsConfig` names PEM files; :func:`server_credentials` and
  :func:`channel_credentials` turn it into grpcio credentials (mutual TLS when
  the server sets ``require_client_cert`` and the client presents ``cert``/``key``).
- :func:`open_channel` is how splitgate clients connect: TLS when given,
  plaintext only to a loopback address or with an explicit ``insecure=True``
  (anything else raises :class:`~splitgate.errors.ConfigError`).
- Tokens ride in the ``authorization: Bearer <token>`` metadata of every call.
  Servers keep only their sha256 (:class:`TokenCheck`), compare in constant
  time, and answer UNAUTHENTICATED (:class:`AuthInterceptor` for grpcio
  servers; the Ray Serve deployment calls :meth:`TokenCheck.check` itself).
- :class:`TlsFront` terminates TLS in front of a plaintext loopback gRPC port
  (Ray Serve's gRPC ingress has no TLS option, see README "Security").
- :func:`generate_dev_certs` writes a dev CA, a server and a client certificate
  (``splitgate certs``; needs ``cryptography``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import ssl
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import grpc

from splitgate.errors import ConfigError, Unauthenticated

__all__ = [
    "TlsConfig",
    "TokenCheck",
    "AuthInterceptor",
    "TlsFront",
    "AUTH_METADATA_KEY",
    "auth_metadata",
    "token_digest",
    "server_credentials",
    "channel_credentials",
    "open_channel",
    "is_loopback",
    "is_local_address",
    "generate_dev_certs",
    "add_inference_servicer",
    "secure_server_port",
    "raw_input_leaks",
    "malformed_message",
]

AUTH_METADATA_KEY = "authorization"
_BEARER = "bearer "


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
        """From a config mapping (TOML/YAML ``tls`` table); None stays None."""
        if data is None:
            return None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown TLS settings {unknown}; known: {sorted(known)}")
        return cls(**data)

    def read(self, attr: str) -> bytes | None:
        """The bytes of one of the files (None when not set)."""
        path = getattr(self, attr)
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"TLS {attr} file {path}: {exc.strerror or exc}") from None


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """grpcio server credentials; mutual TLS with ``require_client_cert``."""
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
    """grpcio channel credentials: verify the server with ``ca``; present ``cert`` for mutual TLS."""
    if (tls.cert is None) != (tls.key is None):
        raise ConfigError("a TLS client certificate needs both cert and key")
    return grpc.ssl_channel_credentials(
        root_certificates=tls.read("ca"), private_key=tls.read("key"), certificate_chain=tls.read("cert")
    )


def is_loopback(address: str) -> bool:
    """True for ``localhost``/127.x/::1 addresses (``host:port`` or a bare host)."""
    host = address
    if address.startswith("["):
        host = address[1 : address.index("]")]
    elif address.count(":") == 1:
        host = address.rsplit(":", 1)[0]
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_LOCAL_CACHE: dict[str, bool] = {}


def is_local_address(address: str) -> bool:
    """True when connecting to ``address`` stays on this host: loopback, or an
    IP assigned to one of this host's interfaces (Ray advertises the node IP
    for direct-ingress replicas even on a single machine). Not for binds:
    serving on such an address is reachable from the network."""
    if is_loopback(address):
        return True
    host = address[1 : address.index("]")] if address.startswith("[") else address.rsplit(":", 1)[0]
    if host not in _LOCAL_CACHE:
        try:
            ip = ipaddress.ip_address(host)
            if ip.is_unspecified:
                raise ValueError(host)
            import socket

            with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET) as sock:
                sock.bind((host, 0))  # succeeds only for an address of this host
            _LOCAL_CACHE[host] = True
        except (ValueError, OSError):
            _LOCAL_CACHE[host] = False
    return _LOCAL_CACHE[host]


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


def token_digest(token: str) -> str:
    """sha256 hex of a token: what servers store and compare."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token`` (empty without one)."""
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),) if token else ()


class TokenCheck:
    """Accepts calls whose ``authorization: Bearer`` token is one of a set.

    Parameters:
        tokens: accepted tokens in the clear.
        digests: accepted tokens as sha256 hex (what configs and Serve args should carry).
    """

    def __init__(self, tokens: Iterable[str] = (), digests: Iterable[str] = ()) -> None:
        self._digests = [d.lower() for d in digests] + [token_digest(t) for t in tokens if t]
        if not self._digests:
            raise ConfigError("token auth needs at least one token")

    @property
    def digests(self) -> list[str]:
        return list(self._digests)

    def check(self, metadata: Iterable[tuple[str, Any]] | None) -> None:
        """Raise Unauthenticated unless ``metadata`` carries an accepted token."""
        presented = None
        for key, value in metadata or ():
            if key.lower() == AUTH_METADATA_KEY:
                presented = value.decode() if isinstance(value, bytes) else str(value)
                break
        if presented is None:
            raise Unauthenticated("missing credentials: send metadata 'authorization: Bearer <token>'")
        if not presented.lower().startswith(_BEARER):
            raise Unauthenticated("malformed credentials: expected 'authorization: Bearer <token>'")
        got = token_digest(presented[len(_BEARER):].strip())
        ok = False
        for want in self._digests:  # constant time, and no early exit
            ok |= hmac.compare_digest(got, want)
        if not ok:
            raise Unauthenticated("bad credentials: the token is not accepted here")


class AuthInterceptor(grpc.ServerInterceptor):
    """A grpcio server interceptor answering UNAUTHENTICATED unless the token checks out."""

    def __init__(self, check: TokenCheck) -> None:
        self._check = check

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        try:
            self._check.check(handler_call_details.invocation_metadata)
        except Unauthenticated as exc:
            message = str(exc)

            def deny(request: object, context: grpc.ServicerContext) -> None:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

            return grpc.unary_unary_rpc_method_handler(deny, request_deserializer=lambda b: b)
        return continuation(handler_call_details)


def _server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    if tls.cert is None or tls.key is None:
        raise ConfigError("a TLS front needs both cert and key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
        if tls.require_client_cert:
            if tls.ca is None:
                raise ConfigError("mutual TLS (require_client_cert) needs ca")
            ctx.load_verify_locations(tls.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS front: cannot load certificates: {exc}") from None
    ctx.set_alpn_protocols(["h2"])  # gRPC clients insist on HTTP/2 via ALPN
    return ctx


class TlsFront:
    """Terminate TLS (optionally mutual) on ``host:port`` and relay the
    plaintext bytes to a loopback ``upstream`` gRPC port, unchanged.

    Used in front of Ray Serve's gRPC proxy, which has no TLS option. The
    relay is byte-for-byte (HTTP/2 passes through), so call metadata such as
    the auth token reaches the upstream. Runs its own event loop thread.

    Parameters:
        upstream: ``host:port`` of the plaintext server (should be loopback).
        tls: server certificate/key (+ ``ca``/``require_client_cert`` for mutual TLS).
        host, port: where to listen (port 0 = a free one; see :attr:`address`).
    """

    def __init__(self, upstream: str, tls: TlsConfig, *, host: str = "127.0.0.1", port: int = 0) -> None:
        up_host, _, up_port = upstream.rpartition(":")
        self._upstream = (up_host.strip("[]") or "127.0.0.1", int(up_port))
        self._ctx = _server_ssl_context(tls)
        self._host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.handshake_failures = 0

    @property
    def address(self) -> str:
        return f"{self._host}:{self.port}"

    def start(self) -> TlsFront:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, self._host, self.port, ssl=self._ctx)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # noqa: BLE001 - reported to the caller
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=run, name="tls-front", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            raise ConfigError(f"TLS front on {self._host}:{self.port}: {errors[0]}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop = None

    def __enter__(self) -> TlsFront:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_w))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(64 * 1024):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError, ssl.SSLError):
                pass
            finally:
                dst.close()  # either side ending ends the connection (TLS has no half-close)

        try:
            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        finally:
            self._writers.discard(writer)
            self._writers.discard(up_w)


def generate_dev_certs(
    out_dir: str | Path,
    *,
    hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    days: int = 30,
    client_name: str = "splitgate-edge",
) -> dict[str, Path]:
    """Write a throwaway CA, a server certificate for ``hosts`` and a client
    certificate (for mutual TLS), all signed by the CA. For development only.

    Files: ``ca.pem``, ``ca.key``, ``server.pem``, ``server.key``,
    ``client.pem``, ``client.key`` (keys are ECDSA P-256, mode 0600).

    Returns:
        name -> path of each file written.

    Raises:
        ConfigError: ``cryptography`` is not installed.
    """
    try:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise ConfigError("generating certificates needs 'cryptography' (pip install cryptography)") from None

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "splitgate dev"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(name("splitgate dev CA")).issuer_name(name("splitgate dev CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage, sans: list) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    sans: list = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    server_key, server_cert = leaf(hosts[0] if hosts else "localhost", ExtendedKeyUsageOID.SERVER_AUTH, sans)
    client_key, client_cert = leaf(client_name, ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName(client_name)])

    written: dict[str, Path] = {}
    for stem, key, cert in (("ca", ca_key, ca_cert), ("server", server_key, server_cert),
                            ("client", client_key, client_cert)):
        cert_path, key_path = out / f"{stem}.pem", out / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ))
        key_path.chmod(0o600)
        written[f"{stem}.pem"], written[f"{stem}.key"] = cert_path, key_path
    return written


# -- hardened grpcio servers ------------------------------------------------------


class _Malformed:
    """Stands in for a request whose bytes are not a valid protobuf message."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.message = f"malformed {type_name}: the request bytes are not a valid protobuf message ({error})"


def malformed_message(request: object) -> str | None:
    """The INVALID_ARGUMENT message for a request that did not parse, else None."""
    return request.message if isinstance(request, _Malformed) else None


def _lenient(cls: Any):
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, RecursionError on deep nesting, ...
            return _Malformed(cls.DESCRIPTOR.name, exc)

    return parse


def _guarded(fn: Any):
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return fn(request, context)

    return call


def add_inference_servicer(servicer: Any, server: grpc.Server) -> None:
    """Register an ``inference.GRPCInferenceService`` servicer like the
    generated ``add_..._to_server``, except that a request whose bytes do not
    parse is answered INVALID_ARGUMENT (grpcio's default is INTERNAL
    "Exception deserializing request!", which reads as a server bug)."""
    from splitgate.protocol import inference_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _guarded(getattr(servicer, method.name)),
            request_deserializer=_lenient(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def secure_server_port(server: grpc.Server, address: str, *, tls: TlsConfig | None, insecure: bool = False) -> int:
    """Bind ``address`` with TLS, or plaintext when it is loopback or ``insecure``.

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


# -- privacy ------------------------------------------------------------------------


def raw_input_leaks(inputs: dict[str, Any], cut: dict[str, Any]) -> list[str]:
    """Names of cut tensors that carry a raw input's bytes verbatim.

    The privacy floor says raw inputs never leave the device; a cut right
    after a layout-only op (Identity, Reshape, Flatten, Squeeze) would send
    them anyway. Catches byte-identical copies (also inside a larger tensor);
    a transposed or re-typed copy is not detected (the planner's floor is
    what excludes such cuts).
    """
    import numpy as np

    raws = [np.ascontiguousarray(a).tobytes() for a in inputs.values()]
    raws = [r for r in raws if len(r) >= 16]  # too short to mean anything
    leaks = []
    for name, value in cut.items():
        data = np.ascontiguousarray(value).tobytes()
        if any(len(data) >= len(r) and r in data for r in raws):
            leaks.append(name)
    return leaks
