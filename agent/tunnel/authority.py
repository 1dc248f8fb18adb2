"""The `:authority` of an HBONE CONNECT: the destination as `ip:port`, `[v6]:port` for IPv6.

HBONE names no hosts: the client proxy already resolved the destination (the original
destination of the intercepted connection), and the server proxy connects to exactly that
address, so anything but a literal IP address and a port is refused.
"""

from __future__ import annotations

import ipaddress


def format_authority(ip: str, port: int) -> str:
    """`10.0.0.1:80` or `[fd00::1]:80`."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def parse_authority(authority: str) -> tuple[str, int]:
    """(`ip`, port) from an authority; raises ValueError if it is not `ip:port` / `[v6]:port`."""
    host, sep, port = authority.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"authority {authority!r} is not ip:port")
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    if host.startswith("[") and host.endswith("]"):
        ip = ipaddress.IPv6Address(host[1:-1])
    else:
        ip = ipaddress.IPv4Address(host)
    return str(ip), int(port)
