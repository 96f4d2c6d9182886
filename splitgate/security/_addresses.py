"""Is an address on this host? The test behind "plaintext only locally"."""

from __future__ import annotations

import ipaddress
import socket

__all__ = ["is_local_address", "is_loopback"]

_LOOPBACK_NAMES = ("localhost", "ip6-localhost")

# host -> whether it is one of this host's addresses (binding a socket to learn it costs a syscall).
_LOCAL_CACHE: dict[str, bool] = {}


def _host_of(address: str) -> str:
    """The host part of ``host:port``, ``[v6]:port`` or a bare host.

    Args:
        address: a gRPC target such as ``127.0.0.1:9000``, ``[::1]:80`` or ``localhost``.

    Returns:
        The host without brackets or port (a bare IPv6 address is returned whole).
    """
    if address.startswith("["):
        return address[1 : address.index("]")]
    if address.count(":") == 1:
        return address.rsplit(":", 1)[0]
    return address


def is_loopback(address: str) -> bool:
    """True for ``localhost``/127.x/::1 addresses (``host:port`` or a bare host).

    Args:
        address: a gRPC target or a bare host.

    Returns:
        Whether traffic to it never leaves this host's loopback interface.
    """
    host = _host_of(address)
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_own_ip(host: str) -> bool:
    """True when ``host`` is an IP literal assigned to one of this host's interfaces."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.is_unspecified:
        return False
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family) as sock:
            sock.bind((host, 0))  # succeeds only for an address of this host
    except OSError:
        return False
    return True


def is_local_address(address: str) -> bool:
    """True when connecting to ``address`` stays on this host.

    That is loopback, or an IP assigned to one of this host's interfaces (Ray
    advertises the node IP for direct-ingress replicas even on a single
    machine). Not for binds: serving on such an address is reachable from the
    network (use :func:`is_loopback` there).

    Args:
        address: ``host:port`` (or ``[v6]:port``) of the peer.

    Returns:
        Whether a plaintext connection to it stays on this machine.
    """
    if is_loopback(address):
        return True
    host = address[1 : address.index("]")] if address.startswith("[") else address.rsplit(":", 1)[0]
    if host not in _LOCAL_CACHE:
        _LOCAL_CACHE[host] = _is_own_ip(host)
    return _LOCAL_CACHE[host]
