"""Dev certificates (``splitgate certs``): a throwaway CA, a server and a
client certificate. ``cryptography`` is imported only when called."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitgate.errors import ConfigError

if TYPE_CHECKING:
    from cryptography import x509

__all__ = ["generate_dev_certs"]

_ORGANIZATION = "splitgate dev"
_CA_NAME = "splitgate dev CA"


def _require_cryptography() -> None:
    """Raises ConfigError (naming the extra) when ``cryptography`` is missing."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise ConfigError(
            "generating certificates needs 'cryptography': pip install 'splitgate[security]'"
        ) from None


def _name(common_name: str) -> x509.Name:
    """A subject/issuer name in the dev organization."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _subject_alt_names(hosts: Sequence[str]) -> list[Any]:
    """IP literals as IPAddress entries, everything else as DNSName."""
    from cryptography import x509

    sans: list[Any] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    return sans


def _make_ca(start: datetime.datetime, end: datetime.datetime) -> tuple[Any, Any]:
    """A self-signed CA (ECDSA P-256) allowed to sign leaf certificates only: (key, cert)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(_name(_CA_NAME)).issuer_name(_name(_CA_NAME))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_leaf(
    ca: tuple[Any, Any], common_name: str, usage: Any, sans: list[Any],
    start: datetime.datetime, end: datetime.datetime,
) -> tuple[Any, Any]:
    """A leaf certificate for ``usage`` (server or client auth) signed by ``ca``: (key, cert)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _write_pair(out: Path, stem: str, key: Any, cert: Any) -> tuple[Path, Path]:
    """Write ``<stem>.pem`` and ``<stem>.key`` (PKCS#8, unencrypted, mode 0600)."""
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = out / f"{stem}.pem", out / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    key_path.chmod(0o600)
    return cert_path, key_path


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

    Args:
        out_dir: directory to write into (created if missing).
        hosts: names and IPs the server certificate is valid for; the first is its CN.
        days: validity from now (backdated 5 minutes for clock skew).
        client_name: the client certificate's CN and DNS name.

    Returns:
        name -> path of each file written.

    Raises:
        ConfigError: ``cryptography`` is not installed.
    """
    _require_cryptography()
    from cryptography.x509.oid import ExtendedKeyUsageOID

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca = _make_ca(start, end)
    server = _make_leaf(ca, hosts[0] if hosts else "localhost", ExtendedKeyUsageOID.SERVER_AUTH,
                        _subject_alt_names(hosts), start, end)
    client = _make_leaf(ca, client_name, ExtendedKeyUsageOID.CLIENT_AUTH,
                        _subject_alt_names([client_name]), start, end)
    written: dict[str, Path] = {}
    for stem, (key, cert) in (("ca", ca), ("server", server), ("client", client)):
        written[f"{stem}.pem"], written[f"{stem}.key"] = _write_pair(out, stem, key, cert)
    return written
