"""The `:authority` of an HBONE CONNECT (`agent.tunnel.authority.parse_authority`).

Input: the authority (UTF-8, as hpack decodes it).  Contract: `parse_authority` raises nothing
but `ValueError`, and what it takes formats (`format_authority`) to an authority that parses
equal.
"""

from __future__ import annotations

from agent.tunnel.authority import format_authority, parse_authority
from fuzz.harness import main


def check(data: bytes) -> None:
    try:
        ip, port = parse_authority(data.decode())
    except ValueError:  # UnicodeDecodeError included
        return
    assert parse_authority(format_authority(ip, port)) == (ip, port), (ip, port)


def seeds() -> dict[str, bytes]:
    return {
        "v4": b"10.0.0.2:80",
        "v6": b"[fd00::2]:443",
        "mapped": b"[::ffff:10.0.0.1]:8080",
        "host-name": b"web.shop:80",
        "no-port": b"10.0.0.2",
        "port-zero": b"10.0.0.2:0",
        "v6-unbracketed": b"fd00::2:443",
        "scoped": b"[fe80::1%eth0]:80",
    }


if __name__ == "__main__":
    main(check)
